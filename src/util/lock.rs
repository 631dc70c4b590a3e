//! One way to take a std mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering from poisoning.
///
/// Every mutex here guards plain data (maps, timestamps, a last-seen object) that a panic
/// cannot leave half-updated in a way that matters more than stopping the daemon would; a
/// panicking task already nacks its message by dropping the handler. So a poisoned lock is
/// taken as it is, rather than turning one panic into a panic on every later message.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
