//! Giving freed heap back to the kernel, and telling how much of it is in use.

/// Loading an index, or listing every workload for the live view, allocates the parsed
/// objects and their temporaries, then frees them; glibc keeps that memory mapped unless
/// asked, which would leave the steady-state RSS at the start-up peak.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The heap as the allocator sees it.
#[derive(Debug, Clone, Copy)]
pub struct HeapStats {
    /// Allocated and not freed.
    pub in_use: usize,
    /// Freed but still held (not given back to the kernel).
    pub free: usize,
}

/// Every arena's totals; `None` where the allocator is not glibc's. It walks glibc's free
/// lists under each arena's lock, so it is for scrapes, not for a hot path.
pub fn stats() -> Option<HeapStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads glibc's allocator statistics.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapStats {
            in_use: m.uordblks + m.hblkhd,
            free: m.fordblks,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allocation_shows_in_the_heap_in_use() {
        let Some(before) = stats() else { return };
        let block = vec![7u8; 8 << 20];
        let after = stats().expect("glibc");
        assert!(
            after.in_use >= before.in_use + (8 << 20),
            "{before:?} → {after:?}"
        );
        drop(block);
    }
}
