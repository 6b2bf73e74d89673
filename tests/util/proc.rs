//! What /proc says of a process, and durations as table figures: shared by the tests
//! (`crate::util`) and the benches (`benches/common`, which includes this file).

use std::time::Duration;

/// A memory figure of process `pid` from /proc/PID/status, in KiB: `VmHWM` (the most it has
/// held), `VmRSS` (what it holds now). None once the process has exited.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`memory_kib`] in MiB.
pub fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    memory_kib(pid, field).map(|kib| kib as f64 / 1024.0)
}

/// A duration in milliseconds, fractions kept.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
