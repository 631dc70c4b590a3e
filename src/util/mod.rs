//! Small helpers with no stage of their own.

pub mod clock;
pub mod excerpt;
pub mod heap;
pub(crate) mod json;
pub mod lock;
