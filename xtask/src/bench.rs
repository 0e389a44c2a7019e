//! `cargo xtask bench`: the project's timings, printed as tables and saved as JSON.
//!
//! Benchmarks are not tests: nothing here passes or fails on a timing. Three parts:
//!
//! * **cores**: boots the core-move configuration under Bochs and reports the figures of
//!   [`crate::core_moves`], in TSC time. Bochs runs with `clock: sync=none`, so that time is
//!   virtual and deterministic for the emulator settings, which the report names.
//! * **ring**: runs `vmcall-proto`'s ring benchmark in its interleaved A/B mode against
//!   `rtrb` and reports its table: host wall-clock time, which depends on the machine and
//!   its load.
//! * **moves**: cores moved between Linux and Lavender with `vmctl`, both directions stage by
//!   stage ([`crate::bench_moves`]), in virtual TSC time under Bochs.
//! * **exec**: `vmctl exec` of an empty Lavender program against Linux's fork+exec+wait
//!   ([`crate::bench_exec`]), virtual time under Bochs.
//! * **policies** (only with `--only policies`): the core-allocation policies on
//!   phase-changing workloads ([`crate::bench_policies`]), virtual time under Bochs.
//! * **policies-quick**: the core-allocation policies' reaction to load steps, moves under
//!   steady load and granted-but-idle core time on one boot ([`crate::bench_policies_quick`]),
//!   virtual time under Bochs.
//!
//! Results go to `target/tandem/bench/<UTC time>.json` and `latest.json`.

use std::cell::RefCell;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::core_moves::{self, CoreMoves};
use crate::emulator::{EmulatorKind, Machine, RunDir};
use crate::image::{ImageArgs, LogLevel};
use crate::marker::Marker;
use crate::partitions::BuildMachine;
use crate::session::{Outcome, Session};
use crate::tools;

/// The longest a core-move boot may take (wall time: 70 s on a 2-core host running other
/// emulators too; far longer with a slower host or many more cycles).
const CORES_TIMEOUT: Duration = Duration::from_secs(1200);
/// How often a quiet step says it is still going.
const HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Core moves under Bochs (virtual TSC time).
    Cores,
    /// The shared-memory ring against rtrb (host wall-clock time).
    Ring,
    /// System-call delegation under Bochs (virtual TSC time).
    Delegation,
    /// Cores moved between Linux and Lavender with vmctl, stage by stage (virtual TSC time).
    Moves,
    /// `vmctl exec` of an empty Lavender program against Linux's fork+exec+wait (Bochs,
    /// virtual time; `bench_exec`).
    Exec,
    /// The core-allocation policies on phase-changing workloads, as tables, JSON and plots
    /// (Bochs, virtual time; `bench_policies`). Not part of a plain `cargo xtask bench`: it
    /// takes far longer than the other parts.
    Policies,
    /// The core-allocation policies on one boot: reaction to a load step, moves under steady
    /// load, granted-but-idle core time (Bochs, virtual time; `bench_policies_quick`).
    PoliciesQuick,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run only this part (default: all).
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Option<Part>,

    /// Seed of the core-move schedule (the hypervisor's `core_test=SEED:CYCLES`).
    #[arg(long, default_value_t = core_moves::DEFAULT_SEED)]
    pub seed: u64,

    /// Grants and revokes in the core-move schedule.
    #[arg(long, default_value_t = core_moves::DEFAULT_CYCLES)]
    pub cycles: u32,

    /// Interleaved A/B trials of the ring benchmark (its `RING_AB`).
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub ring_trials: u32,

    #[command(flatten)]
    pub moves: crate::bench_moves::MovesArgs,

    #[command(flatten)]
    pub policies: crate::bench_policies::PoliciesArgs,
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.cycles == 0 || args.ring_trials == 0 {
        bail!("--cycles and --ring-trials must be at least 1");
    }
    let wants = |part| args.only.is_none_or(|only| only == part);
    let started = SystemTime::now();
    let mut results = json!({
        "started_utc": utc_iso(unix_secs(started)),
        "git_commit": git_commit(),
        "host": host(),
    });
    let mut report = String::new();
    let mut problems = Vec::new();
    if wants(Part::Cores) {
        let cores = cores(&args)?;
        report.push_str(&cores.report);
        problems.extend(cores.problems.iter().cloned());
        results["cores"] = cores.json;
    }
    if wants(Part::Ring) {
        let ring = ring(args.ring_trials)?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&ring.report());
        results["ring"] = ring.to_json(args.ring_trials);
    }
    if wants(Part::Delegation) {
        let delegation = crate::bench_delegation::run()?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&delegation.report);
        problems.extend(delegation.problems.iter().cloned());
        results["delegation"] = delegation.json;
    }
    if wants(Part::Moves) {
        let moves = crate::bench_moves::run(&args.moves)?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&moves.report);
        problems.extend(moves.problems.iter().cloned());
        results["moves"] = moves.json;
    }
    if wants(Part::Exec) {
        let exec = crate::bench_exec::run()?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&exec.report);
        results["exec"] = exec.json;
    }
    if args.only == Some(Part::Policies) {
        let policies = crate::bench_policies::run(&args.policies)?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&policies.report);
        problems.extend(policies.problems.iter().cloned());
        results["policies"] = policies.json;
    }
    if wants(Part::PoliciesQuick) {
        let policies = crate::bench_policies_quick::run()?;
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&policies.report);
        problems.extend(policies.problems.iter().cloned());
        results["policies_quick"] = policies.json;
    }
    let saved = save(&results, unix_secs(started))?;

    println!("\n==> bench report\n\n{report}");
    if !problems.is_empty() {
        println!("==> a run's outcome is wrong, so its figures are suspect:");
        for problem in &problems {
            println!("    {problem}");
        }
    }
    println!("==> results saved to {}", saved.display());
    println!(
        "    (and {})",
        saved.with_file_name("latest.json").display()
    );
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `target/tandem/bench/`.
pub(crate) fn bench_dir() -> PathBuf {
    crate::tandem_dir().join("bench")
}

/// Set on Ctrl-C. The emulators run in process groups of their own, so Ctrl-C reaches only
/// xtask, which must stop them; one handler per process, shared by the parts.
pub(crate) fn interrupted() -> Result<Arc<AtomicBool>> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    ctrlc::set_handler(move || set.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// Builds the benchmark image `name` (`target/tandem/bench/<name>.iso`) from `config` with
/// the hypervisor command line `cmdline`, and boots it under Bochs on the default machine, its
/// logs in `target/tandem/runs/bench-<name>/`. Every part that boots the system starts here.
pub(crate) fn boot(name: &str, config: &Path, cmdline: String) -> Result<Session> {
    boot_on(BuildMachine::default(), name, config, cmdline)
}

/// [`boot`] on `build_machine` instead of the default machine.
pub(crate) fn boot_on(
    build_machine: BuildMachine,
    name: &str,
    config: &Path,
    cmdline: String,
) -> Result<Session> {
    let image = ImageArgs {
        linux_kernel: None,
        log: LogLevel::Info,
        cmdline,
        config: config.to_path_buf(),
        keep_debug_info: false,
    };
    let machine = Machine {
        emulator: EmulatorKind::Bochs,
        cpus: build_machine.cpus,
        memory_mib: build_machine.memory_mib,
    };
    let iso = image.build(&bench_dir().join(format!("{name}.iso")), build_machine)?;
    let run_dir = RunDir::fresh(&crate::runs_dir().join(format!("bench-{name}")))?;
    Session::start(&machine, &iso, run_dir)
}

/// One problem line per marker of `bad_events` in a run: its figures are then suspect.
pub(crate) fn unexpected_markers(markers: &[Marker], bad_events: &[&str]) -> Vec<String> {
    markers
        .iter()
        .filter(|m| bad_events.contains(&m.ev()))
        .map(|m| format!("unexpected marker: {}", m.value))
        .collect()
}

struct CoresResult {
    report: String,
    problems: Vec<String>,
    json: Value,
}

fn cores(args: &BenchArgs) -> Result<CoresResult> {
    let config = core_moves::config_path();
    let cmdline = core_moves::core_test_option(args.seed, args.cycles);
    let hv_cmdline = format!("log=info {cmdline}");
    println!(
        "==> bench cores: {} with `{hv_cmdline}` under Bochs",
        relative(&config).display(),
    );
    // The machine `boot` emulates.
    let machine = BuildMachine::default();
    let mut session = boot("cores", &config, cmdline)?;
    let logs = session.run_dir().path().to_path_buf();
    println!(
        "==> booting under Bochs ({} CPUs, {} MiB; about 40 s to boot, a minute or two in all); logs in {}",
        machine.cpus,
        machine.memory_mib,
        logs.display()
    );

    let interrupted = interrupted()?;
    let boot_started = Instant::now();
    // Both callbacks report progress; the session calls them one at a time.
    let progress = RefCell::new(Progress::new(boot_started));
    let outcome = session.watch(
        |markers| {
            progress.borrow_mut().markers(markers);
            core_moves::finished(markers)
        },
        Some(CORES_TIMEOUT),
        &interrupted,
        |_, _| progress.borrow_mut().heartbeat(),
    )?;
    session.stop()?;
    let wall = boot_started.elapsed();
    if outcome != Outcome::Satisfied {
        bail!(
            "the core-move run did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    println!("==> run over after {:.0}s of wall time", wall.as_secs_f64());

    let markers = session.markers();
    let moves = CoreMoves::from_markers(markers)
        .with_context(|| format!("reading the core-move markers (logs in {})", logs.display()))?;
    let mut problems = moves.problems();
    for bad in core_moves::BAD_EVENTS {
        for marker in markers.iter().filter(|m| m.ev() == bad) {
            problems.push(format!("unexpected marker: {}", marker.value));
        }
    }
    let bochsrc = std::fs::read_to_string(session.run_dir().file("bochsrc"))
        .context("reading the run's bochsrc")?;
    let bochs = bochs_settings(&bochsrc)?;

    let mut report = format!(
        "core moves: time is the TSC ({} Hz), virtual: Bochs cpu model={} count={} ips={} \
         clock sync={} (from the run's bochsrc)\n",
        moves.tsc_hz,
        bochs["cpu_model"].as_str().unwrap_or_default(),
        bochs["cpus"],
        bochs["ips"],
        bochs["clock_sync"].as_str().unwrap_or_default()
    );
    report.push_str(&format!(
        "config {}, hypervisor command line `{}` (seed {}, cycles {})\n",
        relative(&config).display(),
        hv_cmdline,
        args.seed,
        args.cycles
    ));
    report.push_str(&moves.table());

    let json = json!({
        "clock": {"source": "tsc", "virtual": true, "tsc_hz": moves.tsc_hz},
        "config": {
            "file": relative(&config),
            "hv_cmdline": hv_cmdline,
            "seed": args.seed,
            "cycles": args.cycles,
            "emulator": bochs,
            "memory_mib": machine.memory_mib,
        },
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "run_dir": logs,
        "problems": problems,
        "figures": moves.to_json(),
    });
    Ok(CoresResult {
        report,
        problems,
        json,
    })
}

/// Progress lines while Bochs runs: the core test's start and end, every tenth core that
/// comes online, and a heartbeat when the consoles are quiet for a while.
struct Progress {
    started: Instant,
    last_said: Instant,
    seen: usize,
    online: usize,
}

impl Progress {
    fn new(started: Instant) -> Progress {
        Progress {
            started,
            last_said: started,
            seen: 0,
            online: 0,
        }
    }

    fn say(&mut self, what: &str) {
        println!("    {:>4.0}s  {what}", self.started.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
        self.last_said = Instant::now();
    }

    fn markers(&mut self, markers: &[crate::marker::Marker]) {
        let new = &markers[self.seen.min(markers.len())..];
        self.seen = markers.len();
        for marker in new {
            match marker.ev() {
                "lavender_banner" => self.say("Lavender is up"),
                "core_test_start" => self.say("core test started"),
                "lavender_core_online" => {
                    self.online += 1;
                    if self.online.is_multiple_of(10) {
                        let text = format!("{} cores brought up so far", self.online);
                        self.say(&text);
                    }
                }
                "core_test_done" => self.say("core test done"),
                "process_exit" => self.say("the worker exited; waiting for Lavender to go idle"),
                _ => {}
            }
        }
    }

    fn heartbeat(&mut self) {
        if self.last_said.elapsed() >= HEARTBEAT {
            let text = format!("still running ({} markers so far)", self.seen);
            self.say(&text);
        }
    }
}

/// The emulator settings that define the virtual time, read from a generated bochsrc
/// (`cpu:` and `clock:` lines of `key=value` pairs).
pub(crate) fn bochs_settings(bochsrc: &str) -> Result<Value> {
    let line = |name: &str| -> Result<Vec<(&str, &str)>> {
        let prefix = format!("{name}:");
        let rest = bochsrc
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .with_context(|| format!("the bochsrc has no `{name}:` line"))?;
        Ok(rest
            .split(',')
            .filter_map(|pair| pair.trim().split_once('='))
            .collect())
    };
    let (cpu, clock) = (line("cpu")?, line("clock")?);
    let get = |pairs: &[(&str, &str)], key: &str| -> Result<String> {
        pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .with_context(|| format!("the bochsrc gives no `{key}`"))
    };
    let number = |pairs: &[(&str, &str)], key: &str| -> Result<u64> {
        let text = get(pairs, key)?;
        text.parse()
            .with_context(|| format!("the bochsrc's `{key}={text}` is not a number"))
    };
    Ok(json!({
        "name": "bochs",
        "cpu_model": get(&cpu, "model")?,
        "cpus": number(&cpu, "count")?,
        "ips": number(&cpu, "ips")?,
        "clock_sync": get(&clock, "sync")?,
        "time0": number(&clock, "time0")?,
    }))
}

/// The ring benchmark's interleaved A/B table.
#[derive(Debug, Clone, PartialEq)]
struct RingTable {
    trials: u32,
    iterations: u32,
    cases: Vec<RingCase>,
}

/// One case: ns per message (round trip: per round trip), ours against rtrb.
#[derive(Debug, Clone, PartialEq)]
struct RingCase {
    name: String,
    ours_median: f64,
    rtrb_median: f64,
    ours_best: f64,
    rtrb_best: f64,
    /// Trials in which ours was at least as fast.
    ours_wins: u32,
    /// Median over the trials of ours / rtrb from the same trial.
    paired_ratio: f64,
}

/// The column headings the parser expects, in the benchmark's order; a different table
/// is refused rather than misread.
const RING_COLUMNS: &str =
    "case ours med rtrb med med o/r ours best rtrb best best o/r ours<=rtrb pair o/r";

fn ring(trials: u32) -> Result<RingTable> {
    println!(
        "\n==> bench ring: vmcall-proto's ring against rtrb, {trials} interleaved trials \
         (host wall clock; prints nothing until every trial is done)"
    );
    let mut cmd = tools::cargo();
    cmd.args(["bench", "-p", "vmcall-proto", "--bench", "ring"])
        .env("RING_AB", trials.to_string())
        // Cargo's build progress shows live; the table is read from stdout.
        .stderr(Stdio::inherit());
    println!("    $ RING_AB={trials} {}", tools::describe(&cmd));
    let started = Instant::now();
    let out = output_with_heartbeat(&mut cmd)?;
    println!(
        "==> ring benchmark done after {:.0}s",
        started.elapsed().as_secs_f64()
    );
    parse_ring(&String::from_utf8_lossy(&out))
}

/// Runs `cmd` to completion, returning its stdout, saying every [`HEARTBEAT`] that it is
/// still going.
fn output_with_heartbeat(cmd: &mut Command) -> Result<Vec<u8>> {
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", tools::describe(cmd)))?;
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        let started = Instant::now();
        std::thread::spawn(move || {
            let mut next = HEARTBEAT;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if started.elapsed() >= next {
                    println!(
                        "    {:>4.0}s  still running",
                        started.elapsed().as_secs_f64()
                    );
                    next += HEARTBEAT;
                }
            }
        })
    };
    let out = child.wait_with_output();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let out = out?;
    if !out.status.success() {
        bail!("`{}` failed ({})", tools::describe(cmd), out.status);
    }
    Ok(out.stdout)
}

fn parse_ring(stdout: &str) -> Result<RingTable> {
    let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .find(|l| l.contains("interleaved trials"))
        .context("the ring benchmark printed no A/B table")?;
    // "<trials> interleaved trials, <iterations> iterations each; ..."
    let words: Vec<&str> = first.split_whitespace().collect();
    let (trials, iterations) = match words.as_slice() {
        [t, "interleaved", "trials,", i, "iterations", ..] => (t.parse()?, i.parse()?),
        _ => bail!("unexpected first line of the ring table: {first}"),
    };
    let header = lines.next().context("the ring table has no header")?;
    if header.split_whitespace().collect::<Vec<_>>().join(" ") != RING_COLUMNS {
        bail!("the ring table's columns changed (expected `{RING_COLUMNS}`): {header}");
    }
    let mut cases = Vec::new();
    for row in lines {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let [name, ours_median, rtrb_median, _, ours_best, rtrb_best, _, wins, pair] =
            cells.as_slice()
        else {
            bail!("unexpected row in the ring table: {row}");
        };
        let number = |cell: &str| -> Result<f64> {
            cell.parse()
                .with_context(|| format!("{cell:?} is not a number in: {row}"))
        };
        let ours_wins = wins
            .split_once('/')
            .and_then(|(won, _)| won.parse().ok())
            .with_context(|| format!("{wins:?} is not WINS/TRIALS in: {row}"))?;
        cases.push(RingCase {
            name: name.to_string(),
            ours_median: number(ours_median)?,
            rtrb_median: number(rtrb_median)?,
            ours_best: number(ours_best)?,
            rtrb_best: number(rtrb_best)?,
            ours_wins,
            paired_ratio: number(pair)?,
        });
    }
    if cases.is_empty() {
        bail!("the ring table has no rows");
    }
    Ok(RingTable {
        trials,
        iterations,
        cases,
    })
}

impl RingTable {
    fn report(&self) -> String {
        let mut out = format!(
            "ring: host wall-clock time (not virtual), {} interleaved trials of {} iterations; \
             ns per 64-byte message (round_trip: per round trip); paired o/r = median over \
             trials of ours/rtrb in the same trial (below 1: ours faster)\n",
            self.trials, self.iterations
        );
        out.push_str(&format!(
            "{:<16} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11}\n",
            "case", "ours ns", "rtrb ns", "paired o/r", "ours best", "rtrb best", "ours<=rtrb"
        ));
        for c in &self.cases {
            out.push_str(&format!(
                "{:<16} {:>9.2} {:>9.2} {:>10.3} {:>10.2} {:>10.2} {:>8}/{}\n",
                c.name,
                c.ours_median,
                c.rtrb_median,
                c.paired_ratio,
                c.ours_best,
                c.rtrb_best,
                c.ours_wins,
                self.trials
            ));
        }
        out
    }

    fn to_json(&self, requested_trials: u32) -> Value {
        let cases: Vec<Value> = self
            .cases
            .iter()
            .map(|c| {
                json!({
                    "case": c.name,
                    "ours_median_ns": c.ours_median,
                    "rtrb_median_ns": c.rtrb_median,
                    "ours_best_ns": c.ours_best,
                    "rtrb_best_ns": c.rtrb_best,
                    "ours_at_least_as_fast_trials": c.ours_wins,
                    "paired_ratio": c.paired_ratio,
                })
            })
            .collect();
        json!({
            "clock": "host wall clock",
            "command": format!(
                "RING_AB={requested_trials} cargo bench -p vmcall-proto --bench ring"
            ),
            "trials": self.trials,
            "iterations": self.iterations,
            "unit": "ns per message (round_trip: per round trip)",
            "cases": cases,
        })
    }
}

/// Writes `<bench dir>/<UTC time>.json` and copies it to `latest.json`; returns the first.
fn save(results: &Value, started: u64) -> Result<PathBuf> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.json", utc_stamp(started)));
    std::fs::write(&path, format!("{results:#}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::copy(&path, dir.join("latest.json")).context("writing latest.json")?;
    Ok(path)
}

/// The commit benchmarked, and whether the tree had changes on top of it; null outside git.
fn git_commit() -> Value {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => json!({
            "commit": commit,
            "dirty": git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
        }),
        None => Value::Null,
    }
}

/// What the wall-clock figures depend on: the host's CPUs and how loaded it was.
fn host() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok().map(|text| {
        text.split_whitespace()
            .take(3)
            .filter_map(|v| v.parse::<f64>().ok())
            .collect::<Vec<_>>()
    });
    json!({"cpus": cpus, "loadavg_at_start": loadavg})
}

/// A path under the workspace as a relative one, for reports.
fn relative(path: &Path) -> &Path {
    path.strip_prefix(crate::workspace_root()).unwrap_or(path)
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// (year, month, day, hour, minute, second) in UTC of a Unix time.
fn utc_fields(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Walk whole years, then months, from 1970: a few dozen steps, no date library needed.
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let (mut year, mut day) = (1970, days);
    while day >= if leap(year) { 366 } else { 365 } {
        day -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lengths = [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 1;
    for length in lengths {
        if day < length {
            break;
        }
        day -= length;
        month += 1;
    }
    (year, month, day + 1, rest / 3600, rest / 60 % 60, rest % 60)
}

/// `20240229T235959Z`: the results file name (sorts by time, no characters file systems mind);
/// run dirs use it too.
pub(crate) fn utc_stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `2024-02-29T23:59:59Z`.
fn utc_iso(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING_OUTPUT: &str = "\
10 interleaved trials, 4 iterations each; ns per message (round trip: per round trip)
case              ours med    rtrb med   med o/r ours best rtrb best  best o/r ours<=rtrb  pair o/r
single               21.53       24.10     0.893     19.87     22.01     0.903      8/10     0.881
batch32               6.12        5.40     1.133      5.90      5.01     1.178      1/10     1.120
round_trip          402.77      398.12     1.012    380.00    371.50     1.023      4/10     1.004
";

    #[test]
    fn ring_table_is_parsed() {
        let table = parse_ring(&format!("\n{RING_OUTPUT}\n")).unwrap();
        assert_eq!((table.trials, table.iterations), (10, 4));
        assert_eq!(table.cases.len(), 3);
        assert_eq!(
            table.cases[1],
            RingCase {
                name: "batch32".into(),
                ours_median: 6.12,
                rtrb_median: 5.40,
                ours_best: 5.90,
                rtrb_best: 5.01,
                ours_wins: 1,
                paired_ratio: 1.120,
            }
        );
        let report = table.report();
        assert!(report.contains("host wall-clock"), "{report}");
        assert!(report.contains("round_trip"), "{report}");
        let json = table.to_json(10);
        assert_eq!(json["cases"][0]["paired_ratio"], 0.881);
        assert_eq!(json["trials"], 10);
    }

    #[test]
    fn a_changed_or_missing_ring_table_is_refused() {
        assert!(parse_ring("criterion output\n")
            .unwrap_err()
            .to_string()
            .contains("no A/B table"));
        let renamed = RING_OUTPUT.replace("pair o/r", "paired");
        assert!(parse_ring(&renamed)
            .unwrap_err()
            .to_string()
            .contains("columns changed"));
        let short = RING_OUTPUT.replace("     8/10     0.881", "");
        assert!(parse_ring(&short)
            .unwrap_err()
            .to_string()
            .contains("unexpected row"));
    }

    #[test]
    fn bochs_settings_come_from_the_bochsrc() {
        let rc = "# Generated\n\
                  cpu: model=corei7_skylake_x, count=4, ips=50000000, reset_on_triple_fault=0\n\
                  memory: guest=1024, host=1024\n\
                  clock: sync=none, time0=1704067200\n";
        assert_eq!(
            bochs_settings(rc).unwrap(),
            json!({"name": "bochs", "cpu_model": "corei7_skylake_x", "cpus": 4,
                   "ips": 50_000_000, "clock_sync": "none", "time0": 1_704_067_200})
        );
        let err = bochs_settings("cpu: model=x, count=1, ips=1\n").unwrap_err();
        assert!(err.to_string().contains("`clock:`"), "{err}");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // Bochs's fixed start, 2024-01-01.
        assert_eq!(utc_iso(1_704_067_200), "2024-01-01T00:00:00Z");
        // A leap day and the second before the new year.
        assert_eq!(utc_iso(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(utc_stamp(1_735_689_599), "20241231T235959Z");
        assert_eq!(utc_iso(951_782_400), "2000-02-29T00:00:00Z");
    }
}
