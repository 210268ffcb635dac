//! How the process's C allocator (glibc malloc, which libtorch allocates through on the
//! CPU) treats freed memory during a scan.
//!
//! A training step allocates and frees activations of a few megabytes each, thousands of
//! times over. glibc serves large blocks from fresh `mmap`s and hands freed memory at the
//! top of the heap back to the kernel, so each step faulted the same pages in again and
//! had the kernel zero them: `perf` on an MNIST VGG-BN scan put 12.8% of all samples in
//! the kernel, mostly page faults and `clear_page`. Keeping freed memory in the process
//! made the same scan 11% faster with bit-identical results. A scan is a short-lived
//! process of its own (the CLI, or the server's job child), so memory it keeps is
//! returned when it exits; the server process itself is left on glibc's defaults.

/// Blocks up to this size come from the heap (and are reused) rather than from `mmap`.
/// glibc's own ceiling for the dynamic threshold is 32 MiB; a batch of 128 three-channel
/// 32×32 activations with 64 channels is just over that.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: usize = 256 << 20;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_FALLBACK: usize = 32 << 20;
/// Free memory at the top of the heap kept before any is returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: usize = 1 << 30;

/// Makes glibc keep freed memory for reuse (see the module comment). Leaves the
/// allocator alone when the user tuned it through `GLIBC_TUNABLES` or the `MALLOC_*_`
/// variables, and where the C library is not glibc. Returns whether it changed anything.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned_by_user = std::env::var_os("GLIBC_TUNABLES")
            .is_some_and(|v| v.to_string_lossy().contains("malloc"))
            || std::env::vars_os().any(|(k, _)| {
                let k = k.to_string_lossy();
                k.starts_with("MALLOC_") && k.ends_with('_')
            });
        if tuned_by_user {
            return false;
        }
        // SAFETY: mallopt only sets allocator parameters; it is called before the scan
        // starts any threads of its own.
        unsafe {
            let mmap_set = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) == 1
                || libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK as i32) == 1;
            // Setting either parameter turns off glibc's dynamic thresholds, so the
            // trim threshold is only raised together with the mmap one: alone, it left
            // every block over 128 KiB on `mmap` and made a scan 2.4× slower than glibc's
            // defaults (MNIST VGG BadNets development model: 90.9 s against 37.7 s).
            mmap_set && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_thresholds() {
        // The suite runs without malloc tunables, so both settings must take.
        assert!(std::env::var_os("GLIBC_TUNABLES").is_none());
        assert!(keep_freed_memory());
    }
}
