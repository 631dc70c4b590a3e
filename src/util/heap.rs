//! Giving freed heap back to the kernel.

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
