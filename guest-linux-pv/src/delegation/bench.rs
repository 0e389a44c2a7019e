//! `tandem.selftest=delegation-bench`: the figures of `cargo xtask bench --only delegation`,
//! one marker per measurement. Linux times its own system calls and reads; Lavender's
//! `dbench` program times the same operations delegated, and writes its figures to a file
//! under the served root (through delegation, after its timed part), which this module reads
//! back. Both clocks are the TSC (virtual time under Bochs).
//!
//! | marker | what |
//! |---|---|
//! | `delegation_bench_native` | Linux: ns per `getpid`, MB/s of 4 KiB and 1 MiB `pread`s of a cached file |
//! | `delegation_bench_idle` | what the idle service costs Linux over a window: the server's thread wake-ups and Linux's busy share, and whether the doorbell is on |
//! | `delegation_bench_null` | Lavender: ns per null delegated call for each of `processes` processes running at once, with `linux_cpus` Linux CPUs online; each process's median, 99th percentile and longest call and its calls over 300 µs and their time (µs); Linux: its service's calls, time and CPUs meanwhile, `null_slow`: the null calls it served slowly (over `SLOW`) and their TSC ticks, the null calls that said when they were sent and their ticks waiting for a worker, and those that waited long and their ticks, the pollers that moved off another's CPU, and its VM exits meanwhile by reason |
//! | `delegation_bench_service` | the same for one process with the service threads' polling set: `polled` (they never sleep between calls) or `doorbell` (they sleep after each call, so every request rings Linux's doorbell); the requests found after a doorbell and only by the safety net, the doorbell device's interrupts, and Linux's VM exits meanwhile by reason (from the hypervisor's stats page) |
//! | `delegation_bench_read` | Lavender: MB/s and calls of delegated 4 KiB and 1 MiB reads of the same files; Linux: the requests its workers found after a doorbell woke them, and the pollers that moved off another's CPU |
//! | `delegation_bench_done` | the end (`error` says what went wrong, if anything did) |
//!
//! With more than one Linux CPU, the concurrency series runs again with only CPU 0 online
//! (the others taken offline through sysfs and brought back after).

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::libc;

use super::selftest::Driver;
use super::{Control, Counters};
use crate::report;

/// The word that asks for this benchmark.
pub const WORD: &str = "tandem.selftest=delegation-bench";
/// `getpid`s Linux makes for its own figure.
const NATIVE_CALLS: u64 = 20_000;
/// Null calls each Lavender process makes.
const NULL_CALLS: u64 = 200;
/// Concurrent Lavender processes of the growth series.
pub const PROCESSES: [u64; 4] = [1, 2, 4, 6];
const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;
/// Rounds of each read size (Lavender; Linux does ten times as many).
const SMALL_ROUNDS: u64 = 100;
const LARGE_ROUNDS: u64 = 10;
/// What `dbench mode=null` reports of its calls' spread, in its line and in the marker: the
/// median, 99th percentile and longest call, the calls over 300 µs and their time (µs).
const SPREAD_KEYS: [&str; 5] = ["p50_us", "p99_us", "max_us", "slow_calls", "slow_us"];
/// The file whose making starts every `dbench` process of a run at once.
const START_FILE: &str = "dbench-start";

pub fn requested(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|word| word == WORD)
}

pub fn run(
    control: &mut Control,
    counters: &Counters,
    root: &Path,
    hypervisor: Option<&crate::control::Control>,
) {
    let result = (|| {
        let mut driver = Driver::new(control);
        fs::write(root.join("small.bin"), pattern(SMALL))
            .and_then(|()| fs::write(root.join("large.bin"), pattern(LARGE)))
            .map_err(|e| format!("writing the files: {e}"))?;
        native(root)?;
        idle()?;
        let cpus = crate::system::online_cpus();
        null_series(&mut driver, root, counters, cpus.len() as u64, hypervisor)?;
        service_paths(&mut driver, root, counters, cpus.len() as u64, hypervisor)?;
        reads(&mut driver, root, counters)?;
        if cpus.len() > 1 {
            let others = &cpus[1..];
            // The console sends what it holds before CPUs go offline: in some runs the serial
            // console went silent for good at this point, mid-marker (the benchmark finished
            // with its markers still in the tty's buffer), its transmit interrupt lost.
            let _ = nix::sys::termios::tcdrain(std::io::stdout().as_fd());
            set_online(others, false)?;
            let series = null_series(&mut driver, root, counters, 1, hypervisor);
            set_online(others, true)?;
            series?;
        }
        Ok::<_, String>(())
    })();
    report::emit(&report::marker("delegation_bench_done", |o| {
        if let Err(e) = &result {
            o.str("error", e);
        }
    }));
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + 7) as u8).collect()
}

/// Linux's own figures.
fn native(root: &Path) -> Result<(), String> {
    let started = Instant::now();
    for _ in 0..NATIVE_CALLS {
        // SAFETY: getpid takes no arguments and touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_getpid) };
    }
    let getpid_ns = started.elapsed().as_nanos() as u64 / NATIVE_CALLS;
    let small = read_rate(&root.join("small.bin"), SMALL, SMALL_ROUNDS * 10)?;
    let large = read_rate(&root.join("large.bin"), LARGE, LARGE_ROUNDS * 10)?;
    report::emit(&report::marker("delegation_bench_native", |o| {
        o.u64("calls", NATIVE_CALLS)
            .u64("getpid_ns", getpid_ns)
            .u64("read_4k_kb_per_s", small)
            .u64("read_1m_kb_per_s", large);
    }));
    Ok(())
}

/// How long the idle service is watched.
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// What the delegation service costs Linux while no Lavender process calls: the server's
/// threads' wake-ups (voluntary context switches, summed over its threads) and Linux's busy
/// share of its CPUs' time, over [`IDLE_WINDOW`].
fn idle() -> Result<(), String> {
    let server = super::server::pid().ok_or("no delegation server")?;
    let (switches_before, cpu_before) = (wake_ups(server.as_raw())?, cpu_times()?);
    let started = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let (switches_after, cpu_after) = (wake_ups(server.as_raw())?, cpu_times()?);
    let window_ms = started.elapsed().as_millis() as u64;
    let busy = cpu_after.0.saturating_sub(cpu_before.0);
    let total = cpu_after.1.saturating_sub(cpu_before.1).max(1);
    report::emit(&report::marker("delegation_bench_idle", |o| {
        o.u64("window_ms", window_ms)
            .u64(
                "server_wake_ups",
                switches_after.saturating_sub(switches_before),
            )
            .u64("linux_busy_permille", busy * 1000 / total)
            .bool("doorbell", crate::doorbell::listening());
    }));
    Ok(())
}

/// Voluntary context switches of every thread of process `pid`.
fn wake_ups(pid: i32) -> Result<u64, String> {
    let tasks = format!("/proc/{pid}/task");
    let mut sum = 0;
    for task in fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
        let status = fs::read_to_string(task.map_err(|e| e.to_string())?.path().join("status"))
            .unwrap_or_default();
        sum += status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(sum)
}

/// Linux's CPU time from `/proc/stat` in clock ticks: (busy, total); idle and iowait are
/// not busy.
fn cpu_times() -> Result<(u64, u64), String> {
    let stat = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .ok_or("/proc/stat has no `cpu` line")?
        .split_ascii_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// KB/s of `rounds` `pread`s of the first `block` bytes of `path`.
fn read_rate(path: &Path, block: usize, rounds: u64) -> Result<u64, String> {
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buffer = vec![0u8; block];
    file.read_exact_at(&mut buffer, 0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let started = Instant::now();
    for _ in 0..rounds {
        file.read_exact_at(&mut buffer, 0)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(kb_per_s(
        block as u64 * rounds,
        started.elapsed().as_micros() as u64,
    ))
}

fn kb_per_s(bytes: u64, us: u64) -> u64 {
    bytes * 1_000_000 / 1024 / us.max(1)
}

/// One `dbench` run's figures: `(calls, bytes, us)`.
struct Figures {
    calls: u64,
    bytes: u64,
    us: u64,
    /// Null calls: their spread, in the order of [`SPREAD_KEYS`].
    spread: Option<[u64; 5]>,
}

/// Runs `dbench` with `args` in `count` processes at once (each with an `out=` of its own)
/// and reads their figures. Starting a process takes Lavender and Linux milliseconds, longer
/// than one process's calls: the processes wait for [`START_FILE`], made once all are started,
/// so their calls overlap, and no start's work falls into another's timing.
fn dbench(
    driver: &mut Driver<'_>,
    root: &Path,
    args: &str,
    count: u64,
) -> Result<Vec<Figures>, String> {
    let outs: Vec<String> = (0..count).map(|i| format!("dbench-{i}.txt")).collect();
    let start = root.join(START_FILE);
    let _ = fs::remove_file(&start);
    let mut pids = Vec::new();
    for out in &outs {
        let _ = fs::remove_file(root.join(out));
        pids.push(driver.exec("dbench", &format!("{args} out={out} start={START_FILE}"))?);
    }
    fs::write(&start, b"").map_err(|e| format!("{}: {e}", start.display()))?;
    let statuses = driver.wait(&pids)?;
    if let Some(status) = statuses.iter().find(|status| **status != 0) {
        return Err(format!("dbench {args} exited with {status}"));
    }
    outs.iter()
        .map(|out| {
            let text = fs::read_to_string(root.join(out)).map_err(|e| format!("{out}: {e}"))?;
            let field = |key: &str| {
                text.split_whitespace()
                    .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|value| value.parse::<u64>().ok())
                    .ok_or_else(|| format!("{out}: no {key} in {text:?}"))
            };
            let spread = SPREAD_KEYS.map(|key| field(key).ok());
            Ok(Figures {
                calls: field("calls")?,
                bytes: field("bytes")?,
                us: field("us")?,
                spread: match spread {
                    [Some(p50), Some(p99), Some(max), Some(slow), Some(slow_us)] => {
                        Some([p50, p99, max, slow, slow_us])
                    }
                    _ => None,
                },
            })
        })
        .collect()
}

/// Null calls at each concurrency of [`PROCESSES`].
fn null_series(
    driver: &mut Driver<'_>,
    root: &Path,
    counters: &Counters,
    linux_cpus: u64,
    hypervisor: Option<&crate::control::Control>,
) -> Result<(), String> {
    for processes in PROCESSES {
        let before = Service::now(counters);
        let (figures, exits) = counting_exits(hypervisor, || {
            dbench(
                driver,
                root,
                &format!("mode=null calls={NULL_CALLS}"),
                processes,
            )
        });
        let figures = figures?;
        let service = Service::now(counters).since(&before);
        report::emit(&report::marker("delegation_bench_null", |o| {
            o.u64("linux_cpus", linux_cpus)
                .u64("service_calls", service.calls)
                .u64("service_ticks", service.ticks)
                .u64("pollers_moved", service.pollers_moved)
                .u64("found_by_fallback", service.found_by_fallback)
                .array("service_cpus", |a| {
                    for calls in &service.per_cpu {
                        a.u64(*calls);
                    }
                })
                .u64("processes", processes)
                .u64("calls", NULL_CALLS)
                .array("per_call_ns", |a| {
                    for f in &figures {
                        a.u64(f.us * 1000 / f.calls.max(1));
                    }
                })
                .array("null_slow", |a| {
                    for n in service.null_slow {
                        a.u64(n);
                    }
                });
            for (i, key) in SPREAD_KEYS.into_iter().enumerate() {
                o.array(key, |a| {
                    for spread in figures.iter().filter_map(|f| f.spread) {
                        a.u64(spread[i]);
                    }
                });
            }
            put_exits(o, exits.as_deref());
        }));
    }
    Ok(())
}

/// What the service did, as its counters say (calls, TSC ticks spent on them, calls per
/// Linux CPU, workers that moved off another's CPU, requests found after a doorbell).
struct Service {
    calls: u64,
    ticks: u64,
    /// Null calls served slowly and their ticks; null calls that said when they were sent
    /// and their ticks waiting for a worker; those that waited long and their ticks
    /// (`Counters::slow_null_services` and after).
    null_slow: [u64; 6],
    per_cpu: Vec<u64>,
    pollers_moved: u64,
    woken_by_doorbell: u64,
    found_by_fallback: u64,
    /// The doorbell device's interrupts (all of them: the count is the device's).
    interrupts: u32,
}

impl Service {
    fn now(counters: &Counters) -> Self {
        Self {
            calls: counters.calls.load(Ordering::Relaxed),
            ticks: counters.service_ticks.load(Ordering::Relaxed),
            null_slow: [
                &counters.slow_null_services,
                &counters.slow_null_service_ticks,
                &counters.null_waits,
                &counters.null_wait_ticks,
                &counters.slow_null_waits,
                &counters.slow_null_wait_ticks,
            ]
            .map(|n| n.load(Ordering::Relaxed)),
            per_cpu: counters
                .per_cpu
                .iter()
                .map(|calls| calls.load(Ordering::Relaxed))
                .collect(),
            pollers_moved: counters.pollers_moved.load(Ordering::Relaxed),
            woken_by_doorbell: counters.woken_by_doorbell.load(Ordering::Relaxed),
            found_by_fallback: counters.found_by_fallback.load(Ordering::Relaxed),
            interrupts: crate::doorbell::interrupts(),
        }
    }

    /// What it did since `before`, per CPU up to the highest CPU that served a call.
    fn since(&self, before: &Self) -> Self {
        let mut per_cpu: Vec<u64> = self
            .per_cpu
            .iter()
            .zip(&before.per_cpu)
            .map(|(now, then)| now - then)
            .collect();
        while per_cpu.last() == Some(&0) {
            per_cpu.pop();
        }
        Self {
            calls: self.calls - before.calls,
            ticks: self.ticks - before.ticks,
            null_slow: std::array::from_fn(|i| self.null_slow[i] - before.null_slow[i]),
            per_cpu,
            pollers_moved: self.pollers_moved - before.pollers_moved,
            woken_by_doorbell: self.woken_by_doorbell - before.woken_by_doorbell,
            found_by_fallback: self.found_by_fallback - before.found_by_fallback,
            interrupts: self.interrupts.wrapping_sub(before.interrupts),
        }
    }
}

/// The service threads' polling (µs) for the two paths of [`service_paths`]: longer than any
/// gap between two calls of one process (never sleeping), and next to none (every request
/// finds its thread asleep and rings the doorbell).
const SERVICE_PATHS: [(&str, u64); 2] = [("polled", 100_000), ("doorbell", 1)];

/// The null call of one process along each path of [`SERVICE_PATHS`], beside the default
/// polling of [`null_series`].
fn service_paths(
    driver: &mut Driver<'_>,
    root: &Path,
    counters: &Counters,
    linux_cpus: u64,
    hypervisor: Option<&crate::control::Control>,
) -> Result<(), String> {
    for (path, poll_us) in SERVICE_PATHS {
        counters
            .poll_us
            .store(poll_us, std::sync::atomic::Ordering::Relaxed);
        let before = Service::now(counters);
        let (figures, exits) = counting_exits(hypervisor, || {
            dbench(driver, root, &format!("mode=null calls={NULL_CALLS}"), 1)
        });
        let service = Service::now(counters).since(&before);
        counters
            .poll_us
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let f = &figures?[0];
        report::emit(&report::marker("delegation_bench_service", |o| {
            o.str("path", path)
                .u64("linux_cpus", linux_cpus)
                .u64("calls", NULL_CALLS)
                .u64("poll_us", poll_us)
                .u64("per_call_ns", f.us * 1000 / f.calls.max(1))
                .u64("woken_by_doorbell", service.woken_by_doorbell)
                .u64("found_by_fallback", service.found_by_fallback)
                .u64("interrupts", service.interrupts.into());
            put_exits(o, exits.as_deref());
        }));
    }
    Ok(())
}

/// Linux's VM exits by reason, as a hypervisor stats page lists them.
type Exits = Vec<(String, u64)>;

/// What `work` returned, with Linux's VM exits meanwhile (`None` without the hypervisor's
/// stats page).
fn counting_exits<T>(
    hypervisor: Option<&crate::control::Control>,
    work: impl FnOnce() -> T,
) -> (T, Option<Exits>) {
    let before = hypervisor.and_then(linux_exits);
    let done = work();
    let exits = before
        .zip(hypervisor.and_then(linux_exits))
        .map(|(before, after)| exits_since(&before, &after));
    (done, exits)
}

/// A marker's `linux_exits` object, when the exits were counted.
fn put_exits(
    o: &mut vmcall_proto::marker::JsonObject<'_, String>,
    exits: Option<&[(String, u64)]>,
) {
    if let Some(exits) = exits {
        o.object("linux_exits", |e| {
            for (reason, count) in exits {
                e.u64(reason, *count);
            }
        });
    }
}

/// Linux's VM exits so far by reason, from a fresh stats page of the hypervisor (`None` if
/// it cannot be had).
fn linux_exits(hypervisor: &crate::control::Control) -> Option<Exits> {
    let answer = crate::management::stats(hypervisor, false);
    let linux = answer["stats"]["guests"]
        .as_array()?
        .iter()
        .find(|guest| guest["name"] == "linux")?;
    linux["exits"]
        .as_array()?
        .iter()
        .map(|exit| {
            Some((
                exit["reason"].as_str()?.to_string(),
                exit["count"].as_u64()?,
            ))
        })
        .collect()
}

/// The exits of `after` less those of `before`, reasons with none left out.
fn exits_since(before: &[(String, u64)], after: &[(String, u64)]) -> Exits {
    after
        .iter()
        .map(|(reason, count)| {
            let then = before
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, c)| *c);
            (reason.clone(), count.saturating_sub(then))
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Delegated reads of both sizes into the program's own memory, and 1 MiB reads into its
/// window buffer (no copies).
fn reads(driver: &mut Driver<'_>, root: &Path, counters: &Counters) -> Result<(), String> {
    for (name, block, rounds, buffer) in [
        ("small.bin", SMALL, SMALL_ROUNDS, "own"),
        ("large.bin", LARGE, LARGE_ROUNDS, "own"),
        ("large.bin", LARGE, LARGE_ROUNDS, "window"),
    ] {
        let before = Service::now(counters);
        let figures = dbench(
            driver,
            root,
            &format!("mode=read path={name} block={block} rounds={rounds} buffer={buffer}"),
            1,
        )?;
        let service = Service::now(counters).since(&before);
        let f = &figures[0];
        report::emit(&report::marker("delegation_bench_read", |o| {
            o.u64("block", block as u64)
                .str("buffer", buffer)
                .u64("rounds", rounds)
                .u64("calls", f.calls)
                .u64("bytes", f.bytes)
                .u64("us", f.us)
                .u64("kb_per_s", kb_per_s(f.bytes, f.us))
                .u64("woken_by_doorbell", service.woken_by_doorbell)
                .u64("found_by_fallback", service.found_by_fallback)
                .u64("pollers_moved", service.pollers_moved);
        }));
    }
    Ok(())
}

/// Linux's online CPUs, CPU 0 first.
fn set_online(cpus: &[u32], online: bool) -> Result<(), String> {
    for &cpu in cpus {
        crate::hotplug::set_online(cpu as usize, online)?;
    }
    Ok(())
}
