//! Facts about the running kernel, read from procfs and sysfs: CPUs, uptime, release; and the
//! real-time priority of the agent's threads that a core move waits on.

use std::fmt;
use std::fs;
use std::io;

pub const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
pub const CPU_PRESENT: &str = "/sys/devices/system/cpu/present";
const UPTIME: &str = "/proc/uptime";
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// Highest CPU number accepted in a CPU list (the kernel's own `NR_CPUS` ceiling): bounds the
/// list a malformed file could make us build.
pub const MAX_CPU: u32 = 8191;

/// A CPU list (`0-3,8,10-11`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuListError(pub String);

impl fmt::Display for CpuListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed CPU list {:?}", self.0)
    }
}

/// Parses the kernel's CPU-list format (`Documentation/admin-guide/cputopology.rst`):
/// comma-separated numbers and inclusive ranges; an empty list is valid.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>, CpuListError> {
    let text = text.trim();
    let error = || CpuListError(text.chars().take(64).collect());
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (cpu_number(a), cpu_number(b)),
            None => (cpu_number(part), cpu_number(part)),
        };
        let (Some(first), Some(last)) = (first, last) else {
            return Err(error());
        };
        if first > last {
            return Err(error());
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn cpu_number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&n| n <= MAX_CPU)
}

/// `/proc/uptime`'s first field (seconds since boot, e.g. `4.27`) in milliseconds.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds = text.split_whitespace().next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) {
        return None;
    }
    let millis: String = fraction.chars().chain("000".chars()).take(3).collect();
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis.parse().ok()?)
}

/// Milliseconds since the kernel booted.
pub fn uptime_ms() -> io::Result<u64> {
    let text = fs::read_to_string(UPTIME)?;
    parse_uptime_ms(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{UPTIME}: unexpected content {text:?}"),
        )
    })
}

/// `uname -r`.
pub fn kernel_release() -> io::Result<String> {
    Ok(fs::read_to_string(OSRELEASE)?.trim().to_string())
}

/// The CPUs online (the kernel's list text, e.g. `0-1`) and present (as numbers).
pub struct Cpus {
    pub online: String,
    pub present: Vec<u32>,
}

/// The file of the online CPUs' numbers.
pub const ONLINE: &str = "/sys/devices/system/cpu/online";

/// The online CPUs' numbers ([`ONLINE`]).
pub fn online_cpus() -> Vec<u32> {
    cpu_list(&fs::read_to_string(ONLINE).unwrap_or_default())
}

/// The CPU numbers of a kernel CPU list (`0-1,3`).
pub fn cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for range in text.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        if let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>()) {
            cpus.extend(first..=last);
        }
    }
    cpus
}

pub fn cpus() -> Result<Cpus, String> {
    let read = |path: &str| fs::read_to_string(path).map_err(|e| format!("{path}: {e}"));
    let online = read(CPU_ONLINE)?.trim().to_string();
    let present = parse_cpulist(&read(CPU_PRESENT)?).map_err(|e| format!("{CPU_PRESENT}: {e}"))?;
    Ok(Cpus { online, present })
}

/// The `SCHED_FIFO` priority of the threads a core move waits on (the lowest real-time one:
/// they preempt ordinary tasks, a CPU load included, and nothing real-time of Linux's own).
const MOVE_PRIORITY: i32 = 1;

/// Puts the calling thread in `SCHED_FIFO` at [`MOVE_PRIORITY`]: the hotplug actor and the
/// doorbell listeners. They sleep until there is work and then make blocking system calls,
/// so they never hold a CPU for long. Under a CPU load an ordinary thread woken
/// for a revoke waited its turn behind the load (several milliseconds of a move under Bochs).
pub fn run_ahead_of_ordinary_tasks() -> Result<(), String> {
    let priority: nix::libc::c_int = MOVE_PRIORITY;
    // SAFETY: `sched_setscheduler(0, SCHED_FIFO, &param)` changes only the calling thread's
    // policy; `param` is a live `c_int`, which is all `struct sched_param` holds, and the
    // kernel only reads it during the call.
    let result = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_sched_setscheduler,
            0,
            nix::libc::SCHED_FIFO,
            &priority as *const nix::libc::c_int,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(format!(
            "sched_setscheduler(SCHED_FIFO, {MOVE_PRIORITY}): {}",
            io::Error::last_os_error()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpulist("0-1\n"), Ok(vec![0, 1]));
        assert_eq!(parse_cpulist("0,2-4,9"), Ok(vec![0, 2, 3, 4, 9]));
        assert_eq!(parse_cpulist("3,1-2,2"), Ok(vec![1, 2, 3]));
        assert_eq!(parse_cpulist("\n"), Ok(vec![]));
        for bad in [
            "-",
            "1-",
            "-1",
            "2-1",
            "a",
            "1,,2",
            "0-8192",
            "99999999999",
            "+1",
        ] {
            assert!(parse_cpulist(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uptimes() {
        assert_eq!(parse_uptime_ms("4.27 7.80\n"), Some(4270));
        assert_eq!(parse_uptime_ms("12 1"), Some(12_000));
        assert_eq!(parse_uptime_ms("0.5"), Some(500));
        assert_eq!(parse_uptime_ms("1.23456"), Some(1234));
        for bad in ["", "x", ".5", "1.-2", "-1.0", "99999999999999999999.0"] {
            assert_eq!(parse_uptime_ms(bad), None, "{bad}");
        }
    }
}
