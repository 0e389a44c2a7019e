//! `cargo xtask bench --only exec`: load → exit of an empty Lavender program started from
//! Linux (`vmctl exec /usr/lib/tandem/lavender/status 0`, the whole path: vmctl starts, the
//! ELF file crosses the shared window, Lavender validates, loads and runs it, the exit's
//! notification reaches vmctl) against Linux's fork + exec + wait of an empty static program
//! (busybox `true`), interleaved in one boot.
//!
//! The PV agent does the timing (`tandem.selftest=exec-bench:N`, config
//! `tests/configs/exec-bench.toml`) with Linux's monotonic clock, which under Bochs
//! (`clock: sync=none`) is virtual time: deterministic for the emulator settings, not the
//! host's speed.
//!
//! Each `vmctl exec` run is also taken apart ([`STAGES`]): the agent stamps its steps with the
//! TSC (`vmctl_exec_stages_tsc` in its marker), Lavender stamps its own in its `process_start`
//! and `process_exit` markers (same TSC: the hypervisor sets no offset), joined by pid and
//! turned into µs with the hypervisor's `boot_report` TSC frequency.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::marker::Marker;
use crate::session::Outcome;

/// The stages of one `vmctl exec`, in order: a name and the two stamps it lies between (keys of
/// [`stamps`]). They add up to the whole run.
const STAGES: [(&str, &str, &str); 11] = [
    ("vmctl starts, connects to the agent", "spawned", "accepted"),
    ("agent's thread reads the request", "accepted", "request"),
    ("agent reads and checks the file", "request", "image_read"),
    (
        "file into the window, command on the ring",
        "image_read",
        "sent",
    ),
    ("command waits for Lavender", "sent", "lavender_read"),
    (
        "Lavender validates, loads, builds",
        "lavender_read",
        "loaded",
    ),
    ("loaded -> first user instruction", "loaded", "first_user"),
    ("first instruction -> exit", "first_user", "exit"),
    ("exit -> notification read by the agent", "exit", "exited"),
    ("agent relays the exit to vmctl", "exited", "relayed"),
    ("vmctl exits, reaped", "relayed", "reaped"),
];
/// Not on the path to the exit, shown apart: the pid's reply after the load (its reader then
/// attaches vmctl to the process).
const ASIDE: [(&str, &str, &str); 1] = [(
    "(loaded -> pid reply read by the agent)",
    "loaded",
    "replied",
)];

/// Every stamp of one run (TSC): the agent's, vmctl's spawn and reap, and Lavender's for the
/// same pid. `None` when Lavender's markers for it are missing.
fn stamps(agent: &Value, markers: &[Marker]) -> Option<Vec<(&'static str, u64)>> {
    let pid = agent["pid"].as_u64()?;
    let lavender = |ev: &str| {
        markers
            .iter()
            .find(|m| m.ev() == ev && m.value["pid"] == pid)
    };
    let (start, exit) = (lavender("process_start")?, lavender("process_exit")?);
    let mut stamps = Vec::new();
    for key in [
        "spawned",
        "accepted",
        "request",
        "image_read",
        "sent",
        "replied",
        "exited",
        "relayed",
        "reaped",
    ] {
        stamps.push((key, agent[key].as_u64()?));
    }
    for (key, marker, field) in [
        ("lavender_read", start, "requested_tsc"),
        ("loaded", start, "loaded_tsc"),
        ("first_user", exit, "first_user_tsc"),
        ("exit", exit, "exit_tsc"),
    ] {
        stamps.push((key, marker.value[field].as_u64().filter(|&t| t != 0)?));
    }
    Some(stamps)
}

/// Each stage's µs per run (rows of [`STAGES`] then [`ASIDE`]), from the runs whose stamps
/// are all there.
fn stage_times(marker: &Value, markers: &[Marker], tsc_hz: u64) -> Vec<Vec<u64>> {
    let mut times = vec![Vec::new(); STAGES.len() + ASIDE.len()];
    for run in marker["vmctl_exec_stages_tsc"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(stamps) = stamps(run, markers) else {
            continue;
        };
        let at = |key: &str| stamps.iter().find(|(k, _)| *k == key).map_or(0, |s| s.1);
        for (row, (_, from, to)) in STAGES.iter().chain(&ASIDE).enumerate() {
            let ticks = at(to).saturating_sub(at(from));
            times[row].push((u128::from(ticks) * 1_000_000 / u128::from(tsc_hz)) as u64);
        }
    }
    times
}

/// Each run's load -> exit as Lavender does it for a launcher on Linux: from the agent holding
/// the request (it reads the ELF file next, as `execve` would) to its reading of the exit's
/// notification. The stages between `request` and `exited`, summed; what is left out is
/// `vmctl`'s own life as a Linux process and the relays between it and the agent.
fn load_to_exit(stage_runs: &[Vec<u64>]) -> Vec<u64> {
    let first = STAGES.iter().position(|(_, from, _)| *from == "request");
    let last = STAGES.iter().position(|(_, _, to)| *to == "exited");
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    let runs = stage_runs[first].len();
    (0..runs)
        .map(|run| {
            stage_runs[first..=last]
                .iter()
                .map(|stage| stage[run])
                .sum()
        })
        .collect()
}

/// The boot and the runs (wall time; Linux's boot under Bochs is most of it).
const TIMEOUT: Duration = Duration::from_secs(2400);

/// What the exec part reports.
pub struct ExecResult {
    pub report: String,
    pub json: Value,
}

fn config() -> std::path::PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("configs")
        .join("exec-bench.toml")
}

/// Median and the other order statistics of `values` (µs).
fn stats(values: &[u64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    json!({"min": at(0.0), "p25": at(0.25), "median": at(0.5), "p75": at(0.75), "max": at(1.0)})
}

pub fn run() -> Result<ExecResult> {
    let config = config();
    println!(
        "==> bench exec: {} under Bochs (Linux boots first: several minutes)",
        config.display()
    );
    let mut session = crate::bench::boot("exec", &config, String::new())?;
    let logs = session.run_dir().path().to_path_buf();
    // The emulator runs in a process group of its own, so Ctrl-C reaches only us.
    let interrupted = crate::bench::interrupted()?;
    let started = Instant::now();
    let mut last_said = Instant::now();
    let outcome = session.watch(
        |markers| {
            markers.iter().any(|m| {
                m.ev() == "exec_bench" || m.ev() == "agent_error" && m.value["code"] == "exec_bench"
            })
        },
        Some(TIMEOUT),
        &interrupted,
        |_, _| {
            if last_said.elapsed() >= Duration::from_secs(60) {
                println!(
                    "    {:>4.0}s  still running",
                    started.elapsed().as_secs_f64()
                );
                last_said = Instant::now();
            }
        },
    )?;
    session.stop()?;
    if outcome != Outcome::Satisfied {
        bail!(
            "the exec benchmark did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    let marker = session
        .markers()
        .iter()
        .find(|m| m.ev() == "exec_bench")
        .map(|m| m.value.clone())
        .with_context(|| format!("the agent's benchmark failed (logs in {})", logs.display()))?;
    let series = |key: &str| -> Vec<u64> {
        marker[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect()
    };
    let (lavender, linux) = (series("vmctl_exec_us"), series("fork_exec_wait_us"));
    if lavender.is_empty() || lavender.len() != linux.len() {
        bail!("the exec_bench marker has no paired runs: {marker}");
    }
    let (lavender_stats, linux_stats) = (stats(&lavender), stats(&linux));
    let tsc_hz = session
        .markers()
        .iter()
        .find(|m| m.ev() == "boot_report")
        .and_then(|m| m.value["cpu"]["tsc_hz"].as_u64())
        .filter(|&hz| hz > 0)
        .context("no boot_report with the TSC frequency")?;
    let stage_runs = stage_times(&marker, session.markers(), tsc_hz);
    let ratio = lavender_stats["median"].as_f64().unwrap_or(0.0)
        / linux_stats["median"].as_f64().unwrap_or(1.0).max(1.0);
    let row = |name: &str, s: &Value| {
        let at = |key: &str| s[key].as_u64().unwrap_or(0);
        format!(
            "{name:<44} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            at("min"),
            at("p25"),
            at("median"),
            at("p75"),
            at("max")
        )
    };
    let mut report = format!(
        "exec: {} interleaved runs each, Linux's monotonic clock, virtual time under Bochs \
         (clock sync=none), config {}\n",
        lavender.len(),
        config
            .strip_prefix(crate::workspace_root())
            .unwrap_or(&config)
            .display()
    );
    report.push_str(&format!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "us", "min", "p25", "median", "p75", "max"
    ));
    report.push_str(&row(
        "vmctl exec lavender/status 0 (load -> exit)",
        &lavender_stats,
    ));
    report.push_str(&row("fork + exec + wait of busybox true", &linux_stats));
    report.push_str(&format!(
        "ratio of medians: {ratio:.2}x (goal <= 1.0x; seed 001: 1.81x)\n"
    ));
    let loads = load_to_exit(&stage_runs);
    let load_stats = (!loads.is_empty()).then(|| stats(&loads));
    if let Some(load_stats) = &load_stats {
        let load_ratio = load_stats["median"].as_f64().unwrap_or(0.0)
            / linux_stats["median"].as_f64().unwrap_or(1.0).max(1.0);
        report.push_str(&row(
            "Lavender's load -> exit (agent's request ->",
            load_stats,
        ));
        report.push_str(&format!(
            "  exit notification read; TSC): {load_ratio:.2}x fork + exec + wait, without \
             vmctl's own fork, exec, exit and reap\n"
        ));
    }
    let staged = stage_runs[0].len();
    report.push_str(&format!(
        "vmctl exec taken apart ({staged} runs; TSC at {tsc_hz} Hz, agent's and Lavender's \
         stamps):\n"
    ));
    let mut stages_json = Vec::new();
    for ((name, from, to), times) in STAGES.iter().chain(&ASIDE).zip(&stage_runs) {
        if times.is_empty() {
            continue;
        }
        let s = stats(times);
        report.push_str(&row(name, &s));
        stages_json.push(json!({"stage": name, "from": from, "to": to, "us": s}));
    }
    Ok(ExecResult {
        report,
        json: json!({
            "clock": {"source": "linux_monotonic", "virtual": true},
            "config": config,
            "runs": lavender.len(),
            "vmctl_exec_us": lavender_stats,
            "fork_exec_wait_us": linux_stats,
            "tsc_hz": tsc_hz,
            "vmctl_exec_stages": stages_json,
            "lavender_load_to_exit_us": load_stats,
            "ratio_of_medians": (ratio * 100.0).round() / 100.0,
            "wall_seconds": started.elapsed().as_secs(),
            "run_dir": logs,
        }),
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
    fn a_run_is_taken_apart_by_pid_into_stages_that_add_up() {
        // 1 MHz: a tick is a microsecond.
        let agent = json!({"vmctl_exec_stages_tsc": [
            {"pid": 7, "spawned": 1000, "accepted": 1100, "request": 1150, "image_read": 1200,
             "sent": 1300, "replied": 1900, "exited": 2600, "relayed": 2700,
             "reaped": 3000},
            // No Lavender markers for pid 8: left out.
            {"pid": 8, "spawned": 1, "accepted": 1, "request": 1, "image_read": 1, "sent": 1,
             "replied": 1, "exited": 1, "relayed": 1, "reaped": 1},
        ]});
        let markers = [
            marker(json!({"ev": "process_start", "pid": 6, "requested_tsc": 1, "loaded_tsc": 1})),
            marker(
                json!({"ev": "process_start", "pid": 7, "requested_tsc": 1400,
                          "loaded_tsc": 1800}),
            ),
            marker(
                json!({"ev": "process_exit", "pid": 7, "first_user_tsc": 2000,
                          "exit_tsc": 2100}),
            ),
        ];
        let times = stage_times(&agent, &markers, 1_000_000);
        let column: Vec<u64> = times.iter().map(|t| t[0]).collect();
        assert!(times.iter().all(|t| t.len() == 1));
        assert_eq!(
            column,
            [100, 50, 50, 100, 100, 400, 200, 100, 500, 100, 300, 100]
        );
        let whole: u64 = column[..STAGES.len()].iter().sum();
        assert_eq!(whole, 3000 - 1000);
        // From the agent's request (1150) to the notification read (2600).
        assert_eq!(load_to_exit(&times), [2600 - 1150]);
    }
}
