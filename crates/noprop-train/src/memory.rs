//! Peak memory of training, for the paper's Table 2 analogue.
//!
//! Host: on Linux the peak resident set (`VmHWM` in `/proc/self/status`) can
//! be reset by writing `5` to `/proc/self/clear_refs`, so each epoch's
//! training peak is measured on its own, without the evaluation that follows
//! it. On macOS the peak is `ru_maxrss` since the process started (it cannot
//! be reset). Elsewhere it is not measured.
//!
//! Device: on CUDA (a build with the `cuda` feature) the memory in use on the
//! GPU is the driver's total minus its free memory (`cuMemGetInfo`): this
//! process's context, tensors and allocator pool, and any other process on
//! the same GPU. The trainer samples it after each step's gradients exist
//! (weights, gradients, optimizer moments and what the step left cached),
//! and keeps the largest value of the epoch. Metal's is not measured.

use candle_core::Device;

/// Starts a new peak measurement; false when the platform cannot reset it.
pub fn reset_peak_rss() -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The peak resident set size in bytes since the last reset (or since the
/// process started), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_vm_hwm(&status)
    }
    #[cfg(target_os = "macos")]
    {
        // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
        // ru_maxrss is in bytes on macOS.
        ok.then_some(usage.ru_maxrss as u64)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        None
    }
}

/// Memory in use on `device` in bytes (see the module's note); `None` on the
/// CPU, on Metal, in a build without the `cuda` feature, or when the driver
/// does not answer.
pub fn device_bytes_in_use(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// `VmHWM:   123456 kB` -> bytes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_peak_line() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB"), None);
    }

    #[test]
    fn the_cpu_reports_no_device_memory() {
        assert_eq!(device_bytes_in_use(&Device::Cpu), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_allocation_raises_the_peak_and_a_reset_lowers_it() {
        reset_peak_rss();
        let before = peak_rss_bytes().unwrap();
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        let during = peak_rss_bytes().unwrap();
        assert!(during >= before + (200 << 20), "{before} -> {during}");
        drop(big);
        if reset_peak_rss() {
            assert!(peak_rss_bytes().unwrap() < during - (100 << 20));
        }
    }
}
