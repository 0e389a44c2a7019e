//! Linux's load reports for the hypervisor's cooperative policy, from what a stock kernel
//! offers: runnable tasks (`/proc/loadavg`'s running count, the `procs_running` of
//! `/proc/stat`, without this reader), each online CPU's busy time (`/proc/stat`) and CPU
//! pressure (`/proc/pressure/cpu`, when the kernel has PSI on).
//!
//! The reporter looks every [`POLL`]; it reports when the runnable count, the online CPUs or
//! the pressure state changed (at most every [`MIN_SPACING`]) and otherwise every
//! [`HEARTBEAT`]. It wants one core per runnable task, and one more than it runs on while its
//! tasks wait for a CPU at least half the time (the pressure), within the cores Linux may hold: it
//! asks for more once that has lasted [`GROW_AFTER_US`], and offers the cores a mean of what
//! it wanted over [`SHRINK_MEAN_US`] no longer needs (the runnable count of an instant is
//! noisy: `vmcall_proto::demand`); a report whose request changed is followed by
//! `LOAD_REPORT_KICK`, so the hypervisor arbitrates at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_proto::cores::CoreId;
use vmcall_proto::demand::SteadyRequest;
use vmcall_proto::message::{LoadReport, Permille, WorkloadHint};

use crate::control::Control;
use crate::linux_load::{busy_permille, cpu_ticks, CpuTicks, KernelFile, StatusSampler};

/// How often the reporter looks at the kernel's counters: each look reads `/proc` files,
/// which at every millisecond kept an idle Linux's CPU well busy under Bochs (what the
/// `autonomous` policy then rightly saw); a step up passes after [`GROW_AFTER_US`] anyway.
const POLL: Duration = Duration::from_millis(5);
/// `/proc/stat` is read for a report at most this often; the reports between carry the busy
/// figures of the last reading. A look that reads it took 1.3 ms of a CPU under Bochs, about
/// twice one that does not, and a busy Linux's runnable count changes at nearly every look: a
/// kernel trace of the delegation benchmark showed the reporter taking 1.3 ms of a CPU every
/// 6.4 ms from the delegation service's pollers. The policies decide on the runnable count and
/// the request (and the hypervisor's own measurements); the busy figures are for the record
/// and `vmctl status`.
const STAT_EVERY: Duration = Duration::from_millis(50);
/// Reports on a change come at most this often.
const MIN_SPACING: Duration = Duration::from_millis(1);
/// A report at least this often.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A request for more cores is passed on once it lasted this long (µs): a management
/// command or a delegation thread runs for a few milliseconds and asks for nothing.
const GROW_AFTER_US: u64 = 5_000;
/// The time constant of the mean of the cores wanted that offers cores (µs): a shell loop
/// that forks or a server that waits a moment keeps its cores, and a management command
/// that runs for a few milliseconds (`vmctl`) does not withdraw an idle Linux's offer.
const SHRINK_MEAN_US: u64 = 50_000;

/// Runnable tasks the reports claim beyond what the kernel counts: 0, except while the policy
/// benchmark's over-reporting workload makes Linux a guest that asks for more than it uses
/// (`policy_bench`).
pub static OVERSTATE: AtomicU32 = AtomicU32::new(0);

/// Runnable tasks from `/proc/loadavg` (`0.00 0.01 0.05 R/T last_pid`): R, the tasks running
/// or ready, less `readers` (the tasks reading it, which run while they do).
pub fn runnable(loadavg: &str, readers: u32) -> Option<u32> {
    let field = loadavg.split_whitespace().nth(3)?;
    let running: u32 = field.split('/').next()?.parse().ok()?;
    Some(running.saturating_sub(readers))
}

/// The `some` line's `total=` (µs tasks waited for a CPU) of `/proc/pressure/cpu`.
pub fn pressure_total(psi: &str) -> Option<u64> {
    psi.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Cores Linux wants now: one per runnable task, and one more than it is `online` on when its
/// tasks waited for a CPU (`stalled`: `/proc/pressure/cpu`'s `some`, at least half the time
/// since the last look); at least one, at most the cores it may hold. The runnable count of an
/// instant misses tasks at times (two CPU-bound tasks on one CPU read as one, now and then),
/// which restarted the wait a request to grow must last; the kernel's stall time is its own
/// sum of the demand its CPUs did not meet.
pub fn wanted(runnable: u32, stalled: bool, online: u32, allowed: u32) -> u32 {
    let demand = if stalled {
        runnable.max(online.saturating_add(1))
    } else {
        runnable
    };
    demand.clamp(1, allowed.max(1))
}

/// Whether tasks waited for a CPU at least half of `interval_us`, from two readings of the
/// `some` stall total (µs).
pub fn stalled(before: Option<u64>, after: Option<u64>, interval_us: u64) -> bool {
    matches!((before, after), (Some(a), Some(b)) if b.saturating_sub(a).saturating_mul(2) >= interval_us.max(1))
}

/// Reports for good (run on a thread of its own); `cores` is the core behind each Linux CPU
/// number (`tandem.cores=`).
pub fn serve(control: Arc<Control>, cores: Vec<u64>) {
    let allowed = cores.len().max(1) as u32;
    let started = Instant::now();
    let mut last_sent: Option<(Instant, u32, u32, bool, i16)> = None;
    let mut steady = SteadyRequest::new(GROW_AFTER_US, SHRINK_MEAN_US);
    let mut status = StatusSampler::new();
    let open = |path: &str| KernelFile::open(path).map_err(|e| format!("{path}: {e}"));
    let (mut loadavg, mut online_file, mut stat_file) = match (
        open("/proc/loadavg"),
        open(crate::system::ONLINE),
        open("/proc/stat"),
    ) {
        (Ok(loadavg), Ok(online), Ok(stat)) => (loadavg, online, stat),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            crate::report::emit(&crate::report::error("load_report", &e, |_| {}));
            return;
        }
    };
    // Without PSI in the kernel there is no pressure to read.
    let mut pressure_file = KernelFile::open("/proc/pressure/cpu").ok();
    let mut last_times = stat_file.read().map(cpu_ticks).unwrap_or_default();
    // The busy figures of the last reading of `/proc/stat`, and the window they cover.
    let mut busy: Vec<(CoreId, Permille)> = Vec::new();
    let mut busy_window = Duration::ZERO;
    let mut last_pressure = None;
    let mut last_at = Instant::now();
    let mut last_look = Instant::now();
    loop {
        std::thread::sleep(POLL);
        let Some(runnable) = loadavg.read().ok().and_then(|l| runnable(l, 1)) else {
            continue;
        };
        let runnable = runnable.saturating_add(OVERSTATE.load(Ordering::Relaxed));
        let online = online_file
            .read()
            .map_or(1, |text| crate::system::cpu_list(text).len() as u32);
        let psi = pressure_file
            .as_mut()
            .and_then(|file| file.read().ok().map(str::to_owned));
        let pressure = psi.as_deref().and_then(pressure_total);
        let pressed = matches!((last_pressure, pressure), (Some(a), Some(b)) if b > a);
        let now = Instant::now();
        let stalled = stalled(
            last_pressure,
            pressure,
            (now - last_look).as_micros() as u64,
        );
        last_pressure = pressure;
        last_look = now;
        let asked = steady.steady(
            wanted(runnable, stalled, online, allowed),
            online,
            (now - started).as_micros() as u64,
        );
        let due = match last_sent {
            None => true,
            Some((at, r, o, p, q)) => {
                let changed = r != runnable || o != online || p != pressed || q != asked;
                now - at >= HEARTBEAT || (changed && now - at >= MIN_SPACING)
            }
        };
        if !due {
            continue;
        }
        let changed = last_sent.is_none_or(|(_, _, _, _, q)| q != asked);
        if busy.is_empty() || now - last_at >= STAT_EVERY {
            let stat = stat_file.read().unwrap_or_default();
            let times = cpu_ticks(stat);
            // The same reading feeds `vmctl status` (one sampler of the kernel's counters).
            status.observe(stat, psi.as_deref(), now);
            busy = busy_since(&last_times, &times, &cores);
            busy_window = now - last_at;
            last_times = times;
            last_at = now;
        }
        let mut report = LoadReport::new(
            started.elapsed().as_nanos() as u64,
            busy_window.as_micros().min(u128::from(u32::MAX)) as u32,
            runnable,
            asked,
        )
        .with_hint(WorkloadHint::Compute);
        for &(core, permille) in &busy {
            report.set_busy(core, permille);
        }
        last_sent = Some((now, runnable, online, pressed, asked));
        if control.send_report(&report).is_ok() && changed {
            control.kick();
        }
    }
}

/// Each core's busy share between two readings of `/proc/stat`'s CPU lines, for the CPUs in
/// both and behind a core of `cores` (`linux_load::busy_permille`'s shares; a CPU it gives none
/// for, no time having passed or its counters gone back, counts as idle).
fn busy_since(before: &[CpuTicks], after: &[CpuTicks], cores: &[u64]) -> Vec<(CoreId, Permille)> {
    let shares = busy_permille(before, after);
    after
        .iter()
        .filter(|now| before.iter().any(|then| then.0 == now.0))
        .filter_map(|&(cpu, ..)| {
            let core = cores.get(cpu as usize).and_then(|&c| CoreId::new(c))?;
            let share = shares.iter().find(|s| s.0 == cpu).map_or(0, |s| s.1);
            Some((core, Permille::new(share as u16).unwrap_or(Permille::FULL)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_shares_come_from_two_readings_of_the_cpus_behind_cores() {
        // CPU 0 is core 1, CPU 1 core 3; CPU 2 has no core, CPU 1 is missing before.
        let before = [(0, 100, 1000), (2, 0, 0)];
        let after = [(0, 150, 1100), (1, 10, 20), (2, 5, 10)];
        let core = |c| CoreId::new(c).unwrap();
        assert_eq!(
            busy_since(&before, &after, &[1, 3]),
            vec![(core(1), Permille::new(500).unwrap())]
        );
        // No time passed: idle, not a division by zero.
        assert_eq!(
            busy_since(&before, &before, &[1]),
            vec![(core(1), Permille::new(0).unwrap())]
        );
    }

    #[test]
    fn kernel_counters_parse() {
        assert_eq!(runnable("0.52 0.20 0.07 3/85 1234\n", 1), Some(2));
        assert_eq!(runnable("0.00 0.00 0.00 1/85 1\n", 1), Some(0));
        assert_eq!(runnable("garbage", 1), None);
        let psi = "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(pressure_total(psi), Some(12345));
        assert_eq!(pressure_total(""), None);
    }

    #[test]
    fn wants_a_core_per_runnable_task_within_its_cores() {
        assert_eq!(wanted(0, false, 1, 2), 1);
        assert_eq!(wanted(1, false, 1, 2), 1);
        assert_eq!(wanted(2, false, 1, 2), 2);
        assert_eq!(wanted(9, false, 2, 2), 2);
        assert_eq!(wanted(3, false, 1, 0), 1);
    }

    #[test]
    fn tasks_that_waited_for_a_cpu_want_one_more() {
        // Two CPU-bound tasks on one CPU read as one for an instant: the stall says two.
        assert_eq!(wanted(1, true, 1, 2), 2);
        assert_eq!(wanted(0, true, 1, 2), 2);
        // Never beyond the cores it may hold, and a larger count stands.
        assert_eq!(wanted(1, true, 2, 2), 2);
        assert_eq!(wanted(4, true, 1, 8), 4);
        // Half the time or more counts; a moment's wait (a command starting) does not.
        assert!(stalled(Some(100), Some(2_600), 5_000));
        assert!(!stalled(Some(100), Some(600), 5_000));
        assert!(!stalled(None, Some(9_000), 5_000));
        assert!(!stalled(Some(9_000), Some(100), 5_000));
    }
}
