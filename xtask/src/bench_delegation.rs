//! `cargo xtask bench --only delegation`: system-call delegation's figures under Bochs.
//!
//! Boots `tests/configs/delegation-bench.toml`, whose Linux command line asks the PV agent
//! for its delegation benchmark (`guest-linux-pv/src/delegation/bench.rs`): Linux times its
//! own `getpid` and `pread`s, then Lavender's `dbench` program times the same operations
//! delegated, in 1, 2, 4 and 6 processes at once, with every Linux CPU the configuration
//! gives and then with one. Both guests time with the TSC; Bochs runs with
//! `clock: sync=none`, so the time is virtual and deterministic for the emulator settings,
//! which the report names. Nothing here passes or fails on a figure.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::emulator::Port;
use crate::marker::Marker;
use crate::partitions::BuildMachine;
use crate::session::Outcome;

/// The configuration booted.
const CONFIG: &str = "delegation-bench";
/// Linux's 3 CPUs and a Lavender core for each of the 6 processes of the concurrency series,
/// so the growth is Linux's service alone, as in the measurement the issue compares with,
/// not Lavender's processes queueing for one core.
const MACHINE: BuildMachine = BuildMachine {
    cpus: 9,
    memory_mib: 1024,
};
/// The longest the run may take (wall time; a Linux boot is about 3 minutes of it).
const TIMEOUT: Duration = Duration::from_secs(2400);
/// How often a quiet run says it is still going.
const QUIET: Duration = Duration::from_secs(30);
/// Markers that mean the run went wrong.
const BAD_EVENTS: [&str; 5] = [
    "agent_error",
    "guest_stopped",
    "process_fault",
    "lavender_panic",
    "fatal",
];

/// The report, the problems seen (the figures are suspect then) and the JSON to save.
pub struct DelegationResult {
    pub report: String,
    pub problems: Vec<String>,
    pub json: Value,
}

fn config_path() -> PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("configs")
        .join(format!("{CONFIG}.toml"))
}

pub fn run() -> Result<DelegationResult> {
    let config = config_path();
    println!("==> bench delegation: {} under Bochs", config.display());
    let machine = MACHINE;
    let mut session = crate::bench::boot_on(machine, "delegation", &config, String::new())?;
    let logs = session.run_dir().path().to_path_buf();
    println!(
        "==> booting under Bochs ({} CPUs, {} MiB; Linux takes about 3 minutes to boot, the \
         benchmark a few more); logs in {}",
        machine.cpus,
        machine.memory_mib,
        logs.display()
    );
    // The emulator runs in a process group of its own, so Ctrl-C reaches only us.
    let interrupted = crate::bench::interrupted()?;
    let started = Instant::now();
    let mut seen = 0;
    // When progress was last printed; both callbacks print, the session calls them in turn.
    let said = std::cell::Cell::new(Instant::now());
    let say = |what: &str| {
        println!("    {:>4.0}s  {what}", started.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
        said.set(Instant::now());
    };
    let outcome = session.watch(
        |markers| {
            for marker in &markers[seen..] {
                let what = match marker.ev() {
                    "agent_ready" => Some("Linux's agent is up".to_string()),
                    "delegation_bench_native" => Some("Linux's own figures taken".into()),
                    "delegation_bench_null" => Some(format!(
                        "null calls: {} process(es), {} Linux CPU(s)",
                        marker.value["processes"], marker.value["linux_cpus"]
                    )),
                    "delegation_bench_read" => {
                        Some(format!("reads of {} bytes", marker.value["block"]))
                    }
                    "delegation_bench_idle" => Some("the idle service's cost taken".into()),
                    "delegation_bench_service" => Some(format!(
                        "null calls along the service's {} path",
                        marker.value["path"].as_str().unwrap_or("?")
                    )),
                    _ => None,
                };
                if let Some(what) = what {
                    say(&what);
                }
            }
            seen = markers.len();
            markers
                .iter()
                .any(|m| m.ev() == "delegation_bench_done" || BAD_EVENTS.contains(&m.ev()))
        },
        Some(TIMEOUT),
        &interrupted,
        |_, _| {
            if said.get().elapsed() >= QUIET {
                say("still running");
            }
        },
    )?;
    session.stop()?;
    let wall = started.elapsed();
    if outcome != Outcome::Satisfied {
        bail!(
            "the delegation benchmark did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    let markers = session.markers();
    let mut problems = crate::bench::unexpected_markers(markers, &BAD_EVENTS);
    if let Some(error) = single(markers, "delegation_bench_done")
        .ok()
        .and_then(|done| done["error"].as_str().map(str::to_string))
    {
        problems.push(format!("the benchmark stopped: {error}"));
    }
    let bochsrc = std::fs::read_to_string(session.run_dir().file("bochsrc"))
        .context("reading the run's bochsrc")?;
    let figures = Figures::from_markers(markers).with_context(|| {
        format!(
            "reading the benchmark's markers (logs in {})",
            logs.display()
        )
    });
    let figures = match figures {
        Ok(figures) => figures,
        Err(e) if !problems.is_empty() => bail!("{e:#}; {}", problems.join("; ")),
        Err(e) => return Err(e),
    };
    let settings = emulator_settings(&bochsrc);
    let mut report = format!(
        "delegation: time is the TSC, virtual: Bochs {settings} (from the run's bochsrc); \
         Linux on 3 CPUs, Lavender on 6 (a core for each process of the largest run); the \
         processes of a run start their calls together\n"
    );
    report.push_str(&figures.table());
    let json = json!({
        "clock": {"source": "tsc", "virtual": true, "emulator": settings},
        "config": config.display().to_string(),
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "run_dir": logs,
        "problems": problems,
        "figures": figures.to_json(),
    });
    Ok(DelegationResult {
        report,
        problems,
        json,
    })
}

/// The `cpu:` and `clock:` lines of the bochsrc, as written.
fn emulator_settings(bochsrc: &str) -> String {
    bochsrc
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("cpu:") || line.starts_with("clock:"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn single<'a>(markers: &'a [Marker], ev: &str) -> Result<&'a Value> {
    let mut found = markers
        .iter()
        .filter(|m| m.ev() == ev && m.port == Port::Com1);
    match (found.next(), found.next()) {
        (Some(marker), None) => Ok(&marker.value),
        (None, _) => bail!("no `{ev}` marker"),
        (Some(_), Some(_)) => bail!("more than one `{ev}` marker"),
    }
}

fn number(value: &Value, key: &str) -> Result<u64> {
    value[key]
        .as_u64()
        .with_context(|| format!("`{key}` is not a number in {value}"))
}

/// Mean ns per null call of the processes that ran at once.
#[derive(Debug, Clone, PartialEq)]
struct NullRun {
    linux_cpus: u64,
    processes: u64,
    per_call_ns: Vec<u64>,
    /// Linux's service: the calls its workers served during the run and the TSC ticks they
    /// spent on them, from taking a request to its reply (absent in runs of older agents).
    service: Option<(u64, u64)>,
    /// Times a Linux worker moved itself off a CPU another poller held (absent in runs of
    /// older agents).
    pollers_moved: Option<u64>,
    /// Null calls made in all (every process's).
    calls: u64,
    /// Each process's median and longest call (µs; empty in runs of older agents).
    p50_us: Vec<u64>,
    max_us: Vec<u64>,
    /// What Linux's service saw of the null calls (absent in runs of older agents).
    linux_null: Option<LinuxNullCalls>,
    /// Each process's calls over 300 µs and their µs in all (empty in runs of older agents).
    slow_calls: Vec<u64>,
    slow_us: Vec<u64>,
    /// Linux's VM exits during the run (none in runs of older agents).
    linux_exits: LinuxExits,
}

impl NullRun {
    fn mean_ns(&self) -> f64 {
        self.per_call_ns.iter().sum::<u64>() as f64 / self.per_call_ns.len().max(1) as f64
    }

    /// The processes' median calls, averaged (µs; none if not reported).
    fn median_us(&self) -> Option<f64> {
        (!self.p50_us.is_empty())
            .then(|| self.p50_us.iter().sum::<u64>() as f64 / self.p50_us.len() as f64)
    }

    /// Linux's service time per call, ns, with the TSC at `tsc_hz`.
    fn service_ns(&self, tsc_hz: u64) -> Option<f64> {
        let (calls, ticks) = self.service?;
        (calls > 0 && tsc_hz > 0).then(|| ticks as f64 * 1e9 / tsc_hz as f64 / calls as f64)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ReadRun {
    block: u64,
    /// Where the data went: `own` (the program's memory: the kernel copies it once) or
    /// `window` (its window buffer: no copies). Runs of older agents say nothing: `own`.
    buffer: String,
    calls: u64,
    kb_per_s: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct Figures {
    /// What the idle service cost Linux (absent in runs of agents without it).
    idle: Option<Idle>,
    /// The null call along the service's `polled` and `doorbell` paths (absent likewise).
    service_paths: Vec<ServicePath>,
    native_getpid_ns: u64,
    native_read_4k_kb_per_s: u64,
    native_read_1m_kb_per_s: u64,
    null: Vec<NullRun>,
    reads: Vec<ReadRun>,
    /// The TSC's rate, from the hypervisor's `boot_report` (absent: no service times).
    tsc_hz: Option<u64>,
}

/// `delegation_bench_service`: one process's null calls along one path of the service.
#[derive(Debug, Clone, PartialEq)]
struct ServicePath {
    path: String,
    null_ns: u64,
    /// Requests a service thread found only when its doorbell safety net ran out: doorbells
    /// that woke no one (absent in runs of agents that did not count them).
    found_by_fallback: Option<u64>,
    calls: u64,
    /// Linux's VM exits during the series.
    linux_exits: LinuxExits,
}

/// What Linux's service saw of a run's null calls (TSC ticks): those it served slowly (over
/// 300 µs) and their ticks; those that said when they were sent and their ticks waiting for
/// a worker; those that waited long and their ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LinuxNullCalls {
    slow_services: u64,
    slow_service_ticks: u64,
    waits: u64,
    wait_ticks: u64,
    slow_waits: u64,
    slow_wait_ticks: u64,
}

impl LinuxNullCalls {
    /// A marker's `null_slow` array.
    fn of(marker: &Value) -> Option<Self> {
        let n: Vec<u64> = marker["null_slow"]
            .as_array()?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()?;
        let [slow_services, slow_service_ticks, waits, wait_ticks, slow_waits, slow_wait_ticks] =
            n[..]
        else {
            return None;
        };
        Some(Self {
            slow_services,
            slow_service_ticks,
            waits,
            wait_ticks,
            slow_waits,
            slow_wait_ticks,
        })
    }

    /// The mean wait for a worker, µs, with the TSC at `tsc_hz`.
    fn mean_wait_us(&self, tsc_hz: u64) -> Option<f64> {
        (self.waits > 0 && tsc_hz > 0)
            .then(|| self.wait_ticks as f64 * 1e6 / tsc_hz as f64 / self.waits as f64)
    }
}

/// Linux's VM exits during a series, by reason, most first (empty if not reported).
#[derive(Debug, Clone, PartialEq, Default)]
struct LinuxExits(Vec<(String, u64)>);

impl LinuxExits {
    /// A marker's `linux_exits` object.
    fn of(marker: &Value) -> Self {
        let mut exits: Vec<(String, u64)> = marker["linux_exits"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(reason, n)| Some((reason.clone(), n.as_u64()?)))
            .collect();
        exits.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Self(exits)
    }

    /// All of them per call, over `calls` calls (none if not reported).
    fn per_call(&self, calls: u64) -> Option<f64> {
        let total: u64 = self.0.iter().map(|(_, n)| n).sum();
        (total > 0).then(|| total as f64 / calls.max(1) as f64)
    }

    /// All of them per call and the three commonest reasons (none if not reported).
    fn summary(&self, calls: u64) -> Option<String> {
        let all = self.per_call(calls)?;
        let reasons: Vec<String> = self
            .0
            .iter()
            .take(3)
            .map(|(reason, n)| format!("{reason} {:.1}", *n as f64 / calls.max(1) as f64))
            .collect();
        Some(format!("{all:.1}: {}", reasons.join(", ")))
    }

    fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(reason, n)| (reason.clone(), json!(n)))
                .collect(),
        )
    }
}

/// `delegation_bench_idle`: the server's wake-ups and Linux's busy share over a window.
#[derive(Debug, Clone, PartialEq)]
struct Idle {
    window_ms: u64,
    server_wake_ups: u64,
    linux_busy_permille: u64,
    doorbell: bool,
}

impl Figures {
    fn from_markers(markers: &[Marker]) -> Result<Figures> {
        let native = single(markers, "delegation_bench_native")?;
        let idle = match markers.iter().find(|m| m.ev() == "delegation_bench_idle") {
            None => None,
            Some(m) => Some(Idle {
                window_ms: number(&m.value, "window_ms")?,
                server_wake_ups: number(&m.value, "server_wake_ups")?,
                linux_busy_permille: number(&m.value, "linux_busy_permille")?,
                doorbell: m.value["doorbell"] == true,
            }),
        };
        let null = markers
            .iter()
            .filter(|m| m.ev() == "delegation_bench_null")
            .map(|m| {
                let per_call_ns = m.value["per_call_ns"]
                    .as_array()
                    .context("`per_call_ns` is not an array")?
                    .iter()
                    .map(|ns| ns.as_u64().context("a per-call time is not a number"))
                    .collect::<Result<Vec<_>>>()?;
                let processes = number(&m.value, "processes")?;
                let list = |key: &str| -> Vec<u64> {
                    m.value[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .collect()
                };
                Ok(NullRun {
                    p50_us: list("p50_us"),
                    max_us: list("max_us"),
                    slow_calls: list("slow_calls"),
                    slow_us: list("slow_us"),
                    linux_null: LinuxNullCalls::of(&m.value),
                    linux_cpus: number(&m.value, "linux_cpus")?,
                    processes,
                    calls: number(&m.value, "calls")? * processes,
                    linux_exits: LinuxExits::of(&m.value),
                    per_call_ns,
                    service: m.value["service_calls"]
                        .as_u64()
                        .zip(m.value["service_ticks"].as_u64()),
                    pollers_moved: m.value["pollers_moved"].as_u64(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let reads = markers
            .iter()
            .filter(|m| m.ev() == "delegation_bench_read")
            .map(|m| {
                Ok(ReadRun {
                    block: number(&m.value, "block")?,
                    buffer: m.value["buffer"].as_str().unwrap_or("own").to_string(),
                    calls: number(&m.value, "calls")?,
                    kb_per_s: number(&m.value, "kb_per_s")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if null.is_empty() {
            bail!("no `delegation_bench_null` marker");
        }
        let service_paths = markers
            .iter()
            .filter(|m| m.ev() == "delegation_bench_service")
            .map(|m| {
                let path = m.value["path"].as_str().context("`path` is not a string")?;
                Ok(ServicePath {
                    path: path.to_string(),
                    null_ns: number(&m.value, "per_call_ns")?,
                    found_by_fallback: m.value["found_by_fallback"].as_u64(),
                    calls: number(&m.value, "calls")?,
                    linux_exits: LinuxExits::of(&m.value),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Figures {
            idle,
            service_paths,
            native_getpid_ns: number(native, "getpid_ns")?,
            native_read_4k_kb_per_s: number(native, "read_4k_kb_per_s")?,
            native_read_1m_kb_per_s: number(native, "read_1m_kb_per_s")?,
            null,
            reads,
            tsc_hz: markers
                .iter()
                .find(|m| m.ev() == "boot_report")
                .and_then(|m| m.value["cpu"]["tsc_hz"].as_u64()),
        })
    }

    /// The Linux CPU counts measured, most first.
    fn cpu_counts(&self) -> Vec<u64> {
        let mut counts: Vec<u64> = self.null.iter().map(|run| run.linux_cpus).collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts.dedup();
        counts
    }

    /// Mean round trip with `processes` at once over that with one, on `linux_cpus`.
    fn growth(&self, linux_cpus: u64, processes: u64) -> Option<f64> {
        self.growth_of(linux_cpus, processes, |run| Some(run.mean_ns()))
    }

    /// The median call with `processes` processes over the median with one, same Linux CPUs.
    fn median_growth(&self, linux_cpus: u64, processes: u64) -> Option<f64> {
        self.growth_of(linux_cpus, processes, NullRun::median_us)
    }

    /// `measure` of the run with `processes` processes over its value with one, same Linux
    /// CPUs.
    fn growth_of(
        &self,
        linux_cpus: u64,
        processes: u64,
        measure: impl Fn(&NullRun) -> Option<f64>,
    ) -> Option<f64> {
        let of = |processes| {
            self.null
                .iter()
                .find(|run| run.linux_cpus == linux_cpus && run.processes == processes)
                .and_then(&measure)
        };
        Some(of(processes)? / of(1)?)
    }

    fn native_read(&self, block: u64) -> Option<u64> {
        match block {
            4096 => Some(self.native_read_4k_kb_per_s),
            1_048_576 => Some(self.native_read_1m_kb_per_s),
            _ => None,
        }
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let cpus = self.cpu_counts();
        if let Some(single) = self
            .null
            .iter()
            .find(|run| run.processes == 1 && Some(&run.linux_cpus) == cpus.first())
        {
            out.push_str(&format!(
                "null call: delegated {:.0} ns (1 process, {} Linux CPUs), native Linux getpid {} ns: {:.1}x\n",
                single.mean_ns(),
                single.linux_cpus,
                self.native_getpid_ns,
                single.mean_ns() / self.native_getpid_ns.max(1) as f64
            ));
        }
        for service in &self.service_paths {
            out.push_str(&format!(
                "null call, 1 process, the service's {} path: {} ns: {:.1}x getpid\n",
                service.path,
                service.null_ns,
                service.null_ns as f64 / self.native_getpid_ns.max(1) as f64
            ));
            if let Some(exits) = service.linux_exits.summary(service.calls) {
                out.push_str(&format!("  Linux's VM exits per call {exits}\n"));
            }
            if let Some(n) = service.found_by_fallback.filter(|&n| n > 0) {
                out.push_str(&format!(
                    "  {n} requests found only by the workers' safety net: their doorbells woke no one\n"
                ));
            }
        }
        if let Some(idle) = &self.idle {
            out.push_str(&format!(
                "idle service ({}): {:.0} server thread wake-ups per second, Linux {:.1}% busy, over {} ms\n",
                if idle.doorbell { "doorbell" } else { "polling, no doorbell" },
                idle.server_wake_ups as f64 * 1000.0 / idle.window_ms.max(1) as f64,
                idle.linux_busy_permille as f64 / 10.0,
                idle.window_ms
            ));
        }
        out.push_str("round trip with P processes at once (mean ns per call; growth over P=1)\n");
        let processes: Vec<u64> = {
            let mut p: Vec<u64> = self.null.iter().map(|run| run.processes).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        out.push_str(&format!("  {:<11}", "Linux CPUs"));
        for p in &processes {
            out.push_str(&format!("{:>18}", format!("P={p}")));
        }
        out.push('\n');
        out.push_str(&self.null_rows(&cpus, &processes, |run| {
            let growth = self
                .growth(run.linux_cpus, run.processes)
                .unwrap_or(f64::NAN);
            Some(format!("{:.0} ns {growth:.2}x", run.mean_ns()))
        }));
        if self.null.iter().any(|run| run.median_us().is_some()) {
            out.push_str(
                "the median call (µs, the processes' medians averaged; growth over P=1) and the \
                 longest call of any process\n",
            );
            out.push_str(&self.null_rows(&cpus, &processes, |run| {
                let median = run.median_us()?;
                let growth = self
                    .median_growth(run.linux_cpus, run.processes)
                    .unwrap_or(f64::NAN);
                let longest = run.max_us.iter().max().copied().unwrap_or(0);
                Some(format!("{median:.0} {growth:.2}x {longest}"))
            }));
        }
        if let Some(tsc_hz) = self
            .tsc_hz
            .filter(|_| self.null.iter().any(|r| r.service.is_some()))
        {
            out.push_str(
                "Linux's service per call (ns, from taking the request to its reply; the rest of \
                 the round trip is Lavender's and the waits between)\n",
            );
            out.push_str(&self.null_rows(&cpus, &processes, |run| {
                run.service_ns(tsc_hz).map(|ns| format!("{ns:.0} ns"))
            }));
        }
        if self.null.iter().any(|run| !run.slow_calls.is_empty()) {
            out.push_str(&self.slow_null_calls(&cpus, &processes));
        }
        if self
            .null
            .iter()
            .any(|run| run.linux_exits.per_call(1).is_some())
        {
            out.push_str(
                "Linux's VM exits per call (all of Linux's exits during the run, over its calls)\n",
            );
            out.push_str(&self.null_rows(&cpus, &processes, |run| {
                run.linux_exits
                    .per_call(run.calls)
                    .map(|exits| format!("{exits:.1}"))
            }));
        }
        out.push_str("reads of one cached file (KB/s)\n");
        out.push_str(&format!(
            "  {:<9}{:<16}{:>14}{:>14}{:>10}{:>16}\n",
            "block", "into", "native", "delegated", "ratio", "calls in all"
        ));
        for read in &self.reads {
            let native = self.native_read(read.block).unwrap_or(0);
            out.push_str(&format!(
                "  {:<9}{:<16}{:>14}{:>14}{:>9.0}%{:>16}\n",
                if read.block >= 1 << 20 {
                    format!("{} MiB", read.block >> 20)
                } else {
                    format!("{} KiB", read.block >> 10)
                },
                if read.buffer == "window" {
                    "window buffer"
                } else {
                    "own memory"
                },
                native,
                read.kb_per_s,
                read.kb_per_s as f64 * 100.0 / native.max(1) as f64,
                read.calls,
            ));
        }
        out
    }

    /// The slow null calls (over 300 µs: how many, ms in all) as Lavender timed them, and
    /// where Linux saw them: its service, the wait for a worker; and the mean wait.
    fn slow_null_calls(&self, cpus: &[u64], processes: &[u64]) -> String {
        let slow = |count: u64, ms: f64| format!("{count}, {ms:.1}");
        let mut out = String::from("slow null calls (over 300 µs: how many, ms in all)\n");
        out.push_str("  as Lavender's processes timed them\n");
        out.push_str(&self.null_rows(cpus, processes, |run| {
            (!run.slow_calls.is_empty()).then(|| {
                let us: u64 = run.slow_us.iter().sum();
                slow(run.slow_calls.iter().sum(), us as f64 / 1e3)
            })
        }));
        let hz = self.tsc_hz.unwrap_or(0);
        if hz == 0 || self.null.iter().all(|run| run.linux_null.is_none()) {
            return out;
        }
        type Slow = fn(&LinuxNullCalls) -> (u64, u64);
        let rows: [(&str, Slow); 2] = [
            ("  Linux's service of them\n", |l| {
                (l.slow_services, l.slow_service_ticks)
            }),
            (
                "  their wait for a Linux worker (from Lavender's sending to the take)\n",
                |l| (l.slow_waits, l.slow_wait_ticks),
            ),
        ];
        for (title, of) in rows {
            out.push_str(title);
            out.push_str(&self.null_rows(cpus, processes, |run| {
                let (count, ticks) = of(&run.linux_null?);
                Some(slow(count, ticks as f64 * 1e3 / hz as f64))
            }));
        }
        out.push_str("the mean wait for a Linux worker (µs)\n");
        out.push_str(&self.null_rows(cpus, processes, |run| {
            run.linux_null?
                .mean_wait_us(hz)
                .map(|us| format!("{us:.1}"))
        }));
        out
    }

    /// A row per Linux CPU count, a column per process count, each cell `cell` of the null
    /// run there (`-` for none).
    fn null_rows(
        &self,
        cpus: &[u64],
        processes: &[u64],
        cell: impl Fn(&NullRun) -> Option<String>,
    ) -> String {
        let mut out = String::new();
        for linux_cpus in cpus {
            out.push_str(&format!("  {linux_cpus:<11}"));
            for p in processes {
                let text = self
                    .null
                    .iter()
                    .find(|run| run.linux_cpus == *linux_cpus && run.processes == *p)
                    .and_then(&cell)
                    .unwrap_or_else(|| "-".into());
                out.push_str(&format!("{text:>18}"));
            }
            out.push('\n');
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "service_paths": self.service_paths.iter().map(|path| json!({
                "path": path.path,
                "null_ns": path.null_ns,
                "found_by_fallback": path.found_by_fallback,
                "linux_exits": path.linux_exits.to_json(),
            })).collect::<Vec<_>>(),
            "idle": self.idle.as_ref().map(|idle| json!({
                "window_ms": idle.window_ms,
                "server_wake_ups": idle.server_wake_ups,
                "linux_busy_permille": idle.linux_busy_permille,
                "doorbell": idle.doorbell,
            })),
            "native": {
                "getpid_ns": self.native_getpid_ns,
                "read_4k_kb_per_s": self.native_read_4k_kb_per_s,
                "read_1m_kb_per_s": self.native_read_1m_kb_per_s,
            },
            "null": self.null.iter().map(|run| json!({
                "linux_cpus": run.linux_cpus,
                "processes": run.processes,
                "per_call_ns": run.per_call_ns,
                "mean_ns": run.mean_ns().round(),
                "growth": self.growth(run.linux_cpus, run.processes),
                "linux_service_ns": self.tsc_hz.and_then(|hz| run.service_ns(hz)).map(f64::round),
                "pollers_moved": run.pollers_moved,
                "linux_exits": run.linux_exits.to_json(),
                "p50_us": run.p50_us,
                "max_us": run.max_us,
                "median_growth": self.median_growth(run.linux_cpus, run.processes),
                "linux_slow_services": run.linux_null.map(|l| l.slow_services),
                "linux_slow_service_ticks": run.linux_null.map(|l| l.slow_service_ticks),
                "linux_slow_waits": run.linux_null.map(|l| l.slow_waits),
                "linux_slow_wait_ticks": run.linux_null.map(|l| l.slow_wait_ticks),
                "linux_mean_wait_us": self.tsc_hz.and_then(|hz| run.linux_null?.mean_wait_us(hz)),
                "slow_calls": run.slow_calls,
                "slow_us": run.slow_us,
            })).collect::<Vec<_>>(),
            "reads": self.reads.iter().map(|read| json!({
                "block": read.block,
                "buffer": read.buffer,
                "calls": read.calls,
                "kb_per_s": read.kb_per_s,
                "native_kb_per_s": self.native_read(read.block),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(value: Value) -> Marker {
        Marker::printed(Port::Com1, value)
    }

    #[test]
    fn figures_give_growth_and_ratios() {
        let markers = vec![
            marker(
                json!({"ev": "delegation_bench_native", "calls": 10, "getpid_ns": 500,
                "read_4k_kb_per_s": 4000, "read_1m_kb_per_s": 8000}),
            ),
            marker(
                json!({"ev": "delegation_bench_null", "linux_cpus": 2, "processes": 1,
                "calls": 300, "per_call_ns": [4000], "p50_us": [4], "p99_us": [5],
                "max_us": [9]}),
            ),
            marker(
                json!({"ev": "delegation_bench_null", "linux_cpus": 2, "processes": 2,
                "calls": 300, "per_call_ns": [4000, 6000],
                "service_calls": 600, "service_ticks": 90000,
                "linux_exits": {"hlt": 60, "wrmsr": 1200},
                "p50_us": [4, 5], "p99_us": [6, 9], "max_us": [7, 900],
                "slow_calls": [0, 3], "slow_us": [0, 2400],
                "null_slow": [2, 75000, 600, 300000, 1, 20000]}),
            ),
            marker(json!({"ev": "boot_report", "cpu": {"tsc_hz": 50_000_000}})),
            marker(
                json!({"ev": "delegation_bench_null", "linux_cpus": 1, "processes": 1,
                "calls": 300, "per_call_ns": [5000]}),
            ),
            marker(
                json!({"ev": "delegation_bench_read", "block": 1048576, "rounds": 4,
                "calls": 153, "bytes": 4194304, "us": 1000, "kb_per_s": 6000}),
            ),
            marker(
                json!({"ev": "delegation_bench_idle", "window_ms": 2000, "server_wake_ups": 90,
                "linux_busy_permille": 35, "doorbell": true}),
            ),
            marker(
                json!({"ev": "delegation_bench_service", "path": "polled", "linux_cpus": 2,
                "calls": 300, "poll_us": 100000, "per_call_ns": 3000}),
            ),
            marker(
                json!({"ev": "delegation_bench_service", "path": "doorbell", "linux_cpus": 2,
                "calls": 300, "poll_us": 1, "per_call_ns": 9000, "found_by_fallback": 2,
                "linux_exits": {"hlt": 300, "ept_violation": 600, "wrmsr": 150, "cpuid": 3}}),
            ),
        ];
        let figures = Figures::from_markers(&markers).unwrap();
        assert_eq!(figures.cpu_counts(), [2, 1]);
        assert_eq!(figures.growth(2, 2), Some(1.25));
        assert_eq!(figures.growth(1, 2), None);
        let table = figures.table();
        assert!(
            table.contains(
                "delegated 4000 ns (1 process, 2 Linux CPUs), native Linux getpid 500 ns: 8.0x"
            ),
            "{table}"
        );
        assert!(table.contains("5000 ns 1.25x"), "{table}");
        assert!(table.contains("75%"), "{table}");
        let json = figures.to_json();
        assert_eq!(json["null"][1]["growth"], 1.25);
        assert_eq!(json["reads"][0]["native_kb_per_s"], 8000);
        assert!(
            table.contains(
                "idle service (doorbell): 45 server thread wake-ups per second, Linux 3.5% busy"
            ),
            "{table}"
        );
        assert_eq!(json["idle"]["server_wake_ups"], 90);
        assert!(
            table.contains("the service's polled path: 3000 ns: 6.0x getpid"),
            "{table}"
        );
        assert!(
            table.contains("the service's doorbell path: 9000 ns: 18.0x getpid\n"),
            "{table}"
        );
        assert!(
            table.contains(
                "Linux's VM exits per call 3.5: ept_violation 2.0, hlt 1.0, wrmsr 0.5\n  2 \
                 requests found only by the workers' safety net"
            ),
            "{table}"
        );
        assert_eq!(
            json["service_paths"][1]["linux_exits"]["ept_violation"],
            600
        );
        assert_eq!(json["service_paths"][1]["null_ns"], 9000);
        assert_eq!(json["service_paths"][1]["found_by_fallback"], 2);
        assert_eq!(json["service_paths"][0]["found_by_fallback"], Value::Null);
        // 90000 ticks at 50 MHz over 600 calls: 3 µs each.
        assert!(table.contains("Linux's service per call"), "{table}");
        assert!(table.contains("3000 ns"), "{table}");
        assert_eq!(json["null"][1]["linux_service_ns"], 3000.0);
        // 1260 exits over 2 x 300 calls; the runs that did not report them show none.
        assert!(
            table.contains("Linux's VM exits per call (all of Linux's exits")
                && table.contains("  2                           -               2.1\n"),
            "{table}"
        );
        assert_eq!(json["null"][1]["linux_exits"]["wrmsr"], 1200);
        assert_eq!(json["null"][0]["linux_exits"], json!({}));
        // Medians 4 and (4 + 5) / 2: 1.12x; the longest call of the two processes, 900 µs.
        assert!(table.contains("4 1.00x 9"), "{table}");
        assert!(table.contains("4 1.12x 900"), "{table}");
        assert_eq!(json["null"][1]["median_growth"], 1.125);
        // At 50 MHz: 2 slow services of 1.5 ms in all; waits of 10 µs on average, one slow
        // one of 0.4 ms.
        assert!(table.contains("3, 2.4\n"), "{table}");
        assert!(table.contains("2, 1.5\n"), "{table}");
        assert!(table.contains("1, 0.4\n"), "{table}");
        assert!(table.contains("10.0\n"), "{table}");
        assert_eq!(json["null"][1]["linux_slow_services"], 2);
        assert_eq!(json["null"][1]["linux_mean_wait_us"], 10.0);
        assert_eq!(json["null"][0]["linux_service_ns"], Value::Null);
    }

    #[test]
    fn missing_markers_are_named() {
        let error = Figures::from_markers(&[]).unwrap_err();
        assert!(format!("{error:#}").contains("delegation_bench_native"));
    }
}
