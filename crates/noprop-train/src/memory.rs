//! Peak resident memory of the process, for the paper's Table 2 analogue.
//!
//! On Linux the peak (`VmHWM` in `/proc/self/status`) can be reset by writing
//! `5` to `/proc/self/clear_refs`, so each epoch's training peak is measured
//! on its own, without the evaluation that follows it. On macOS the peak is
//! `ru_maxrss` since the process started (it cannot be reset). Elsewhere it
//! is not measured. Device memory (CUDA, Metal) is not reported by candle and
//! is not included.

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
