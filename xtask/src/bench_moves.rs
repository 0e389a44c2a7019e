//! `cargo xtask bench --only moves`: cores moved between Linux and Lavender with `vmctl`, stage
//! by stage, in both directions.
//!
//! It boots the real system under Bochs with `tests/configs/linux-cores.toml` (Lavender runs its
//! primes worker, Linux a CPU load) and the agent's `vmctl-bench:N` self-test, which runs the
//! real `/bin/vmctl move-core` N times each way. The figures come from the hypervisor's
//! `core_move` markers (each stage's TSC time, and the TSC at the revoke) and, for Lavender's
//! first thread on the core, from Lavender's `lavender_core_online` (`first_pass_tsc`): both
//! read the same TSC; the agent's `linux_hotplug` markers (when its hotplug actor took each
//! event and when Linux's sysfs write returned, same TSC) split Linux's part of a move into
//! the actor's reaction, Linux's own hotplug and the confirmation. Every figure is µs since the move's revoke, so milestones that can come
//! in either order (Linux's CPU halts, and so parks, before the agent hears back from sysfs)
//! need no order. Bochs runs with `clock: sync=none`: this is virtual time.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::core_moves::Stats;
use crate::marker::Marker;
use crate::partitions::BuildMachine;
use crate::session::Outcome;

/// The configuration booted: the vmctl scenario's, with the self-test word replaced.
const CONFIG: &str = "linux-cores";
/// The self-test word in [`CONFIG`] that the bench replaces with `vmctl-bench:N`.
const SCENARIO_SELFTEST: &str = "tandem.selftest=vmctl-moves:20";
/// Lavender's allowed cores in [`CONFIG`], and with core 0 for `--no-monitor-core`.
const SCENARIO_LAVENDER_CORES: &str = "allowed_cores = [1, 2, 3]";
const NO_MONITOR_LAVENDER_CORES: &str = "allowed_cores = [0, 1, 2, 3]";
/// Lavender's command line in [`CONFIG`] (it boots idle; the scenario starts its work with
/// `vmctl exec`) and the one the bench gives it: the primes worker from boot.
const SCENARIO_LAVENDER: &str = "cmdline = \"workload=idle\"";
const BENCH_LAVENDER: &str = "cmdline = \"workload=primes threads=8 limit=200000 rounds=1000\"";
/// Wall time allowed for the boot and the moves (about 4 s of wall time per round trip on a
/// 2-core host shared with other emulators, plus 2 minutes of boot).
const TIMEOUT_BASE: Duration = Duration::from_secs(900);
const TIMEOUT_PER_ROUND: Duration = Duration::from_secs(30);
/// How long to wait after the last move for Lavender's deferred `lavender_core_online`
/// markers (it prints them from idle loops).
const ONLINE_GRACE: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(30);
const BAD_EVENTS: [&str; 5] = [
    "fatal",
    "panic",
    "guest_stopped",
    "isolation_violation",
    "agent_error",
];

#[derive(Debug, clap::Args)]
pub struct MovesArgs {
    /// Round trips of the core-move benchmark (`--only moves`): each moves a core of Linux to
    /// Lavender and back.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub move_rounds: u32,
    /// Let Lavender hold core 0 too (it stays in the pool: nobody asks for it), so that the
    /// hypervisor has no core of its own and does its work on the guests' exits, as in the
    /// default configuration; without it core 0 is the hypervisor's monitor core.
    #[arg(long)]
    pub no_monitor_core: bool,
}

pub struct MovesResult {
    pub report: String,
    pub problems: Vec<String>,
    pub json: Value,
}

/// One row: a milestone of one direction, in µs since the revoke (or between two milestones).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: &'static str,
    pub label: &'static str,
    pub stats: Option<Stats>,
}

/// The figures of both directions.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub to_lavender: Vec<Row>,
    pub to_linux: Vec<Row>,
    /// Moves that did not complete, and Linux -> Lavender moves with no first thread found.
    pub not_done: usize,
    pub unpaired: usize,
}

/// A completed move: µs since its revoke of each stage the hypervisor stamped.
struct Move {
    core: u64,
    from: String,
    to: String,
    start_tsc: u64,
    at: BTreeMap<String, u64>,
    total: u64,
}

fn parse_move(m: &Value) -> Result<Move> {
    let number = |key: &str| {
        m[key]
            .as_u64()
            .with_context(|| format!("core_move without {key}: {m}"))
    };
    let mut at = BTreeMap::new();
    let mut since = 0;
    // The stages are in the order they happened, each from the one before.
    for stage in m["stages"].as_array().into_iter().flatten() {
        let name = stage["stage"]
            .as_str()
            .with_context(|| format!("stage without a name: {m}"))?;
        since += stage["us"]
            .as_u64()
            .with_context(|| format!("stage without us: {m}"))?;
        at.insert(name.to_string(), since);
    }
    Ok(Move {
        core: number("core")?,
        from: m["from"].as_str().unwrap_or_default().to_string(),
        to: m["to"].as_str().unwrap_or_default().to_string(),
        start_tsc: number("start_tsc")?,
        at,
        total: number("total_us")?,
    })
}

/// Reads the run's markers into the two directions' rows.
pub fn figures(markers: &[Marker]) -> Result<Figures> {
    let tsc_hz = markers
        .iter()
        .find(|m| m.ev() == "boot_report")
        .and_then(|m| m.value["cpu"]["tsc_hz"].as_u64())
        .filter(|&hz| hz > 0)
        .context("no boot_report with the TSC frequency")?;
    let us = |ticks: u64| (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz)) as u64;
    let mut onlines: Vec<(u64, u64)> = markers
        .iter()
        .filter(|m| m.ev() == "lavender_core_online")
        .filter_map(|m| {
            Some((
                m.value["core"].as_u64()?,
                m.value["first_pass_tsc"].as_u64()?,
            ))
        })
        .collect();
    onlines.sort_by_key(|&(_, tsc)| tsc);
    // The agent's hotplug actor: (core, grant?, took the event, its sysfs write returned).
    let mut carried: Vec<(u64, bool, u64, u64)> = markers
        .iter()
        .filter(|m| m.ev() == "linux_hotplug" && m.value["ok"] == true)
        .filter_map(|m| {
            Some((
                m.value["core"].as_u64()?,
                m.value["event"] == "grant",
                m.value["taken_tsc"].as_u64()?,
                m.value["written_tsc"].as_u64()?,
            ))
        })
        .collect();
    carried.sort_by_key(|&(_, _, taken, _)| taken);
    let (mut done, mut not_done) = (Vec::new(), 0);
    for m in markers.iter().filter(|m| m.ev() == "core_move") {
        if m.value["outcome"] == "done" {
            done.push(parse_move(&m.value)?);
        } else {
            not_done += 1;
        }
    }
    let mut unpaired = 0;
    let mut samples: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let mut add = |key: &'static str, value: Option<u64>| {
        if let Some(v) = value {
            samples.entry(key).or_default().push(v);
        }
    };
    for mv in &done {
        let at = |stage: &str| mv.at.get(stage).copied();
        // The actor's part of this move, from its first event for the core after the revoke:
        // (revoke -> it took the event, its sysfs write, write returned -> `done`), in µs.
        let actor = |grant: bool, done: Option<u64>| {
            carried
                .iter()
                .find(|&&(core, g, taken, _)| core == mv.core && g == grant && taken > mv.start_tsc)
                .map(|&(_, _, taken, written)| {
                    let took = us(taken - mv.start_tsc);
                    let written = us(written.max(taken) - mv.start_tsc);
                    (
                        took,
                        written - took,
                        done.map(|d| d.saturating_sub(written)),
                    )
                })
        };
        match (mv.from.as_str(), mv.to.as_str()) {
            ("linux", "lavender") => {
                // Lavender's first scheduler pass on the core after this move's revoke.
                let first = onlines
                    .iter()
                    .find(|&&(core, tsc)| core == mv.core && tsc > mv.start_tsc)
                    .map(|&(_, tsc)| us(tsc - mv.start_tsc));
                unpaired += usize::from(first.is_none());
                add("l2v_offline", at("linux_offline"));
                if let Some((took, sysfs, confirmed)) = actor(false, at("linux_offline")) {
                    add("l2v_agent_took", Some(took));
                    add("l2v_sysfs", Some(sysfs));
                    add("l2v_confirmed", confirmed);
                }
                add("l2v_parked", at("parked"));
                add("l2v_entered", at("entered"));
                add("l2v_first_thread", first);
                add(
                    "l2v_handover",
                    at("entered")
                        .zip(at("parked"))
                        .map(|(e, p)| e.saturating_sub(p)),
                );
                add("l2v_total", first.or(Some(mv.total)));
            }
            ("lavender", "linux") => {
                add("v2l_parked", at("parked"));
                add("v2l_entered", at("entered"));
                add("v2l_online", at("linux_online"));
                if let Some((took, sysfs, confirmed)) = actor(true, at("linux_online")) {
                    add("v2l_agent_took", Some(took));
                    add("v2l_sysfs", Some(sysfs));
                    add("v2l_confirmed", confirmed);
                }
                add(
                    "v2l_handover",
                    at("entered").zip(at("parked")).map(|(e, p)| e - p),
                );
                add("v2l_total", Some(mv.total));
            }
            _ => {}
        }
    }
    let rows = |spec: &[(&'static str, &'static str)]| -> Vec<Row> {
        spec.iter()
            .map(|&(key, label)| Row {
                key,
                label,
                stats: samples.get(key).cloned().and_then(Stats::of),
            })
            .collect()
    };
    Ok(Figures {
        to_lavender: rows(&[
            ("l2v_offline", "revoke -> Linux offline done (agent, sysfs)"),
            ("l2v_agent_took", "  revoke -> the agent took it"),
            (
                "l2v_sysfs",
                "  Linux's sysfs offline write, start -> return",
            ),
            (
                "l2v_confirmed",
                "  write returned -> hypervisor saw Released",
            ),
            ("l2v_parked", "revoke -> parked (Linux's CPU halted)"),
            ("l2v_entered", "revoke -> Lavender's vCPU entered"),
            ("l2v_first_thread", "revoke -> Lavender's first thread"),
            ("l2v_handover", "parked -> Lavender's vCPU entered"),
            ("l2v_total", "whole move (to the first thread)"),
        ]),
        to_linux: rows(&[
            ("v2l_parked", "revoke -> parked (Lavender released)"),
            ("v2l_entered", "revoke -> Linux's vCPU entered"),
            ("v2l_online", "revoke -> Linux online done (agent)"),
            ("v2l_agent_took", "  revoke -> the agent took the grant"),
            ("v2l_sysfs", "  Linux's sysfs online write, start -> return"),
            ("v2l_confirmed", "  write returned -> hypervisor saw Online"),
            ("v2l_handover", "parked -> vCPU entered"),
            ("v2l_total", "whole move"),
        ]),
        not_done,
        unpaired,
    })
}

impl Figures {
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (title, rows) in [
            ("Linux -> Lavender", &self.to_lavender),
            ("Lavender -> Linux", &self.to_linux),
        ] {
            let _ = writeln!(
                out,
                "{:<48} {:>5} {:>9} {:>9} {:>9}",
                format!("{title} (virtual us)"),
                "count",
                "median",
                "p90",
                "worst"
            );
            for r in rows {
                let cell = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
                let s = r.stats;
                let _ = writeln!(
                    out,
                    "  {:<46} {:>5} {:>9} {:>9} {:>9}",
                    r.label,
                    s.map_or(0, |s| s.count),
                    cell(s.map(|s| s.median)),
                    cell(s.and_then(|s| s.p90)),
                    cell(s.map(|s| s.worst)),
                );
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let rows = |rows: &[Row]| -> Vec<Value> {
            rows.iter()
                .map(|r| {
                    json!({
                        "key": r.key,
                        "label": r.label,
                        "stats_us": r.stats.map(|s| json!({
                            "count": s.count, "median": s.median, "p90": s.p90, "worst": s.worst,
                        })),
                    })
                })
                .collect()
        };
        json!({
            "linux_to_lavender": rows(&self.to_lavender),
            "lavender_to_linux": rows(&self.to_linux),
            "moves_not_done": self.not_done,
            "unpaired_first_thread": self.unpaired,
        })
    }
}

/// `tests/configs/linux-cores.toml` with the agent told to run `vmctl-bench:N` and Lavender its
/// primes worker, written beside the bench results.
fn bench_config(rounds: u32, no_monitor_core: bool) -> Result<PathBuf> {
    let source = crate::workspace_root()
        .join("tests")
        .join("configs")
        .join(format!("{CONFIG}.toml"));
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    for word in [
        SCENARIO_SELFTEST,
        SCENARIO_LAVENDER,
        SCENARIO_LAVENDER_CORES,
    ] {
        if !text.contains(word) {
            bail!(
                "{} no longer holds `{word}`, which the bench replaces",
                source.display()
            );
        }
    }
    let text = text
        .replace(
            SCENARIO_SELFTEST,
            &format!("tandem.selftest=vmctl-bench:{rounds}"),
        )
        .replace(SCENARIO_LAVENDER, BENCH_LAVENDER);
    let text = if no_monitor_core {
        text.replacen(SCENARIO_LAVENDER_CORES, NO_MONITOR_LAVENDER_CORES, 1)
    } else {
        text
    };
    let dir = crate::bench::bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("moves.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Boots the system, waits for the round trips and reads the figures.
pub fn run(args: &MovesArgs) -> Result<MovesResult> {
    let rounds = args.move_rounds;
    let config = bench_config(rounds, args.no_monitor_core)?;
    let monitor = if args.no_monitor_core {
        "no monitor core: Lavender may hold core 0, the hypervisor works on the guests' exits"
    } else {
        "core 0 is the hypervisor's monitor core"
    };
    println!(
        "==> bench moves: tests/configs/{CONFIG}.toml with the agent's vmctl-bench:{rounds} \
         ({rounds} round trips of a core between Linux and Lavender through vmctl) under Bochs; \
         {monitor}"
    );
    // The machine `boot` emulates.
    let machine = BuildMachine::default();
    let mut session = crate::bench::boot("moves", &config, String::new())?;
    let logs = session.run_dir().path().to_path_buf();
    println!(
        "==> booting under Bochs ({} CPUs, {} MiB; Linux takes about 2 minutes to boot, then a \
         few seconds per move); logs in {}",
        machine.cpus,
        machine.memory_mib,
        logs.display()
    );
    let interrupted = crate::bench::interrupted()?;
    let started = Instant::now();
    // Both callbacks say things; the session calls them one at a time.
    let last_said = Cell::new(started);
    let mut seen = 0;
    let mut done_at: Option<Instant> = None;
    let say = |what: &str| {
        println!("    {:>4.0}s  {what}", started.elapsed().as_secs_f64());
        last_said.set(Instant::now());
    };
    let timeout = TIMEOUT_BASE + TIMEOUT_PER_ROUND * rounds;
    let outcome = session.watch(
        |markers| {
            for m in &markers[seen.min(markers.len())..] {
                match m.ev() {
                    "agent_ready" => say("Linux's agent is up"),
                    "vmctl_move" => {
                        let text = format!(
                            "round {} to {}: {} in {} us",
                            m.value["round"],
                            m.value["to"],
                            m.value["outcome"],
                            m.value["total_us"]
                        );
                        say(&text);
                    }
                    "vmctl_moves_done" => say("moves done"),
                    _ => {}
                }
            }
            seen = markers.len();
            if markers.iter().any(|m| BAD_EVENTS.contains(&m.ev())) {
                return true;
            }
            if !markers.iter().any(|m| m.ev() == "vmctl_moves_done") {
                return false;
            }
            let since = *done_at.get_or_insert_with(Instant::now);
            let onlines = markers
                .iter()
                .filter(|m| m.ev() == "lavender_core_online")
                .count();
            onlines >= rounds as usize || since.elapsed() > ONLINE_GRACE
        },
        Some(timeout),
        &interrupted,
        |_, _| {
            if last_said.get().elapsed() >= HEARTBEAT {
                say("still running");
            }
        },
    )?;
    session.stop()?;
    let wall = started.elapsed();
    if outcome != Outcome::Satisfied {
        bail!(
            "the move run did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    let markers = session.markers();
    let mut problems = crate::bench::unexpected_markers(markers, &BAD_EVENTS);
    let figures = figures(markers)
        .with_context(|| format!("reading the move markers (logs in {})", logs.display()))?;
    let done = markers.iter().find(|m| m.ev() == "vmctl_moves_done");
    if done.is_none_or(|d| d.value["ok"] != true) {
        problems.push(format!(
            "the self-test did not end well: {:?}",
            done.map(|d| &d.value)
        ));
    }
    if figures.not_done > 0 {
        problems.push(format!("{} moves did not complete", figures.not_done));
    }
    let bochsrc = std::fs::read_to_string(session.run_dir().file("bochsrc"))
        .context("reading the run's bochsrc")?;
    let bochs = crate::bench::bochs_settings(&bochsrc)?;
    let mut report = format!(
        "core moves between Linux and Lavender through vmctl: {rounds} round trips; time is the \
         TSC, virtual: Bochs cpu model={} count={} ips={} clock sync={} (from the run's \
         bochsrc); Lavender runs its primes worker, Linux a CPU load; {monitor}\n",
        bochs["cpu_model"].as_str().unwrap_or_default(),
        bochs["cpus"],
        bochs["ips"],
        bochs["clock_sync"].as_str().unwrap_or_default()
    );
    report.push_str(&figures.table());
    if figures.unpaired > 0 {
        let _ = writeln!(
            report,
            "({} moves to Lavender had no lavender_core_online marker yet: their whole move is \
             counted to the vCPU entry)",
            figures.unpaired
        );
    }
    let json = json!({
        "clock": {"source": "tsc", "virtual": true},
        "config": {
            "file": format!("tests/configs/{CONFIG}.toml"),
            "linux_selftest": format!("vmctl-bench:{rounds}"),
            "rounds": rounds,
            "monitor_core": !args.no_monitor_core,
            "emulator": bochs,
            "memory_mib": machine.memory_mib,
        },
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "run_dir": logs,
        "problems": problems,
        "figures": figures.to_json(),
    });
    Ok(MovesResult {
        report,
        problems,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::Port;

    fn marker(value: Value) -> Marker {
        Marker::printed(Port::Com2, value)
    }

    #[test]
    fn both_directions_from_the_markers() {
        // 1 MHz TSC: a tick is a µs.
        let markers = vec![
            marker(json!({"ev": "boot_report", "cpu": {"tsc_hz": 1_000_000}})),
            marker(
                json!({"ev": "core_move", "id": 1, "core": 3, "from": "linux", "to": "lavender",
                "outcome": "done", "total_us": 700, "start_tsc": 10_000,
                "stages": [{"stage": "parked", "us": 400}, {"stage": "startup_ipi", "us": 50},
                           {"stage": "entered", "us": 10}, {"stage": "linux_offline", "us": 240}]}),
            ),
            // Printed late, and one from an older move on the same core.
            marker(json!({"ev": "lavender_core_online", "core": 3, "first_pass_tsc": 10_500})),
            marker(json!({"ev": "lavender_core_online", "core": 3, "first_pass_tsc": 9_000})),
            marker(
                json!({"ev": "core_move", "id": 2, "core": 3, "from": "lavender", "to": "linux",
                "outcome": "done", "total_us": 900, "start_tsc": 20_000,
                "stages": [{"stage": "release_call", "us": 20}, {"stage": "parked", "us": 3},
                           {"stage": "startup_ipi", "us": 300}, {"stage": "entered", "us": 4},
                           {"stage": "linux_online", "us": 500}]}),
            ),
            // The actor's events: the revoke of move 1, the grant of move 2, and a failed
            // one (not counted).
            marker(
                json!({"ev": "linux_hotplug", "core": 3, "event": "revoke", "ok": true,
                "taken_tsc": 10_100, "written_tsc": 10_650}),
            ),
            marker(
                json!({"ev": "linux_hotplug", "core": 3, "event": "grant", "ok": true,
                "taken_tsc": 20_050, "written_tsc": 20_800}),
            ),
            marker(
                json!({"ev": "linux_hotplug", "core": 3, "event": "revoke", "ok": false,
                "taken_tsc": 30_001, "written_tsc": 30_002}),
            ),
            marker(
                json!({"ev": "core_move", "id": 3, "core": 3, "from": "linux", "to": "lavender",
                "outcome": "cancelled", "total_us": 9, "start_tsc": 30_000, "stages": []}),
            ),
        ];
        let f = figures(&markers).unwrap();
        let get = |rows: &[Row], key: &str| {
            rows.iter()
                .find(|r| r.key == key)
                .and_then(|r| r.stats)
                .map(|s| s.median)
        };
        assert_eq!(get(&f.to_lavender, "l2v_offline"), Some(700));
        assert_eq!(get(&f.to_lavender, "l2v_parked"), Some(400));
        assert_eq!(get(&f.to_lavender, "l2v_entered"), Some(460));
        assert_eq!(get(&f.to_lavender, "l2v_first_thread"), Some(500));
        assert_eq!(get(&f.to_lavender, "l2v_handover"), Some(60));
        assert_eq!(get(&f.to_linux, "v2l_parked"), Some(23));
        assert_eq!(get(&f.to_linux, "v2l_handover"), Some(304));
        assert_eq!(get(&f.to_linux, "v2l_online"), Some(827));
        assert_eq!(get(&f.to_lavender, "l2v_agent_took"), Some(100));
        assert_eq!(get(&f.to_lavender, "l2v_sysfs"), Some(550));
        assert_eq!(get(&f.to_lavender, "l2v_confirmed"), Some(50));
        assert_eq!(get(&f.to_linux, "v2l_agent_took"), Some(50));
        assert_eq!(get(&f.to_linux, "v2l_sysfs"), Some(750));
        assert_eq!(get(&f.to_linux, "v2l_confirmed"), Some(27));
        assert_eq!((f.not_done, f.unpaired), (1, 0));
        let table = f.table();
        assert!(table.contains("Linux -> Lavender (virtual us)"), "{table}");
        assert!(f.to_json()["lavender_to_linux"][0]["stats_us"]["median"] == 23);
    }

    #[test]
    fn a_run_without_the_tsc_frequency_is_refused() {
        assert!(figures(&[]).is_err());
    }
}
