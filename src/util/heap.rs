//! Giving freed heap back to the kernel, and telling how much of it is in use.

/// Blocks of this size or more get their own mapping, given back to the kernel when freed.
const MMAP_THRESHOLD: usize = 128 * 1024;

/// Sets the allocator up for a long-lived daemon; call it first thing in `main`.
///
/// glibc serves a large block (≥ 128 KiB) from its own mapping, so freeing it returns the
/// memory at once, but after the first such free it raises that threshold (up to 32 MiB) and
/// serves later large blocks from the heap. The daemon's large blocks are transient: a LIST
/// page's body (1–3 MiB), the snapshot's JSON and its gzip buffers. From the heap they leave
/// holes among the live view's small, long-lived blocks that `malloc_trim` cannot give back:
/// at 10,000 workloads watched that was 3.4 MiB of the RSS. Setting the threshold fixes it
/// where it starts. Large allocations cost a `mmap` each, a few per LIST page, none per event.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

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

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_keep_their_own_mappings_after_one_is_freed() {
        configure();
        // SAFETY: mallinfo2 only reads glibc's allocator statistics.
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        // Left to itself, glibc raises its threshold past 4 MiB on this free...
        drop(std::hint::black_box(vec![1u8; 4 << 20]));
        let before = mapped();
        // ...and would serve this one from the heap, where it could not be given back.
        let block = std::hint::black_box(vec![1u8; 1 << 20]);
        assert!(mapped() >= before + (1 << 20), "served from the heap");
        drop(block);
    }

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
