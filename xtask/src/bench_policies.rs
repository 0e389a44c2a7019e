//! `cargo xtask bench --only policies [--seeds N] [--workload W]`: the core-allocation
//! policies (`static`, `autonomous`, `cooperative`) compared on phase-changing workloads.
//!
//! One Bochs boot of `tests/configs/policy-bench.toml` (the bench writes a copy with the
//! seeds and workloads asked for): the PV agent's `tandem.selftest=policy-bench` runs every
//! workload under each policy in turn, switching with `vmctl rebalance` and putting the
//! movable core back to Linux with the policy `static` in between, so each run starts from the
//! boot partition. The agent only starts the load (Lavender's `phases` batch job through
//! `vmctl exec`, `sh` loops on Linux) and brackets the run with the hypervisor's clock.
//!
//! The figures come from the system's own records: the hypervisor's `core_move` (each move's
//! completion time and length) and `policy_decision` markers, its load history (every guest's
//! load reports stamped with their arrival, in Linux's control region), which the agent reads
//! during each run and prints after it as `policy_bench_load` markers, and the job's own
//! summary line (its makespan and delegated-call times, Lavender's clock). The hypervisor
//! boots without `load_markers=on`: a console line per report would stall its core 0, where
//! the policies run, behind the serial line. Every time is TSC
//! time: virtual under Bochs (`clock: sync=none`), so the host's speed and load do not enter
//! it; two boots of the same image still give different figures, so one seed is one
//! sample.
//!
//! Output: a table per workload (median and min..max over seeds), JSON and SVG plots in
//! `target/tandem/bench/policies/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench_policies_plot as plot;
use crate::marker::Marker;
use crate::session::Outcome;

/// The configuration booted; its Linux command line holds [`SELFTEST_WORD`].
const CONFIG: &str = "policy-bench";
const SELFTEST_WORD: &str =
    "tandem.selftest=policy-bench:1:step,square-short,square-long,hpc,over-report";
/// Every workload the agent knows (`guest-linux-pv/src/policy_bench.rs`), in order.
pub const WORKLOADS: [&str; 7] = [
    "step",
    "square-short",
    "square-long",
    "hpc",
    "hpc-steps",
    "over-report",
    "spin-idle",
];
pub const POLICIES: [&str; 3] = ["static", "autonomous", "cooperative"];
/// Wall time: Linux's boot, then each run (a few seconds of virtual time, a few minutes of
/// wall time on a loaded 2-core host).
const TIMEOUT_BASE: Duration = Duration::from_secs(900);
const TIMEOUT_PER_RUN: Duration = Duration::from_secs(300);
const HEARTBEAT: Duration = Duration::from_secs(60);
const BAD_EVENTS: [&str; 5] = [
    "fatal",
    "panic",
    "guest_stopped",
    "isolation_violation",
    "agent_error",
];
/// The most cores either guest may hold (the configuration's `max_cores`): demand is capped
/// there.
const MAX_CORES: f64 = 2.0;
/// A move back within this long of the move it undoes counts as flapping.
const FLAP_US: u64 = 200_000;

#[derive(Debug, clap::Args)]
pub struct PoliciesArgs {
    /// Seeds of the policy benchmark (`--only policies`): each workload runs under each
    /// policy once per seed (the seed shifts when Linux's load starts).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub seeds: u32,

    /// Workloads of the policy benchmark (default: all), repeatable or comma-separated.
    #[arg(long = "workload", value_name = "W", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(WORKLOADS))]
    pub workloads: Vec<String>,

    /// Analyse the console logs of an earlier policy-benchmark boot (its run dir, e.g.
    /// `target/tandem/runs/bench-policies`) instead of booting: the tables, JSON and plots
    /// again, with no new measurement (of the runs that finished, if the boot was cut short).
    #[arg(long, value_name = "RUN_DIR")]
    pub from_run: Option<PathBuf>,
}

pub struct PoliciesResult {
    pub report: String,
    pub problems: Vec<String>,
    pub json: Value,
}

/// `target/tandem/bench/policies/`.
pub fn out_dir() -> PathBuf {
    crate::bench::bench_dir().join("policies")
}

/// Workloads whose boot differs: a word on Linux's command line (the agent checks it). They
/// are booted apart from the others, one boot per word.
const LINUX_BOOTS_WITH: [(&str, &str); 1] = [("spin-idle", "idle=poll")];

fn linux_boots_with(workload: &str) -> &'static str {
    LINUX_BOOTS_WITH
        .iter()
        .find(|(w, _)| *w == workload)
        .map_or("", |(_, word)| word)
}

/// The configuration of one boot: `tests/configs/policy-bench.toml` with the agent's `word`
/// and `linux_extra` on Linux's command line, written to `name` in the output directory.
fn bench_config(word: &str, linux_extra: &str, name: &str) -> Result<PathBuf> {
    let source = crate::workspace_root()
        .join("tests")
        .join("configs")
        .join(format!("{CONFIG}.toml"));
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    if !text.contains(SELFTEST_WORD) {
        bail!(
            "{} no longer holds `{SELFTEST_WORD}`, which the bench replaces",
            source.display()
        );
    }
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let words = format!("{linux_extra} {word}");
    std::fs::write(&path, text.replace(SELFTEST_WORD, words.trim()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Boots the system once per kind of boot the workloads need, waits for every run and reads
/// the figures.
pub fn run(args: &PoliciesArgs) -> Result<PoliciesResult> {
    let workloads: Vec<&str> = if args.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        WORKLOADS
            .into_iter()
            .filter(|w| args.workloads.iter().any(|a| a == w))
            .collect()
    };
    if let Some(dir) = &args.from_run {
        return from_run(dir);
    }
    let mut boots: Vec<(&str, Vec<&str>)> = Vec::new();
    for w in workloads {
        let extra = linux_boots_with(w);
        match boots.iter_mut().find(|b| b.0 == extra) {
            Some(boot) => boot.1.push(w),
            None => boots.push((extra, vec![w])),
        }
    }
    let runs: u32 =
        boots.iter().map(|b| b.1.len() as u32).sum::<u32>() * args.seeds * POLICIES.len() as u32;
    println!(
        "==> bench policies: {runs} runs ({} policies x {} seed(s) x the workloads) in {} \
         Bochs boot(s) of tests/configs/{CONFIG}.toml",
        POLICIES.len(),
        args.seeds,
        boots.len()
    );
    let started = Instant::now();
    let mut booted = Vec::new();
    let mut failed = Vec::new();
    let mut done = 0;
    for (extra, workloads) in &boots {
        match boot_once(args.seeds, extra, workloads, runs, started, &mut done) {
            Ok(boot) => booted.push(boot),
            // A later boot that fails leaves the runs of the earlier ones to report.
            Err(e) if !booted.is_empty() => failed.push(format!("{e:#}")),
            Err(e) => return Err(e),
        }
    }
    let mut result = results(&booted)?;
    result.problems.extend(failed);
    result.json["wall_seconds"] = json!(started.elapsed().as_secs());
    Ok(result)
}

/// One boot: `workloads` with `linux_extra` on Linux's command line; its markers and run dir.
fn boot_once(
    seeds: u32,
    linux_extra: &str,
    workloads: &[&str],
    runs: u32,
    started: Instant,
    done: &mut u32,
) -> Result<(Vec<Marker>, PathBuf)> {
    let word = format!(
        "tandem.selftest=policy-bench:{seeds}:{}",
        workloads.join(",")
    );
    let (name, file) = if linux_extra.is_empty() {
        ("policies".to_string(), "config.toml".to_string())
    } else {
        let tag = linux_extra.replace('=', "-");
        (format!("policies-{tag}"), format!("config-{tag}.toml"))
    };
    let config = bench_config(&word, linux_extra, &file)?;
    println!(
        "==> boot {name}: `{}` on Linux's command line",
        format!("{linux_extra} {word}").trim()
    );
    let mut session = crate::bench::boot(&name, &config, String::new())?;
    let logs = session.run_dir().path().to_path_buf();
    println!(
        "==> Linux boots first (a few minutes), then each run takes a few seconds of virtual \
         time; logs in {}",
        logs.display()
    );
    let interrupted = crate::bench::interrupted()?;
    let last_said = std::cell::Cell::new(Instant::now());
    let say = |what: &str| {
        println!("    {:>5.0}s  {what}", started.elapsed().as_secs_f64());
        last_said.set(Instant::now());
    };
    let mut seen = 0;
    let this_boot = workloads.len() as u32 * seeds * POLICIES.len() as u32;
    let outcome = session.watch(
        |markers| {
            for m in &markers[seen.min(markers.len())..] {
                match m.ev() {
                    "agent_ready" => say("Linux's agent is up"),
                    "policy_bench_config" => say("the runs start"),
                    "policy_bench_run" => {
                        *done += 1;
                        let v = &m.value;
                        say(&format!(
                            "run {done}/{runs}: {} under {} (seed {}): makespan {:.1} ms, exit {}",
                            v["workload"].as_str().unwrap_or("?"),
                            v["policy"].as_str().unwrap_or("?"),
                            v["seed"],
                            v["job"]["makespan_us"].as_f64().unwrap_or(0.0) / 1000.0,
                            v["exit"]
                        ));
                    }
                    _ => {}
                }
            }
            seen = markers.len();
            markers
                .iter()
                .any(|m| m.ev() == "policy_bench_done" || BAD_EVENTS.contains(&m.ev()))
        },
        Some(TIMEOUT_BASE + TIMEOUT_PER_RUN * this_boot),
        &interrupted,
        |_, _| {
            if last_said.get().elapsed() >= HEARTBEAT {
                say("still running");
            }
        },
    )?;
    session.stop()?;
    if outcome != Outcome::Satisfied {
        bail!(
            "the policy benchmark's boot {name} did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    Ok((session.markers().to_vec(), logs))
}

/// [`run`] over the console logs of an earlier boot.
fn from_run(dir: &Path) -> Result<PoliciesResult> {
    println!("==> bench policies: the logs in {}", dir.display());
    let mut markers = Vec::new();
    for port in [crate::emulator::Port::Com1, crate::emulator::Port::Com2] {
        let path = dir.join(format!("{}.log", port.name()));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (index, line) in text.lines().enumerate() {
            if let Some(Ok(value)) = crate::marker::parse_line(line) {
                markers.push(Marker {
                    port,
                    line: index + 1,
                    value,
                });
            }
        }
    }
    let finished = markers.iter().any(|m| m.ev() == "policy_bench_done");
    let runs = markers
        .iter()
        .filter(|m| m.ev() == "policy_bench_run")
        .count();
    let mut result = results(&[(markers, dir.to_path_buf())])?;
    if !finished {
        let note = format!(
            "{} holds an unfinished benchmark (no policy_bench_done marker): only its {} \
             finished runs are reported",
            dir.display(),
            runs
        );
        result.report = format!("{note}\n{}", result.report);
        result.json["incomplete"] = json!(note);
    }
    Ok(result)
}

/// The tables, JSON and plots of finished boots' markers (with each boot's run dir).
fn results(boots: &[(Vec<Marker>, PathBuf)]) -> Result<PoliciesResult> {
    let mut problems = Vec::new();
    let mut analysed: Option<Analysed> = None;
    // Linux's command line of each boot (the agent's word, and what the boot needed).
    let mut words = Vec::new();
    for (markers, _) in boots {
        problems.extend(crate::bench::unexpected_markers(markers, &BAD_EVENTS));
        for m in markers.iter().filter(|m| m.ev() == "policy_bench_run") {
            let lost = m.value["loads"]["lost"].as_u64().unwrap_or(0);
            if lost > 0 {
                problems.push(format!(
                    "{} under {} (seed {}): {lost} load reports were overwritten in the load \
                     history before the agent read them; the load trace has gaps",
                    m.value["workload"], m.value["policy"], m.value["seed"]
                ));
            }
        }
        // Each boot has its own clock: its runs are analysed apart, then listed together.
        let boot = analyse(markers)?;
        let names = workloads_run(&boot);
        let extra = names
            .iter()
            .map(|w| linux_boots_with(w))
            .find(|w| !w.is_empty())
            .map_or(String::new(), |w| format!("{w} "));
        words.push(format!(
            "{extra}tandem.selftest=policy-bench:{}:{}",
            boot.config["seeds"],
            names.join(",")
        ));
        match analysed.as_mut() {
            None => analysed = Some(boot),
            Some(all) => {
                if let (Some(list), Some(more)) = (
                    all.config["workloads"].as_array_mut(),
                    boot.config["workloads"].as_array(),
                ) {
                    list.extend(more.iter().cloned());
                }
                all.runs.extend(boot.runs);
            }
        }
    }
    let analysed = analysed.context("no boot to report")?;
    let logs: Vec<&PathBuf> = boots.iter().map(|b| &b.1).collect();
    let bochsrc =
        std::fs::read_to_string(logs[0].join("bochsrc")).context("reading the run's bochsrc")?;
    let bochs = crate::bench::bochs_settings(&bochsrc)?;
    problems.extend(direction_problems(&analysed));
    let dir = out_dir();
    let plots = write_plots(&analysed, &dir)?;
    let (model_report, model_json) = model(&analysed);
    let mut report = report(&analysed, &bochs, &words);
    report.push_str(&model_report);
    let json = json!({
        "note": "every time is the hypervisor's or Lavender's TSC time in us: virtual under \
                 Bochs (clock: sync=none), independent of the host's speed; two boots differ",
        "emulator": bochs,
        "config": crate::workspace_root().join("tests/configs").join(format!("{CONFIG}.toml")),
        "linux_cmdlines": words,
        "seeds": analysed.config["seeds"],
        "workloads": analysed.config["workloads"],
        "boot_cores": analysed.config["boot_cores"],
        "runs": analysed.runs.iter().map(Run::to_json).collect::<Vec<_>>(),
        "summary": summary_json(&analysed),
        "model": model_json,
        "plots": plots,
        "run_dirs": logs,
    });
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .with_context(|| format!("writing {}", dir.join("latest.json").display()))?;
    Ok(PoliciesResult {
        report,
        problems,
        json,
    })
}

/// One load report as the hypervisor received it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub at_us: u64,
    /// The arrival of the guest's report before it: its busy time is over `from_us..at_us`.
    pub from_us: u64,
    pub runnable: u64,
    /// Busy cores: mean busy per-mille times the cores reported.
    pub busy_cores: f64,
    /// The report said its offer is final (none of the guest's live work can use the cores
    /// it offers).
    pub final_offer: bool,
}

/// One completed core move.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub core: u64,
    pub from: String,
    pub to: String,
    pub done_us: u64,
    pub total_us: u64,
}

/// The two guests, in the order of every per-guest array.
pub const GUESTS: [&str; 2] = ["lavender", "linux"];

/// One run of one workload under one policy: what the records say.
#[derive(Debug, Clone)]
pub struct Run {
    pub workload: String,
    pub policy: String,
    pub seed: u64,
    pub since_us: u64,
    pub end_us: u64,
    pub job: Value,
    /// The hypervisor's time just before Linux's load started (workloads that load Linux).
    pub linux_load_us: Option<u64>,
    /// Whether the workload loads Linux at all (otherwise Linux has no load step).
    pub linux_loaded: bool,
    pub declined: u64,
    /// Cores each guest held when the run started.
    pub start_held: [f64; 2],
    pub moves: Vec<Move>,
    pub decisions: Vec<Value>,
    /// Per guest: the report in force at the start, then those in the window.
    pub loads: [Vec<Load>; 2],
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub makespan_ms: f64,
    pub window_ms: f64,
    pub moves: u64,
    pub moves_per_s: f64,
    pub flaps: u64,
    /// Lavender's job starts (its first report of 2+ runnable threads) -> first move to it.
    pub lavender_first_move_ms: Option<f64>,
    /// ... -> Lavender holds what it asks for (runnable threads, at most its maximum).
    pub lavender_meets_demand_ms: Option<f64>,
    /// Linux's load step (first report of 2+ runnable after the job started) -> first move.
    pub linux_first_move_ms: Option<f64>,
    pub linux_meets_demand_ms: Option<f64>,
    /// Core time granted but idle: of the cores a guest holds beyond those it started the
    /// run with (what the policy gave it), the time they were idle (held minus reported busy,
    /// counted against the granted cores first), both guests; and its share of the granted
    /// core time (0 when nothing was granted).
    pub wasted_ms: f64,
    /// ... of it, during the job's first I/O phase (when it has one) ...
    pub wasted_io_ms: Option<f64>,
    /// ... and after the job ended (until the run's end: the policy has not taken the core
    /// back yet).
    pub wasted_after_ms: f64,
    pub wasted_share: f64,
    /// Core time held but idle, every core of both guests (the boot partition's included,
    /// which no policy can take below a guest's minimum), and its share of the core time held.
    pub idle_held_ms: f64,
    pub idle_held_share: f64,
    /// Core time demanded (runnable threads, capped at the maximum) but not held.
    pub starved_ms: f64,
    /// Core time in moves (revoke to the core running in its new guest).
    pub transit_ms: f64,
    pub declined: u64,
    pub call_p50_us: Option<u64>,
    pub call_p99_us: Option<u64>,
}

pub struct Analysed {
    pub config: Value,
    pub runs: Vec<Run>,
}

fn guest_index(name: &str) -> Option<usize> {
    GUESTS.iter().position(|g| *g == name)
}

/// Reads every run out of a boot's markers and works out its metrics.
pub fn analyse(markers: &[Marker]) -> Result<Analysed> {
    let config = markers
        .iter()
        .find(|m| m.ev() == "policy_bench_config")
        .map(|m| m.value.clone())
        .context("no policy_bench_config marker")?;
    let mut boot_held = [0.0; 2];
    for c in config["boot_cores"].as_array().into_iter().flatten() {
        if let Some(g) = c["guest"].as_str().and_then(guest_index) {
            boot_held[g] += 1.0;
        }
    }
    let moves: Vec<Move> = markers
        .iter()
        .filter(|m| m.ev() == "core_move" && m.value["outcome"] == "done")
        .map(|m| Move {
            core: m.value["core"].as_u64().unwrap_or(0),
            from: m.value["from"].as_str().unwrap_or("?").to_string(),
            to: m.value["to"].as_str().unwrap_or("?").to_string(),
            done_us: m.value["at_us"].as_u64().unwrap_or(0),
            total_us: m.value["total_us"].as_u64().unwrap_or(0),
        })
        .collect();
    // The agent's trace of the hypervisor's load history: per run and guest, its reports as
    // `[at_us, runnable, busy per-mille, cores reported, request, the arrival of the guest's
    // report before it, final offer (1 or 0)]`.
    let mut loads: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
    for m in markers.iter().filter(|m| m.ev() == "policy_bench_load") {
        let Some(g) = m.value["guest"].as_str().and_then(guest_index) else {
            continue;
        };
        for r in m.value["reports"].as_array().into_iter().flatten() {
            let field = |i: usize| r[i].as_f64().unwrap_or(0.0);
            let Some(at_us) = r[0].as_u64() else {
                continue;
            };
            let load = Load {
                at_us,
                // A trace without it (an older agent's): the busy time holds from the report on.
                from_us: r[5].as_u64().unwrap_or(at_us).min(at_us),
                runnable: r[1].as_u64().unwrap_or(0),
                busy_cores: field(2) * field(3) / 1000.0,
                // A trace without it (an older agent's): no offer was final.
                final_offer: r[6].as_u64() == Some(1),
            };
            loads[g].push(load);
        }
    }
    for l in &mut loads {
        l.sort_by_key(|l| l.at_us);
        // A run's trace starts with the report in force, which the run before may have
        // printed too.
        l.dedup();
    }
    let decisions: Vec<&Value> = markers
        .iter()
        .filter(|m| m.ev() == "policy_decision")
        .map(|m| &m.value)
        .collect();
    let mut runs = Vec::new();
    for m in markers.iter().filter(|m| m.ev() == "policy_bench_run") {
        let v = &m.value;
        let (since_us, end_us) = (
            v["since_us"].as_u64().unwrap_or(0),
            v["end_us"].as_u64().unwrap_or(0),
        );
        let inside = |t: u64| t > since_us && t <= end_us;
        let window_loads = [0, 1].map(|g| {
            let list = &loads[g];
            let before = list.iter().rev().find(|l| l.at_us <= since_us).copied();
            before
                .into_iter()
                .chain(list.iter().filter(|l| inside(l.at_us)).copied())
                .collect::<Vec<_>>()
        });
        let mut run = Run {
            workload: v["workload"].as_str().unwrap_or("?").to_string(),
            policy: v["policy"].as_str().unwrap_or("?").to_string(),
            seed: v["seed"].as_u64().unwrap_or(0),
            since_us,
            end_us,
            job: v["job"].clone(),
            linux_load_us: v["linux_load_us"].as_u64().filter(|&t| t > 0),
            linux_loaded: config["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["name"] == v["workload"])
                .is_none_or(|w| w["linux_tasks"].as_u64() != Some(0)),
            declined: v["declined"].as_u64().unwrap_or(0),
            start_held: boot_held,
            // A move in the window: it ended inside (one the reset made ended before).
            moves: moves
                .iter()
                .filter(|mv| inside(mv.done_us))
                .cloned()
                .collect(),
            decisions: decisions
                .iter()
                .filter(|d| inside(d["at_us"].as_u64().unwrap_or(0)))
                .map(|d| (*d).clone())
                .collect(),
            loads: window_loads,
            metrics: Metrics::default(),
        };
        run.metrics = metrics(&run);
        runs.push(run);
    }
    if runs.is_empty() {
        bail!("no policy_bench_run marker");
    }
    Ok(Analysed { config, runs })
}

/// Cores each guest holds over the run: `(time, [lavender, linux])` from the start, a step
/// at each move's start (the giver loses the core) and end (the taker gets it).
pub fn held_steps(run: &Run) -> Vec<(u64, [f64; 2])> {
    let mut events: Vec<(u64, usize, f64)> = Vec::new();
    for mv in &run.moves {
        let start = mv.done_us.saturating_sub(mv.total_us).max(run.since_us);
        if let Some(g) = guest_index(&mv.from) {
            events.push((start, g, -1.0));
        }
        if let Some(g) = guest_index(&mv.to) {
            events.push((mv.done_us, g, 1.0));
        }
    }
    events.sort_by_key(|e| e.0);
    let mut held = run.start_held;
    let mut steps = vec![(run.since_us, held)];
    for (at, g, delta) in events {
        held[g] += delta;
        steps.push((at, held));
    }
    steps
}

/// The value of a step function at `t`: the last step at or before it.
fn at<T: Copy>(steps: &[(u64, T)], t: u64, first: T) -> T {
    steps
        .iter()
        .take_while(|(s, _)| *s <= t)
        .last()
        .map_or(first, |(_, v)| *v)
}

fn demand(load: Option<Load>) -> f64 {
    load.map_or(0.0, |l| (l.runnable as f64).min(MAX_CORES))
}

/// Every metric of a run, from its records.
pub fn metrics(run: &Run) -> Metrics {
    let held = held_steps(run);
    let load_steps: [Vec<(u64, Option<Load>)>; 2] =
        [0, 1].map(|g| run.loads[g].iter().map(|l| (l.at_us, Some(*l))).collect());
    // A report's busy time is over the time since the guest's report before it: it steps at
    // the start of that window (and holds over the reports the trace left out, which were
    // alike), where its runnable count steps when it arrives.
    let busy_steps: [Vec<(u64, f64)>; 2] = [0, 1].map(|g| {
        run.loads[g]
            .iter()
            .map(|l| (l.from_us, l.busy_cores))
            .collect()
    });
    // Lavender's step: its first report of 2+ runnable threads (the job's two started; an
    // idle Lavender reports 0 or 1 as its idle program wakes); the job ends a makespan later.
    let lavender_step = run.loads[0]
        .iter()
        .find(|l| l.at_us > run.since_us && l.runnable >= 2)
        .map(|l| l.at_us);
    let makespan_us = run.job["makespan_us"].as_u64().unwrap_or(0);
    let job_end = lavender_step.map(|s| s + makespan_us);
    // The job's first I/O phase, when it has one (`io_from_us` after its start, `io_us` long).
    let io = lavender_step
        .zip(run.job["io_from_us"].as_u64())
        .map(|(s, from)| {
            let start = s + from;
            (start, start + run.job["io_us"].as_u64().unwrap_or(0))
        });
    // Every instant something changed, then integrate the piecewise-constant functions.
    let mut times: Vec<u64> = held.iter().map(|h| h.0).collect();
    for g in 0..2 {
        times.extend(load_steps[g].iter().map(|s| s.0.max(run.since_us)));
        times.extend(busy_steps[g].iter().map(|s| s.0.max(run.since_us)));
    }
    times.extend(job_end);
    times.extend(io.iter().flat_map(|&(a, b)| [a, b]));
    times.push(run.end_us);
    times.retain(|&t| t >= run.since_us && t <= run.end_us);
    times.sort_unstable();
    times.dedup();
    let (mut wasted, mut granted_total, mut idle_held, mut starved, mut held_total) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut wasted_io, mut wasted_after) = (0.0, 0.0);
    for pair in times.windows(2) {
        let (t, dt) = (pair[0], (pair[1] - pair[0]) as f64);
        let h = at(&held, t, run.start_held);
        for g in 0..2 {
            let load = at(&load_steps[g], t, None);
            let busy = at(&busy_steps[g], t, 0.0);
            let idle = (h[g] - busy).max(0.0);
            let granted = (h[g] - run.start_held[g]).max(0.0);
            let waste = idle.min(granted) * dt;
            idle_held += idle * dt;
            wasted += waste;
            if io.is_some_and(|(a, b)| (a..b).contains(&t)) {
                wasted_io += waste;
            }
            if job_end.is_some_and(|end| t >= end) {
                wasted_after += waste;
            }
            granted_total += granted * dt;
            starved += (demand(load) - h[g]).max(0.0) * dt;
            held_total += h[g] * dt;
        }
    }
    let transit: u64 = run.moves.iter().map(|m| m.total_us).sum();
    let mut flaps = 0;
    for pair in run.moves.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.core == b.core && a.from == b.to && b.done_us - a.done_us <= FLAP_US {
            flaps += 1;
        }
    }
    let window_us = run.end_us.saturating_sub(run.since_us).max(1);
    // Linux's step: its first report of 2+ runnable tasks once its load started (the agent
    // notes when; a `vmctl` process can make such a report before; an older agent did not:
    // after Lavender's step then); none when the workload does not load Linux.
    let linux_from = match run.linux_load_us {
        Some(at) => Some(at),
        None if run.linux_loaded => lavender_step,
        None => None,
    };
    let linux_step = linux_from.and_then(|from| {
        run.loads[1]
            .iter()
            .find(|l| l.at_us > from && l.runnable >= 2)
            .map(|l| l.at_us)
    });
    let reaction = |g: usize, step: Option<u64>| -> (Option<f64>, Option<f64>) {
        let Some(step) = step else {
            return (None, None);
        };
        let first = run
            .moves
            .iter()
            .find(|m| m.to == GUESTS[g] && m.done_us >= step)
            .map(|m| (m.done_us - m.total_us).saturating_sub(step) as f64 / 1000.0);
        // Lavender holds what it asks for: its load at the step, while that load lasts.
        let want = demand(at(&load_steps[g], step, None));
        let meets = held
            .iter()
            .map(|(t, h)| ((*t).max(step), h[g]))
            .find(|(_, h)| *h >= want)
            .map(|(t, _)| (t - step) as f64 / 1000.0);
        (first, meets)
    };
    let (lavender_first_move_ms, lavender_meets_demand_ms) = reaction(0, lavender_step);
    let (linux_first_move_ms, linux_meets_demand_ms) = reaction(1, linux_step);
    let calls = run.job["calls"].as_u64().unwrap_or(0);
    Metrics {
        makespan_ms: makespan_us as f64 / 1000.0,
        window_ms: window_us as f64 / 1000.0,
        moves: run.moves.len() as u64,
        moves_per_s: run.moves.len() as f64 / (window_us as f64 / 1e6),
        flaps,
        lavender_first_move_ms,
        lavender_meets_demand_ms,
        linux_first_move_ms,
        linux_meets_demand_ms,
        wasted_ms: wasted / 1000.0,
        wasted_io_ms: io.map(|_| wasted_io / 1000.0),
        wasted_after_ms: wasted_after / 1000.0,
        wasted_share: if granted_total > 0.0 {
            wasted / granted_total
        } else {
            0.0
        },
        idle_held_ms: idle_held / 1000.0,
        idle_held_share: if held_total > 0.0 {
            idle_held / held_total
        } else {
            0.0
        },
        starved_ms: starved / 1000.0,
        transit_ms: transit as f64 / 1000.0,
        declined: run.declined,
        call_p50_us: (calls > 0).then(|| run.job["call_p50_us"].as_u64().unwrap_or(0)),
        call_p99_us: (calls > 0).then(|| run.job["call_p99_us"].as_u64().unwrap_or(0)),
    }
}

impl Run {
    fn to_json(&self) -> Value {
        let m = &self.metrics;
        json!({
            "workload": self.workload,
            "policy": self.policy,
            "seed": self.seed,
            "since_us": self.since_us,
            "end_us": self.end_us,
            "job": self.job,
            "linux_load_us": self.linux_load_us,
            "metrics": {
                "makespan_ms": m.makespan_ms,
                "window_ms": m.window_ms,
                "moves": m.moves,
                "moves_per_s": m.moves_per_s,
                "flaps": m.flaps,
                "lavender_first_move_ms": m.lavender_first_move_ms,
                "lavender_meets_demand_ms": m.lavender_meets_demand_ms,
                "linux_first_move_ms": m.linux_first_move_ms,
                "linux_meets_demand_ms": m.linux_meets_demand_ms,
                "wasted_ms": m.wasted_ms,
                "wasted_io_ms": m.wasted_io_ms,
                "wasted_after_ms": m.wasted_after_ms,
                "wasted_share": m.wasted_share,
                "idle_held_ms": m.idle_held_ms,
                "idle_held_share": m.idle_held_share,
                "starved_ms": m.starved_ms,
                "transit_ms": m.transit_ms,
                "declined": m.declined,
                "call_p50_us": m.call_p50_us,
                "call_p99_us": m.call_p99_us,
            },
            "moves": self.moves.iter().map(|mv| json!({
                "core": mv.core, "from": mv.from, "to": mv.to,
                "done_us": mv.done_us, "total_us": mv.total_us,
            })).collect::<Vec<_>>(),
            "decisions": self.decisions,
            "held": held_steps(self).iter().map(|(t, h)| json!([t, h[0], h[1]])).collect::<Vec<_>>(),
            "loads": GUESTS.iter().zip(&self.loads).map(|(g, l)| (g.to_string(), json!(
                l.iter().map(|l| json!([l.at_us, l.runnable, l.busy_cores])).collect::<Vec<_>>()
            ))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Where the moves went against what each policy is for: `static` never moves a core, and on
/// the `step` workload (Lavender's job starts while Linux idles) `autonomous` and
/// `cooperative` each move one to Lavender. Reported with the figures, not a pass or fail:
/// the e2e scenario of the policies is what asserts their direction.
pub fn direction_problems(a: &Analysed) -> Vec<String> {
    let mut problems = Vec::new();
    for run in &a.runs {
        let what = format!("{} under {} (seed {})", run.workload, run.policy, run.seed);
        if run.policy == "static" && !run.moves.is_empty() {
            problems.push(format!("{what}: static moved {} core(s)", run.moves.len()));
        }
        if run.workload == "step"
            && run.policy != "static"
            && !run.moves.iter().any(|m| m.to == "lavender")
        {
            problems.push(format!("{what}: no core moved to Lavender's job"));
        }
    }
    problems
}

/// Median and range of one metric over the seeds of (workload, policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// The table's columns: heading, and the metric it shows.
type Column = (&'static str, fn(&Metrics) -> Option<f64>);
const COLUMNS: [Column; 15] = [
    ("makespan ms", |m| Some(m.makespan_ms)),
    ("lav move ms", |m| m.lavender_first_move_ms),
    ("lav meets ms", |m| m.lavender_meets_demand_ms),
    ("linux move ms", |m| m.linux_first_move_ms),
    ("moves", |m| Some(m.moves as f64)),
    ("moves/s", |m| Some(m.moves_per_s)),
    ("flaps", |m| Some(m.flaps as f64)),
    ("wasted ms", |m| Some(m.wasted_ms)),
    ("wasted io ms", |m| m.wasted_io_ms),
    ("wasted after", |m| Some(m.wasted_after_ms)),
    ("wasted %", |m| Some(m.wasted_share * 100.0)),
    ("idle held %", |m| Some(m.idle_held_share * 100.0)),
    ("starved ms", |m| Some(m.starved_ms)),
    ("transit ms", |m| Some(m.transit_ms)),
    ("declined", |m| Some(m.declined as f64)),
];

fn runs_of<'a>(a: &'a Analysed, workload: &str, policy: &str) -> Vec<&'a Run> {
    a.runs
        .iter()
        .filter(|r| r.workload == workload && r.policy == policy)
        .collect()
}

fn workloads_run(a: &Analysed) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in &a.runs {
        if !names.contains(&r.workload) {
            names.push(r.workload.clone());
        }
    }
    names
}

fn summary_json(a: &Analysed) -> Value {
    let mut out = serde_json::Map::new();
    for w in workloads_run(a) {
        let mut per_policy = serde_json::Map::new();
        for p in POLICIES {
            let runs = runs_of(a, &w, p);
            let mut cols = serde_json::Map::new();
            for (name, get) in COLUMNS {
                let values: Vec<f64> = runs.iter().filter_map(|r| get(&r.metrics)).collect();
                if let Some(s) = spread(&values) {
                    cols.insert(
                        name.to_string(),
                        json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}),
                    );
                }
            }
            per_policy.insert(p.to_string(), Value::Object(cols));
        }
        per_policy.insert("floor_ms".into(), json!(floor_ms(a, &w)));
        per_policy.insert(
            "cooperative_worse".into(),
            cooperative_worse(a, &w)
                .iter()
                .map(
                    |(name, c, auto)| json!({"column": name, "cooperative": c, "autonomous": auto}),
                )
                .collect(),
        );
        out.insert(w, Value::Object(per_policy));
    }
    Value::Object(out)
}

/// An estimate of the makespan no allocation beats: the `static` runs' compute time (the
/// job's two threads on Lavender's one boot core) spread over the most cores Lavender may hold
/// (median over seeds), plus the shortest I/O and sleeps of any run of the workload (a sleep
/// lasts to a timer tick, which depends on the run); `None` without a `static` run. Every job
/// runs two threads, so two cores are all it can use.
pub fn floor_ms(a: &Analysed, workload: &str) -> Option<f64> {
    let us = |r: &Run, key: &str| r.job[key].as_f64().unwrap_or(0.0);
    let compute: Vec<f64> = runs_of(a, workload, "static")
        .iter()
        .map(|r| us(r, "compute_us") / MAX_CORES)
        .collect();
    let waits = a
        .runs
        .iter()
        .filter(|r| r.workload == workload)
        .map(|r| us(r, "io_us") + us(r, "idle_us"))
        .min_by(f64::total_cmp)?;
    spread(&compute).map(|s| (s.median + waits) / 1000.0)
}

/// Columns where a lower figure is the better one, for [`cooperative_worse`].
const LOWER_IS_BETTER: [&str; 11] = [
    "makespan ms",
    "lav move ms",
    "lav meets ms",
    "linux move ms",
    "flaps",
    "wasted ms",
    "wasted io ms",
    "wasted after",
    "wasted %",
    "starved ms",
    "transit ms",
];

/// Where cooperative's median is worse than autonomous's on `workload` (by more than 5% and
/// more than one unit, so that noise is not named): `(column, cooperative, autonomous)`.
pub fn cooperative_worse(a: &Analysed, workload: &str) -> Vec<(&'static str, f64, f64)> {
    let median = |policy: &str, get: fn(&Metrics) -> Option<f64>| {
        let values: Vec<f64> = runs_of(a, workload, policy)
            .iter()
            .filter_map(|r| get(&r.metrics))
            .collect();
        spread(&values).map(|s| s.median)
    };
    COLUMNS
        .iter()
        .filter(|(name, _)| LOWER_IS_BETTER.contains(name))
        .filter_map(|&(name, get)| {
            let (c, auto) = (median("cooperative", get)?, median("autonomous", get)?);
            (c > auto * 1.05 && c - auto > 1.0).then_some((name, c, auto))
        })
        .collect()
}

fn cell(s: Option<Spread>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => format!("{:.1}", s.median),
        Some(s) => format!("{:.1} [{:.1}..{:.1}]", s.median, s.min, s.max),
    }
}

pub fn report(a: &Analysed, bochs: &Value, linux_cmdlines: &[String]) -> String {
    let mut out = format!(
        "policies: virtual time (Bochs ips={}, clock sync={}: TSC time), {} \
         boot(s), Linux's command line `{}`; median [min..max] over seeds\n",
        bochs["ips"],
        bochs["clock_sync"],
        linux_cmdlines.len(),
        linux_cmdlines.join("` and `")
    );
    let about: BTreeMap<String, String> = a.config["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or("?").to_string(),
                format!(
                    "{} (phases {}{})",
                    w["about"].as_str().unwrap_or(""),
                    w["job"].as_str().unwrap_or(""),
                    if w["io"] == true { " io=FILE" } else { "" }
                ),
            )
        })
        .collect();
    for w in workloads_run(a) {
        let _ = writeln!(
            out,
            "\n{w}: {}",
            about.get(&w).map(String::as_str).unwrap_or("")
        );
        let _ = write!(out, "{:<12}", "policy");
        for (name, _) in COLUMNS {
            let _ = write!(out, " {name:>14}");
        }
        let hpc = a
            .runs
            .iter()
            .any(|r| r.workload == w && r.metrics.call_p50_us.is_some());
        if hpc {
            let _ = write!(out, " {:>14} {:>14}", "call p50 us", "call p99 us");
        }
        out.push('\n');
        for p in POLICIES {
            let runs = runs_of(a, &w, p);
            if runs.is_empty() {
                continue;
            }
            let _ = write!(out, "{p:<12}");
            for (_, get) in COLUMNS {
                let values: Vec<f64> = runs.iter().filter_map(|r| get(&r.metrics)).collect();
                let _ = write!(out, " {:>14}", cell(spread(&values)));
            }
            if hpc {
                for get in [
                    |m: &Metrics| m.call_p50_us.map(|v| v as f64),
                    |m: &Metrics| m.call_p99_us.map(|v| v as f64),
                ] {
                    let values: Vec<f64> = runs.iter().filter_map(|r| get(&r.metrics)).collect();
                    let _ = write!(out, " {:>14}", cell(spread(&values)));
                }
            }
            out.push('\n');
        }
        if let Some(floor) = floor_ms(a, &w) {
            let above: Vec<String> = POLICIES
                .iter()
                .filter_map(|p| {
                    let values: Vec<f64> = runs_of(a, &w, p)
                        .iter()
                        .map(|r| r.metrics.makespan_ms)
                        .collect();
                    let median = spread(&values)?.median;
                    Some(format!("{p} {:+.0}%", (median / floor - 1.0) * 100.0))
                })
                .collect();
            let _ = writeln!(
                out,
                "floor {floor:.1} ms (an estimate of the best any allocation can do: static's \
                 compute over Lavender's 2 cores, plus the shortest I/O and sleeps of any run); \
                 median makespan above it: {}",
                above.join(", ")
            );
        }
        let worse = cooperative_worse(a, &w);
        if !worse.is_empty() {
            let named: Vec<String> = worse
                .iter()
                .map(|(name, c, auto)| format!("{name} {c:.1} against {auto:.1}"))
                .collect();
            let _ = writeln!(
                out,
                "cooperative does worse than autonomous (medians): {}",
                named.join(", ")
            );
        }
    }
    out.push_str(
        "\nlav move / lav meets: Lavender's job starts (its first load report of 2+ runnable \
         threads) -> first move to Lavender / Lavender holds its demand (runnable threads, at \
         most 2 cores); linux move: Linux's load step (its first report of 2+ runnable once its \
         tasks started; none on a workload that does not load Linux) -> first move to Linux; \
         '-': never in the run. wasted: core time granted but idle (cores a guest holds beyond \
         those it started the run with, idle by its reported busy time over each report's \
         window), both guests, and its share of the granted core time; wasted io / after: of \
         it, during the job's first I/O phase / after the job ended (the policy had not taken \
         the core back yet); idle held: every held core's idle time, boot cores \
         included, as a share of the core time held; starved: demand not held; transit: \
         revoke -> running in the new guest.\n",
    );
    out
}

/// The host-side model ([`crate::policy_model`]) over each real run's recorded load: as run
/// (period 1 ms, the median move cost measured over the whole boot) beside the real figures,
/// then swept over move cost and the autonomous policy's period.
pub fn model(a: &Analysed) -> (String, Value) {
    let mut costs: Vec<f64> = a
        .runs
        .iter()
        .flat_map(|r| r.moves.iter().map(|m| m.total_us as f64))
        .collect();
    costs.sort_by(f64::total_cmp);
    let measured = costs.get(costs.len() / 2).map(|&c| c as u64);
    // With no move in the boot, a move's length from the `moves` benchmark's order of
    // magnitude (Linux offlining or onlining a CPU).
    let measured_cost = measured.unwrap_or(100_000);
    let mut settings = vec![("as run", 1_000, measured_cost)];
    for (label, period_us, move_cost_us) in [
        ("cost 10 ms", 1_000, 10_000),
        ("cost 1 ms", 1_000, 1_000),
        ("period 10 ms", 10_000, measured_cost),
    ] {
        settings.push((label, period_us, move_cost_us));
    }
    let mut out = format!(
        "\nMODEL (host-side, not a measurement: each run's recorded load replayed open loop \
         through hypervisor::policy; no makespan): moves / first move to Lavender ms / starved \
         ms, beside the real run's; as run = period 1 ms, move cost {:.1} ms ({})\n",
        measured_cost as f64 / 1000.0,
        if measured.is_some() {
            "the median measured"
        } else {
            "assumed: no move in this boot"
        }
    );
    let mut rows = Vec::new();
    for run in a.runs.iter().filter(|r| r.seed == 1) {
        let _ = write!(out, "{:<13} {:<12}", run.workload, run.policy);
        let m = &run.metrics;
        let real = format!(
            "real {}/{}/{:.0}",
            m.moves,
            m.lavender_first_move_ms
                .map_or("-".into(), |v| format!("{v:.1}")),
            m.starved_ms
        );
        let _ = write!(out, " {real:<22}");
        for &(label, period_us, move_cost_us) in &settings {
            if run.policy != "autonomous" && label.starts_with("period") {
                continue;
            }
            let p = crate::policy_model::replay(
                &run.policy,
                &run.loads,
                run.since_us,
                run.end_us,
                crate::policy_model::Setting {
                    period_us,
                    move_cost_us,
                },
            );
            let _ = write!(
                out,
                " {label}: {}/{}/{:.0}",
                p.moves,
                p.lavender_first_move_ms
                    .map_or("-".into(), |v| format!("{v:.1}")),
                p.starved_ms
            );
            rows.push(json!({
                "workload": run.workload, "policy": run.policy, "seed": run.seed,
                "setting": label, "period_us": period_us, "move_cost_us": move_cost_us,
                "moves": p.moves, "lavender_first_move_ms": p.lavender_first_move_ms,
                "starved_ms": p.starved_ms,
            }));
        }
        out.push('\n');
    }
    (
        out,
        json!({
            "note": "a host-side model, not a measurement: the run's recorded load replayed \
                     open loop through the hypervisor's policy functions (xtask/src/policy_model.rs)",
            "measured_move_cost_us": measured_cost,
            "predictions": rows,
        }),
    )
}

/// `NAME.svg` and `NAME.png` in `dir`.
fn write_figure(figure: &plot::Figure, dir: &Path, name: &str) -> Result<[PathBuf; 2]> {
    let svg = dir.join(format!("{name}.svg"));
    std::fs::write(&svg, plot::svg(figure))
        .with_context(|| format!("writing {}", svg.display()))?;
    let png = dir.join(format!("{name}.png"));
    std::fs::write(&png, plot::png(figure)?)
        .with_context(|| format!("writing {}", png.display()))?;
    Ok([svg, png])
}

/// The plots: per workload the timeline, and the bars; SVG and PNG; returns their paths.
pub fn write_plots(a: &Analysed, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for w in workloads_run(a) {
        // The first seed's run of each policy: one panel each.
        let panels: Vec<&Run> = POLICIES
            .iter()
            .filter_map(|p| runs_of(a, &w, p).into_iter().min_by_key(|r| r.seed))
            .collect();
        let figure = plot::timeline(&w, &panels);
        written.extend(write_figure(&figure, dir, &format!("{w}-cores"))?);
    }
    written.extend(write_figure(&plot::bars(a), dir, "bars")?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::Port;

    fn marker(value: Value) -> Marker {
        Marker::printed(Port::Com2, value)
    }

    fn load(guest: &str, at_us: u64, runnable: u64, busy: u64, cores: u64) -> Marker {
        marker(json!({"ev": "policy_bench_load", "guest": guest, "part": 0,
            "reports": [[at_us, runnable, busy, cores, 0]]}))
    }

    /// A step run: Lavender's job starts at 1 ms, core 3 moves to it (2..4 ms), the run
    /// ends at 11 ms.
    fn step_markers() -> Vec<Marker> {
        vec![
            marker(json!({"ev": "policy_bench_config", "boot_cores": [
                {"core": 1, "guest": "linux"}, {"core": 3, "guest": "linux"},
                {"core": 2, "guest": "lavender"}], "workloads": []})),
            load("lavender", 0, 0, 0, 1),
            load("linux", 0, 0, 0, 2),
            load("lavender", 1_000, 2, 1000, 1),
            marker(
                json!({"ev": "core_move", "outcome": "done", "core": 3, "from": "linux",
                "to": "lavender", "at_us": 4_000, "total_us": 2_000}),
            ),
            load("lavender", 5_000, 2, 1000, 2),
            marker(
                json!({"ev": "policy_bench_run", "workload": "step", "policy": "autonomous",
                "seed": 1, "since_us": 0, "end_us": 11_000, "declined": 0,
                "job": {"makespan_us": 9_000}}),
            ),
        ]
    }

    #[test]
    fn a_step_run_is_measured_from_the_records() {
        let a = analyse(&step_markers()).unwrap();
        assert_eq!(a.runs.len(), 1);
        let run = &a.runs[0];
        assert_eq!(run.moves.len(), 1);
        assert_eq!(
            held_steps(run),
            [(0, [1.0, 2.0]), (2_000, [1.0, 1.0]), (4_000, [2.0, 1.0])]
        );
        let m = &run.metrics;
        assert_eq!(m.makespan_ms, 9.0);
        assert_eq!(m.moves, 1);
        assert_eq!(m.flaps, 0);
        assert_eq!(m.lavender_first_move_ms, Some(1.0));
        assert_eq!(m.lavender_meets_demand_ms, Some(3.0));
        assert_eq!(m.linux_first_move_ms, None);
        assert_eq!(m.transit_ms, 2.0);
        // Starved: Lavender wants 2 and holds 1 from 1 ms to 4 ms.
        assert!((m.starved_ms - 3.0).abs() < 1e-9, "{m:?}");
        // Idle held: Linux's idle cores (2 until 2 ms, then 1) and Lavender's idle core
        // before its job (1 ms) and its second core from 4 to 5 ms (reported 1 busy).
        let expected = 2.0 * 2.0 + 1.0 * 9.0 + 1.0 + 1.0;
        assert!((m.idle_held_ms - expected).abs() < 1e-9, "{m:?}");
        // Wasted: only the granted core counts: Lavender's second core, idle 4 to 5 ms of
        // the 7 ms it held it.
        assert!((m.wasted_ms - 1.0).abs() < 1e-9, "{m:?}");
        assert!((m.wasted_share - 1.0 / 7.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn busy_time_counts_over_its_reports_window() {
        let mut markers = step_markers();
        // Lavender's reports after the move: one of its two cores busy over 4..8 ms, none
        // over 8..10.5 ms (the job ended at 10 ms); the job read through delegation over
        // 6..8 ms.
        let report = |at_us: u64, runnable: u64, busy: u64, from_us: u64| {
            marker(
                json!({"ev": "policy_bench_load", "guest": "lavender", "part": 0,
                "reports": [[at_us, runnable, busy, 2, 0, from_us]]}),
            )
        };
        markers[5] = report(8_000, 2, 500, 4_000);
        markers.insert(6, report(10_500, 0, 0, 8_000));
        // The report after the job says its offer is final (the trace's seventh field).
        if let Some(fields) = markers[6].value["reports"][0].as_array_mut() {
            fields.push(json!(1));
        }
        markers[7].value["job"] =
            json!({"makespan_us": 9_000, "io_from_us": 5_000, "io_us": 2_000});
        let a = analyse(&markers).unwrap();
        let finals: Vec<(u64, bool)> = a.runs[0].loads[0]
            .iter()
            .map(|l| (l.at_us, l.final_offer))
            .collect();
        assert_eq!(
            &finals[finals.len() - 2..],
            [(8_000, false), (10_500, true)]
        );
        let m = &a.runs[0].metrics;
        // The granted core idles 4..11 ms: from the move on, not from the report on.
        assert!((m.wasted_ms - 7.0).abs() < 1e-9, "{m:?}");
        assert!((m.wasted_share - 1.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.wasted_io_ms, Some(2.0));
        assert!((m.wasted_after_ms - 1.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn linuxs_step_is_its_first_report_of_the_load_the_agent_started() {
        let mut markers = step_markers();
        // A `vmctl` process makes Linux report 2 runnable at 2 ms; its load starts at 5.5 ms
        // (reported at 6 ms); core 3 leaves Lavender at 8 ms, reaching Linux at 9 ms.
        markers.insert(3, load("linux", 2_000, 2, 500, 2));
        markers.insert(4, load("linux", 3_000, 0, 0, 2));
        markers.insert(5, load("linux", 6_000, 2, 1000, 1));
        // After the move to Lavender (4 ms), now the 8th marker.
        markers.insert(
            8,
            marker(
                json!({"ev": "core_move", "outcome": "done", "core": 3, "from": "lavender",
                "to": "linux", "at_us": 9_000, "total_us": 1_000}),
            ),
        );
        let last = markers.len() - 1;
        let a = analyse(&markers).unwrap();
        assert_eq!(a.runs[0].metrics.linux_first_move_ms, Some(6.0));
        markers[last].value["linux_load_us"] = json!(5_500);
        let a = analyse(&markers).unwrap();
        assert_eq!(a.runs[0].metrics.linux_first_move_ms, Some(2.0));
    }

    #[test]
    fn the_floor_is_statics_compute_over_two_cores_and_the_shortest_waits() {
        let mut markers = step_markers();
        let last = markers.len() - 1;
        markers[last].value["job"] =
            json!({"makespan_us": 9_000, "compute_us": 8_000, "idle_us": 1_000});
        let mut fixed = markers[last].clone();
        fixed.value["policy"] = json!("static");
        fixed.value["job"] =
            json!({"makespan_us": 21_000, "compute_us": 18_000, "idle_us": 2_500, "io_us": 500});
        markers.push(fixed);
        let a = analyse(&markers).unwrap();
        assert_eq!(floor_ms(&a, "step"), Some(10.0));
        assert_eq!(floor_ms(&a, "hpc"), None);
    }

    #[test]
    fn where_cooperative_does_worse_is_named() {
        let mut markers = step_markers();
        let last = markers.len() - 1;
        let mut other = markers[last].clone();
        other.value["policy"] = json!("cooperative");
        other.value["job"] = json!({"makespan_us": 9_200});
        markers.push(other.clone());
        let a = analyse(&markers).unwrap();
        // 9.2 ms against 9.0: within 5%; cooperative made no move, so no reaction to compare.
        assert!(!cooperative_worse(&a, "step")
            .iter()
            .any(|(name, _, _)| *name == "makespan ms"));
        markers.pop();
        other.value["job"] = json!({"makespan_us": 12_000});
        markers.push(other);
        let a = analyse(&markers).unwrap();
        assert!(cooperative_worse(&a, "step").contains(&("makespan ms", 12.0, 9.0)));
    }

    #[test]
    fn moves_against_a_policys_purpose_are_reported() {
        let a = analyse(&step_markers()).unwrap();
        assert!(direction_problems(&a).is_empty());
        let mut markers = step_markers();
        // The same run under static: it moved a core; without the move, cooperative did not.
        markers[6].value["policy"] = json!("static");
        let a = analyse(&markers).unwrap();
        assert_eq!(
            direction_problems(&a),
            ["step under static (seed 1): static moved 1 core(s)"]
        );
        markers.remove(4);
        markers[5].value["policy"] = json!("cooperative");
        let a = analyse(&markers).unwrap();
        assert_eq!(
            direction_problems(&a),
            ["step under cooperative (seed 1): no core moved to Lavender's job"]
        );
    }

    #[test]
    fn a_move_undone_at_once_is_a_flap() {
        let mut markers = step_markers();
        markers.insert(
            5,
            marker(
                json!({"ev": "core_move", "outcome": "done", "core": 3, "from": "lavender",
                "to": "linux", "at_us": 8_000, "total_us": 1_000}),
            ),
        );
        let a = analyse(&markers).unwrap();
        assert_eq!(a.runs[0].metrics.flaps, 1);
        assert_eq!(a.runs[0].metrics.moves, 2);
    }

    #[test]
    fn spread_gives_median_and_range() {
        let s = spread(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert!(spread(&[]).is_none());
        assert_eq!(cell(spread(&[4.0])), "4.0");
    }

    #[test]
    fn workloads_that_change_the_boot_are_known_to_the_agent() {
        let agent = std::fs::read_to_string(
            crate::workspace_root().join("guest-linux-pv/src/policy_bench.rs"),
        )
        .unwrap();
        for w in WORKLOADS {
            assert!(agent.contains(&format!("name: \"{w}\"")), "{w}");
        }
        for (w, word) in LINUX_BOOTS_WITH {
            assert!(WORKLOADS.contains(&w));
            assert!(
                agent.contains(&format!("linux_boots_with: \"{word}\"")),
                "{w}"
            );
        }
    }

    #[test]
    fn the_config_holds_the_word_the_bench_replaces() {
        let text = std::fs::read_to_string(
            crate::workspace_root()
                .join("tests/configs")
                .join(format!("{CONFIG}.toml")),
        )
        .unwrap();
        assert!(text.contains(SELFTEST_WORD));
    }
}
