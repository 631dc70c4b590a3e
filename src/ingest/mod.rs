//! Receive and parse: the Pub/Sub streaming pull ([`source`]) turns each message into an
//! [`Inbound`](inbound::Inbound) and hands it to the pipeline, which parses it with
//! [`event`] into an image reference ([`image`]) for the index to look up.

pub mod event;
pub mod image;
pub mod inbound;
pub mod pubsub;
pub mod source;
