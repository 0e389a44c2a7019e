//! `tandem.selftest=policy-bench:SEEDS:WORKLOADS` (for `cargo xtask bench --only policies`):
//! runs each workload of the comma-separated list under `static`, `autonomous` and
//! `cooperative`, for seeds 1..=SEEDS, in one boot, driven the way a user at the Linux shell
//! would: `vmctl rebalance` switches the policy, `vmctl exec` starts Lavender's batch job
//! (`phases`), `sh` loops make Linux busy.
//!
//! Before each run the policy goes back to `static` and the movable core back to Linux (the
//! boot partition), so every run starts from the same allocation. The agent starts the load
//! and brackets each run with the hypervisor's clock (`since_us` of the switch, a fresh stats
//! page's `published_us` once the job ended); the moves and decisions in between the
//! benchmark reads from the hypervisor's own markers. The guests' load over the run comes from
//! the hypervisor's load history (`vmcall_proto::load_history`, in Linux's control region),
//! which a thread of the agent reads every [`TRACE_EVERY`] while the run lasts; the agent
//! prints it once the run is over, as `policy_bench_load` markers on Linux's console. The
//! hypervisor thus spends no console time on the trace while the policies run on its core 0
//! (printing each report there, as `load_markers=on` does, stalled the policy engine behind
//! the serial line).
//!
//! Markers: `policy_bench_config` (every workload's parameters), per run the
//! `policy_bench_load` markers (each guest's reports: `[at_us, runnable, busy per-mille,
//! cores reported, request, the arrival of the guest's report before it]`, a report kept when
//! it differs from the last one kept) and one
//! `policy_bench_run`, then `policy_bench_done`; a failure is an `agent_error` with code
//! `policy_bench`.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use vmcall_proto::load_history::LoadRecord;

use crate::control::Control;
use crate::report;

const WORD: &str = "tandem.selftest=policy-bench:";
const VMCTL: &str = "/bin/vmctl";
const PHASES: &str = "/usr/lib/tandem/lavender/phases";
/// The file the I/O phase reads through delegation (under the served root).
const IO_FILE: &str = "policy-bench.dat";
const IO_FILE_BYTES: usize = 256 * 1024;
pub const POLICIES: [&str; 3] = ["static", "autonomous", "cooperative"];
/// How long the system is left alone after the reset, before a run starts.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the load history is read during a run: well within the half second of reports
/// it holds when both guests report every millisecond.
const TRACE_EVERY: Duration = Duration::from_millis(50);
/// A report is kept in the printed trace when its busy per-mille moved this far from the
/// last one kept (or its runnable count, cores or request changed).
const TRACE_BUSY_STEP: u16 = 50;
/// Reports per `policy_bench_load` marker.
const TRACE_CHUNK: usize = 100;

/// One workload: Lavender's batch job, and when (if ever) Linux becomes busy.
pub struct Workload {
    pub name: &'static str,
    /// What it models, for the report.
    pub about: &'static str,
    /// `phases` arguments (`io=` is added when `io` is set).
    pub job: &'static str,
    pub io: bool,
    /// Linux starts this many CPU-bound tasks ...
    pub linux_tasks: usize,
    /// ... this long after the job started (plus up to `linux_jitter_ms` drawn from the seed).
    pub linux_after_ms: u64,
    pub linux_jitter_ms: u64,
    /// Runnable tasks Linux's load reports claim beyond its real ones during the run (an
    /// adversarial guest; 0: honest).
    pub linux_overstates: u32,
    /// A word Linux's command line must hold for the workload (it changes the whole boot, so
    /// the bench boots such workloads apart); empty: none.
    pub linux_boots_with: &'static str,
}

/// The Linux side of a workload whose Linux idles and reports honestly; each workload names
/// its own job (this base's empty one is never run) and sets the Linux fields it changes.
const LINUX_IDLE: Workload = Workload {
    name: "",
    about: "",
    job: "",
    io: false,
    linux_tasks: 0,
    linux_after_ms: 0,
    linux_jitter_ms: 0,
    linux_overstates: 0,
    linux_boots_with: "",
};

/// The workloads, by name. One unit of `work` is 1000 multiply-adds.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "step",
        about: "Lavender's 2-thread job starts while Linux idles; Linux runs 2 CPU-bound tasks later",
        job: "threads=2 work=4000 rounds=1",
        io: false,
        linux_tasks: 2,
        linux_after_ms: 300,
        linux_jitter_ms: 50,
        ..LINUX_IDLE
    },
    Workload {
        name: "square-short",
        about: "Lavender's 2 threads compute, then sleep 5 ms, 60 times (period ~10 ms); Linux idles",
        job: "threads=2 work=25 rounds=60 idle_us=5000",
        io: false,
        ..LINUX_IDLE
    },
    Workload {
        name: "square-long",
        about: "Lavender's 2 threads compute, then sleep 50 ms, 8 times (period ~100 ms); Linux idles",
        job: "threads=2 work=250 rounds=8 idle_us=50000",
        io: false,
        ..LINUX_IDLE
    },
    Workload {
        name: "hpc",
        about: "Lavender computes (2 threads), reads 4 KiB 150 times through delegation (Linux serves), computes again",
        job: "threads=2 work=2000 rounds=1 calls=150",
        io: true,
        ..LINUX_IDLE
    },
    Workload {
        name: "hpc-steps",
        about: "Lavender's time-stepped job: computes (2 threads), then 3 times its 2 threads each read 4 KiB 150 times through delegation (Linux serves both) and it computes again",
        job: "threads=2 work=600 rounds=3 calls=150 readers=2",
        io: true,
        ..LINUX_IDLE
    },
    Workload {
        name: "over-report",
        about: "Lavender's 2-thread job starts while Linux idles but reports 4 runnable tasks more than it has (asking for every core it may hold)",
        job: "threads=2 work=4000 rounds=1",
        io: false,
        linux_overstates: 4,
        ..LINUX_IDLE
    },
    Workload {
        name: "spin-idle",
        about: "Lavender's 2-thread job starts while Linux idles in a polling idle loop (idle=poll: its CPUs never halt, its reports say idle)",
        job: "threads=2 work=4000 rounds=1",
        io: false,
        linux_boots_with: "idle=poll",
        ..LINUX_IDLE
    },
];

/// What the command line asks for: seeds and workloads.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub seeds: u32,
    pub workloads: Vec<&'static Workload>,
}

pub fn requested(cmdline: &str) -> Option<Request> {
    let spec = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(WORD))?;
    let (seeds, names) = spec.split_once(':')?;
    let seeds = seeds.parse().ok().filter(|s| (1..=100).contains(s))?;
    let workloads = names
        .split(',')
        .map(|n| WORKLOADS.iter().find(|w| w.name == n))
        .collect::<Option<Vec<_>>>()?;
    (!workloads.is_empty()).then_some(Request { seeds, workloads })
}

impl PartialEq for Workload {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub fn run(request: &Request, served_root: &std::path::Path, control: Option<&Control>) {
    let result = match control {
        Some(control) => run_all(request, served_root, control),
        None => Err("no control region: the load history is read from it".to_string()),
    };
    if let Err(reason) = result {
        report::emit(&report::error("policy_bench", &reason, |_| {}));
    }
}

fn vmctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new(VMCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vmctl {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status() -> Result<Value, String> {
    let text = vmctl(&["status", "--json"])?;
    serde_json::from_str(text.trim()).map_err(|e| format!("vmctl status --json: {e}"))
}

/// The hypervisor's time now (µs since boot): the stats page is published when asked for,
/// where the status page is published when it changed, at most every 100 ms, so its time may
/// be that old.
fn hypervisor_now_us() -> Result<u64, String> {
    let text = vmctl(&["stats", "--json"])?;
    let page: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("vmctl stats --json: {e}"))?;
    page["published_us"]
        .as_u64()
        .ok_or_else(|| "vmctl stats --json: no published_us".to_string())
}

/// The cores `guest` holds on the status page.
fn held(page: &Value, guest: &str) -> Vec<u64> {
    page["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == guest))
        .and_then(|g| g["held"].as_array())
        .map(|h| h.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The policy back to `static` and every core back to the guest that held it at boot.
fn reset(boot: &[(u64, &'static str)]) -> Result<(), String> {
    vmctl(&["rebalance", "--policy", "static"])?;
    let page = status()?;
    for &(core, guest) in boot {
        if !held(&page, guest).contains(&core) {
            vmctl(&["move-core", &core.to_string(), "--to", guest])?;
        }
    }
    std::thread::sleep(SETTLE);
    Ok(())
}

/// A small deterministic generator: the seed's jitter.
fn jitter(seed: u32, salt: u64, range_ms: u64) -> u64 {
    let mut x = u64::from(seed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(salt);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    if range_ms == 0 {
        0
    } else {
        x % (range_ms + 1)
    }
}

fn spinners(count: usize) -> Result<Vec<Child>, String> {
    (0..count)
        .map(|_| {
            Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .map_err(|e| format!("starting Linux's load: {e}"))
        })
        .collect()
}

/// The `key=value` fields of the job's summary line (`phases: ...`).
fn summary(stdout: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("phases: "))
        .map(|rest| {
            rest.split_ascii_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn run_all(
    request: &Request,
    served_root: &std::path::Path,
    control: &Control,
) -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("reading /proc/cmdline: {e}"))?;
    for w in &request.workloads {
        if !w.linux_boots_with.is_empty()
            && !cmdline
                .split_ascii_whitespace()
                .any(|word| word == w.linux_boots_with)
        {
            return Err(format!(
                "workload {} needs `{}` on Linux's command line",
                w.name, w.linux_boots_with
            ));
        }
    }
    let data: Vec<u8> = (0..IO_FILE_BYTES)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::write(served_root.join(IO_FILE), data)
        .map_err(|e| format!("writing {IO_FILE}: {e}"))?;
    let page = status()?;
    let boot: Vec<(u64, &'static str)> = ["linux", "lavender"]
        .into_iter()
        .flat_map(|g| held(&page, g).into_iter().map(move |c| (c, g)))
        .collect();
    report::emit(&report::marker("policy_bench_config", |o| {
        o.u64("seeds", request.seeds.into());
        o.array("boot_cores", |a| {
            for &(core, guest) in &boot {
                a.object(|c| {
                    c.u64("core", core).str("guest", guest);
                });
            }
        });
        o.array("workloads", |a| {
            for w in &request.workloads {
                a.object(|j| {
                    j.str("name", w.name)
                        .str("about", w.about)
                        .str("job", w.job)
                        .bool("io", w.io)
                        .u64("linux_tasks", w.linux_tasks as u64)
                        .u64("linux_after_ms", w.linux_after_ms)
                        .u64("linux_jitter_ms", w.linux_jitter_ms)
                        .u64("linux_overstates", w.linux_overstates.into())
                        .str("linux_boots_with", w.linux_boots_with);
                });
            }
        });
    }));
    for seed in 1..=request.seeds {
        for workload in &request.workloads {
            for (index, policy) in POLICIES.into_iter().enumerate() {
                reset(&boot)?;
                one_run(workload, policy, seed, index as u64, control)?;
            }
        }
    }
    reset(&boot)?;
    report::emit(&report::marker("policy_bench_done", |o| {
        o.bool("ok", true);
    }));
    Ok(())
}

/// The load history read over one run.
#[derive(Debug, Default)]
struct Trace {
    /// Every record read: the last one of each guest before the run, then the run's.
    records: Vec<LoadRecord>,
    /// Records the hypervisor overwrote before they were read.
    lost: u64,
}

/// Reads the load history until `stop` is set, every [`TRACE_EVERY`], from the last record of
/// each guest held now (the report in force when the run starts) on; one last read after
/// `stop`.
fn trace_until(control: &Control, stop: &AtomicBool) -> Result<Trace, String> {
    let mut trace = Trace::default();
    let (held, mut cursor, _) = control.load_history_since(0)?;
    for record in held {
        trace.records.retain(|r| r.guest != record.guest);
        trace.records.push(record);
    }
    loop {
        let last = stop.load(Ordering::Acquire);
        let (records, next, lost) = control.load_history_since(cursor)?;
        trace.records.extend(records);
        trace.lost += lost;
        cursor = next;
        if last {
            return Ok(trace);
        }
        std::thread::sleep(TRACE_EVERY);
    }
}

/// Per guest, the reports worth printing: the first, then each whose runnable count, cores
/// reported or request changed, or whose busy per-mille moved [`TRACE_BUSY_STEP`] or more,
/// since the last one kept; each with the arrival of the guest's report before it (its own
/// when none was read). A report's busy time is over the time since the guest's report before
/// it, which a reader of the kept reports alone could not tell once reports in between were
/// left out.
fn kept(records: &[LoadRecord]) -> Vec<(LoadRecord, u64)> {
    // Per guest: the last report kept, and the last one read.
    let mut last: Vec<(LoadRecord, u64)> = Vec::new();
    let mut out = Vec::new();
    for r in records {
        let (keep, from_us) = match last.iter_mut().find(|(l, _)| l.guest == r.guest) {
            None => {
                last.push((*r, r.at_us));
                (true, r.at_us)
            }
            Some((l, previous_us)) => {
                let changed = l.runnable != r.runnable
                    || l.cores_reported != r.cores_reported
                    || l.requested_delta != r.requested_delta
                    || l.final_offer != r.final_offer
                    || l.busy_permille.abs_diff(r.busy_permille) >= TRACE_BUSY_STEP;
                if changed {
                    *l = *r;
                }
                (changed, core::mem::replace(previous_us, r.at_us))
            }
        };
        if keep {
            out.push((*r, from_us));
        }
    }
    out
}

/// The `policy_bench_load` markers of one run: per guest, its kept reports in chunks.
fn trace_markers(
    records: &[(LoadRecord, u64)],
    names: &[(u64, String)],
    run: &serde_json::Map<String, Value>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (id, name) in names {
        let reports: Vec<Value> = records
            .iter()
            .filter(|(r, _)| u64::from(r.guest) == *id)
            .map(|(r, from_us)| {
                serde_json::json!([
                    r.at_us,
                    r.runnable,
                    r.busy_permille,
                    r.cores_reported,
                    r.requested_delta,
                    from_us,
                    u8::from(r.final_offer)
                ])
            })
            .collect();
        for (part, chunk) in reports.chunks(TRACE_CHUNK).enumerate() {
            let mut marker = serde_json::Map::new();
            marker.insert("ev".into(), "policy_bench_load".into());
            marker.extend(run.clone());
            marker.insert("guest".into(), name.as_str().into());
            marker.insert("part".into(), part.into());
            marker.insert("reports".into(), chunk.to_vec().into());
            lines.push(format!(
                "{}{}",
                vmcall_proto::marker::MARKER_PREFIX,
                Value::Object(marker)
            ));
        }
    }
    lines
}

/// What the job printed and how it ended.
struct JobEnd {
    stdout: String,
    exit: std::process::ExitStatus,
    /// The hypervisor's time just before Linux's load started, if the workload has one.
    linux_load_us: Option<u64>,
}

/// Starts the job (and Linux's load, if the workload has one) and waits for it to end.
fn run_job(workload: &Workload, seed: u32, salt: u64) -> Result<JobEnd, String> {
    let mut job_args: Vec<String> =
        vec!["exec".into(), PHASES.into(), "--cores".into(), "2".into()];
    job_args.extend(workload.job.split_ascii_whitespace().map(String::from));
    if workload.io {
        job_args.push(format!("io={IO_FILE}"));
    }
    let mut job = Command::new(VMCTL)
        .args(&job_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vmctl exec {PHASES}: {e}"))?;
    let mut linux = Vec::new();
    let mut linux_load_us = None;
    if workload.linux_tasks > 0 {
        let after = workload.linux_after_ms + jitter(seed, salt, workload.linux_jitter_ms);
        std::thread::sleep(Duration::from_millis(after));
        // Linux's load step is its first report of the tasks after this: a `vmctl` process
        // earlier in the run (the job's own) may make a report of as many runnable tasks.
        linux_load_us = Some(hypervisor_now_us()?);
        linux = spinners(workload.linux_tasks)?;
    }
    let mut stdout = String::new();
    if let Some(mut out) = job.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    let exit = job
        .wait()
        .map_err(|e| format!("waiting for vmctl exec: {e}"))?;
    for mut task in linux {
        let _ = task.kill();
        let _ = task.wait();
    }
    Ok(JobEnd {
        stdout,
        exit,
        linux_load_us,
    })
}

fn one_run(
    workload: &Workload,
    policy: &str,
    seed: u32,
    salt: u64,
    control: &Control,
) -> Result<(), String> {
    let before = status()?;
    let declined_before = before["policy"]["declined"].as_u64().unwrap_or(0);
    let names: Vec<(u64, String)> = before["guests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| Some((g["id"].as_u64()?, g["name"].as_str()?.to_string())))
        .collect();
    let stop = AtomicBool::new(false);
    // The lie starts before the switch, so the policy meets it from the run's start, and
    // ends with the run.
    crate::load_report::OVERSTATE.store(workload.linux_overstates, Ordering::Relaxed);
    let (ran, trace) = std::thread::scope(|scope| {
        let tracer = scope.spawn(|| trace_until(control, &stop));
        let ran = (|| {
            let mut args = vec!["rebalance", "--policy", policy, "--json"];
            if policy == "autonomous" {
                args.extend(["--period-ms", "1"]);
            }
            let switched: Value = serde_json::from_str(vmctl(&args)?.trim())
                .map_err(|e| format!("vmctl rebalance --json: {e}"))?;
            let since_us = switched["since_us"].as_u64().unwrap_or(0);
            let end = run_job(workload, seed, salt)?;
            let end_us = hypervisor_now_us()?;
            Ok::<_, String>((since_us, end, end_us, status()?))
        })();
        crate::load_report::OVERSTATE.store(0, Ordering::Relaxed);
        stop.store(true, Ordering::Release);
        let trace = tracer
            .join()
            .unwrap_or_else(|_| Err("the load-history reader panicked".into()));
        (ran, trace)
    });
    let (
        since_us,
        JobEnd {
            stdout,
            exit,
            linux_load_us,
        },
        end_us,
        after,
    ) = ran?;
    let trace = trace?;
    let kept = kept(&trace.records);
    let mut run = serde_json::Map::new();
    run.insert("workload".into(), workload.name.into());
    run.insert("policy".into(), policy.into());
    run.insert("seed".into(), seed.into());
    for line in trace_markers(&kept, &names, &run) {
        report::emit(&line);
    }
    let fields = summary(&stdout);
    report::emit(&report::marker("policy_bench_run", |o| {
        o.str("workload", workload.name)
            .str("policy", policy)
            .u64("seed", seed.into())
            .u64("since_us", since_us)
            .u64("end_us", end_us)
            .u64("linux_load_us", linux_load_us.unwrap_or(0))
            .i64("exit", exit.code().unwrap_or(-1).into())
            .u64(
                "declined",
                after["policy"]["declined"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(declined_before),
            );
        o.object("loads", |l| {
            l.u64("read", trace.records.len() as u64)
                .u64("kept", kept.len() as u64)
                .u64("lost", trace.lost);
        });
        o.object("job", |j| {
            for (key, value) in &fields {
                j.u64(key, *value);
            }
        });
    }));
    if !exit.success() || fields.is_empty() {
        return Err(format!(
            "the {} job under {policy} failed ({exit}): {}",
            workload.name,
            stdout.trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_parsed_strictly() {
        let r = requested("console=ttyS0 tandem.selftest=policy-bench:2:step,hpc").unwrap();
        assert_eq!(r.seeds, 2);
        assert_eq!(
            r.workloads.iter().map(|w| w.name).collect::<Vec<_>>(),
            ["step", "hpc"]
        );
        assert!(requested("tandem.selftest=policy-bench:0:step").is_none());
        assert!(requested("tandem.selftest=policy-bench:1:nope").is_none());
        assert!(requested("tandem.selftest=policy-bench:1").is_none());
        assert!(requested("tandem.selftest=policies").is_none());
    }

    #[test]
    fn summary_fields_are_read() {
        let out = "hello\nphases: makespan_us=12 calls=3 call_p50_us=4 errors=0\n";
        assert_eq!(
            summary(out),
            [
                ("makespan_us".to_string(), 12),
                ("calls".to_string(), 3),
                ("call_p50_us".to_string(), 4),
                ("errors".to_string(), 0)
            ]
        );
    }

    fn record(guest: u8, at_us: u64, runnable: u32, busy: u16) -> LoadRecord {
        LoadRecord {
            number: at_us,
            at_us,
            guest,
            runnable,
            busy_permille: busy,
            cores_reported: 1,
            requested_delta: 0,
            hint: 0,
            final_offer: false,
        }
    }

    #[test]
    fn the_trace_keeps_each_guests_changes() {
        let records = [
            record(0, 1, 0, 0),
            record(1, 2, 1, 500),
            record(0, 3, 0, 49),
            record(0, 4, 2, 60),
            record(1, 5, 1, 450),
            record(0, 6, 2, 110),
            record(0, 7, 2, 111),
            // Only the offer became final: a change.
            LoadRecord {
                final_offer: true,
                ..record(0, 8, 2, 111)
            },
        ];
        let at: Vec<(u64, u64)> = kept(&records)
            .iter()
            .map(|(r, from_us)| (r.at_us, *from_us))
            .collect();
        // Each with its guest's report before it: 6 follows 4 (5 is the other guest's).
        assert_eq!(at, [(1, 1), (2, 2), (4, 3), (5, 2), (6, 4), (8, 7)]);
    }

    #[test]
    fn trace_markers_name_the_guest_and_the_run() {
        let records: Vec<(LoadRecord, u64)> = (0..150)
            .map(|t| {
                let r = LoadRecord {
                    final_offer: t == 2,
                    ..record(1, t, 2, 999)
                };
                (r, t.saturating_sub(1))
            })
            .collect();
        let names = [(0, "lavender".to_string()), (1, "linux".to_string())];
        let mut run = serde_json::Map::new();
        run.insert("workload".into(), "step".into());
        let lines = trace_markers(&records, &names, &run);
        assert_eq!(lines.len(), 2);
        let first: Value =
            serde_json::from_str(lines[0].strip_prefix("@@tandem ").unwrap()).unwrap();
        assert_eq!(first["ev"], "policy_bench_load");
        assert_eq!(first["guest"], "linux");
        assert_eq!(first["workload"], "step");
        assert_eq!(first["part"], 0);
        assert_eq!(first["reports"].as_array().unwrap().len(), 100);
        assert_eq!(
            first["reports"][1],
            serde_json::json!([1, 2, 999, 1, 0, 0, 0])
        );
        assert_eq!(
            first["reports"][2],
            serde_json::json!([2, 2, 999, 1, 0, 1, 1])
        );
    }

    #[test]
    fn jitter_stays_in_range_and_depends_on_the_seed() {
        assert!((1..50).all(|s| jitter(s, 1, 50) <= 50));
        assert_eq!(jitter(3, 0, 0), 0);
        assert_ne!(
            (1..10).map(|s| jitter(s, 0, 50)).collect::<Vec<_>>(),
            vec![jitter(1, 0, 50); 9]
        );
    }
}
