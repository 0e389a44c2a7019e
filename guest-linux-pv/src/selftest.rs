//! Self-tests the agent runs when the kernel command line asks for them, so end-to-end
//! scenarios can exercise Linux-side paths without typing into the shell.
//!
//! `tandem.selftest=cpu-hotplug:N`: takes the highest-numbered online CPU (not CPU 0)
//! offline and back online N times through `/sys/devices/system/cpu/cpuK/online`. After
//! each step it compares what Linux sees (`/proc/cpuinfo`) with what the hypervisor says
//! about that core (`QUERY_CORE`, a hypercall any privilege level may make): offline means
//! the core is held for Linux but not running (`granted`), online means `owned`. Each cycle
//! prints a `hotplug_cycle` marker, the end a `hotplug_done` marker.
//!
//! `tandem.selftest=hang:MS`: MS milliseconds after the agent is ready, Linux hangs as far as
//! anything outside it can tell: with the real-time throttle off, a `SCHED_FIFO` thread of
//! the highest priority spins on every online CPU, so no ordinary task (the agent's load
//! reporter included) runs again. Its `linux_hang` marker says when; the hypervisor's
//! watchdog (`watchdog_ms`) is what should notice.

use std::fs;
use std::time::{Duration, Instant};

use vmcall_proto::hypercall::{vmcall, CoreOwnership, CoreState, Hypercall};

use crate::report;

/// The command-line word that selects a self-test.
pub const SELFTEST_KEY: &str = "tandem.selftest";

/// How long the hypervisor's view may lag behind Linux's (the offlined CPU halts right
/// after it reports itself dead).
const SETTLE: Duration = Duration::from_secs(2);

/// The self-tests named on the command line: `cpu-hotplug:N` is the only one.
pub fn requested(cmdline: &str) -> Option<u32> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(SELFTEST_KEY)?.strip_prefix('='))
        .find_map(|test| test.strip_prefix("cpu-hotplug:")?.parse().ok())
        .filter(|cycles| (1..=1000).contains(cycles))
}

/// `tandem.selftest=hang:MS`: the delay before Linux hangs ([`hang`]).
pub fn hang_requested(cmdline: &str) -> Option<Duration> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(SELFTEST_KEY)?.strip_prefix('='))
        .find_map(|test| test.strip_prefix("hang:")?.parse().ok())
        .map(Duration::from_millis)
}

/// Hangs Linux after `delay` (on a thread of its own; see the module documentation).
pub fn hang(delay: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        // -1: real-time tasks may take all of a CPU's time (by default they leave 5%).
        if let Err(e) = fs::write("/proc/sys/kernel/sched_rt_runtime_us", "-1") {
            report::emit(&report::error("selftest", &e, |o| {
                o.str("test", "hang");
            }));
            return;
        }
        let cpus = crate::system::online_cpus();
        let tsc = crate::exec::tsc_now();
        report::emit(&report::marker("linux_hang", |o| {
            o.u64("tsc", tsc).array("cpus", |a| {
                for cpu in &cpus {
                    a.u64(u64::from(*cpu));
                }
            });
        }));
        for cpu in cpus {
            std::thread::spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                let pinned = set.set(cpu as usize).and_then(|()| {
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                });
                // The kernel's `struct sched_param` is one int, the priority.
                let priority: nix::libc::c_int = 99;
                // SAFETY: the system call reads one int at `&priority`, which lives on this
                // stack for the call, and changes only this thread's policy (pid 0).
                let fifo = unsafe {
                    nix::libc::syscall(
                        nix::libc::SYS_sched_setscheduler,
                        0,
                        nix::libc::SCHED_FIFO,
                        &priority as *const nix::libc::c_int,
                    )
                };
                if pinned.is_ok() && fifo == 0 {
                    loop {
                        std::hint::spin_loop();
                    }
                }
            });
        }
    });
}

/// Processor blocks of /proc/cpuinfo: (Linux CPU number, APIC ID).
pub fn parse_cpuinfo(text: &str) -> Vec<(u32, u32)> {
    let mut cpus = Vec::new();
    let mut current: Option<u32> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => current = value.trim().parse().ok(),
            "apicid" => {
                if let (Some(cpu), Ok(apic)) = (current, value.trim().parse()) {
                    cpus.push((cpu, apic));
                }
            }
            _ => {}
        }
    }
    cpus
}

fn state_name(state: CoreState) -> &'static str {
    match state {
        CoreState::Owned => "owned",
        CoreState::Releasing => "releasing",
        CoreState::Parked => "parked",
        CoreState::Granted => "granted",
    }
}

/// True when CPUID names the Tandem hypervisor (leaf 0x40000100), where VMCALL is defined.
fn under_tandem() -> bool {
    let leaf = core::arch::x86_64::__cpuid(0x4000_0100);
    let mut signature = [0u8; 12];
    for (chunk, word) in signature.chunks_mut(4).zip([leaf.ebx, leaf.ecx, leaf.edx]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    &signature == b"TandemHV\0\0\0\0"
}

/// The hypervisor's view of `core`.
fn query(core: u32) -> Result<CoreOwnership, String> {
    // SAFETY: called only after `under_tandem` confirmed we are a Tandem guest; QUERY_CORE
    // only reads the hypervisor's ownership table and returns values in registers.
    let result = unsafe { vmcall(Hypercall::QueryCore, [u64::from(core), 0, 0, 0, 0], 0) }
        .map_err(|e| format!("QUERY_CORE failed: {e:?}"))?;
    CoreOwnership::from_u64(result.results[0]).map_err(|e| format!("bad QUERY_CORE reply: {e:?}"))
}

fn set_online(cpu: u32, online: bool) -> Result<(), String> {
    crate::hotplug::set_online(cpu as usize, online)
}

fn cpuinfo() -> Result<Vec<(u32, u32)>, String> {
    fs::read_to_string("/proc/cpuinfo")
        .map(|t| parse_cpuinfo(&t))
        .map_err(|e| format!("/proc/cpuinfo: {e}"))
}

/// One side of a cycle: Linux's CPU count and the hypervisor's state once they agree (or
/// the settle time is over).
fn observe(
    core: u32,
    linux_cpus: usize,
    wanted: CoreState,
) -> Result<(usize, CoreState, bool), String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let seen = cpuinfo()?.len();
        let state = query(core)?.state;
        let agree = seen == linux_cpus && state == wanted;
        if agree || Instant::now() > deadline {
            return Ok((seen, state, agree));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the CPU offline/online self-test for `cycles` cycles.
pub fn cpu_hotplug(cycles: u32) {
    if let Err(reason) = run_cpu_hotplug(cycles) {
        report::emit(&report::error("selftest", &reason, |o| {
            o.str("test", "cpu-hotplug");
        }));
    }
}

fn run_cpu_hotplug(cycles: u32) -> Result<(), String> {
    if !under_tandem() {
        return Err("not running under the Tandem hypervisor (CPUID 0x40000100)".into());
    }
    let cpus = cpuinfo()?;
    let &(cpu, core) = cpus
        .iter()
        .filter(|(cpu, _)| *cpu != 0)
        .max()
        .ok_or("only CPU 0 is online")?;
    let total = cpus.len();
    let mut agreed = 0;
    for cycle in 1..=cycles {
        set_online(cpu, false)?;
        let (offline_cpus, offline_state, offline_ok) =
            observe(core, total - 1, CoreState::Granted)?;
        set_online(cpu, true)?;
        let (online_cpus, online_state, online_ok) = observe(core, total, CoreState::Owned)?;
        let agree = offline_ok && online_ok;
        agreed += u32::from(agree);
        report::emit(&report::marker("hotplug_cycle", |o| {
            o.u64("cycle", cycle.into())
                .u64("cpu", cpu.into())
                .u64("core", core.into())
                .bool("agree", agree);
            o.object("offline", |s| {
                s.u64("cpuinfo_cpus", offline_cpus as u64)
                    .str("hv_state", state_name(offline_state));
            });
            o.object("online", |s| {
                s.u64("cpuinfo_cpus", online_cpus as u64)
                    .str("hv_state", state_name(online_state));
            });
        }));
    }
    report::emit(&report::marker("hotplug_done", |o| {
        o.u64("cycles", cycles.into())
            .u64("agreed", agreed.into())
            .bool("ok", agreed == cycles);
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_word_is_parsed_strictly() {
        assert_eq!(
            requested("console=ttyS0 tandem.selftest=cpu-hotplug:10"),
            Some(10)
        );
        assert_eq!(requested("tandem.selftest=cpu-hotplug:0"), None);
        assert_eq!(requested("tandem.selftest=cpu-hotplug:x"), None);
        assert_eq!(requested("tandem.selftest=other:3"), None);
        assert_eq!(requested("quiet"), None);
    }

    #[test]
    fn cpuinfo_gives_cpu_and_apic_ids() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\napicid\t\t: 1\n\nprocessor\t: 1\napicid\t\t: 3\nflags\t\t: fpu\n";
        assert_eq!(parse_cpuinfo(text), [(0, 1), (1, 3)]);
        assert!(parse_cpuinfo("").is_empty());
    }
}
