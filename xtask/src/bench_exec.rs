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

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::session::Outcome;

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
    Ok(ExecResult {
        report,
        json: json!({
            "clock": {"source": "linux_monotonic", "virtual": true},
            "config": config,
            "runs": lavender.len(),
            "vmctl_exec_us": lavender_stats,
            "fork_exec_wait_us": linux_stats,
            "ratio_of_medians": (ratio * 100.0).round() / 100.0,
            "wall_seconds": started.elapsed().as_secs(),
            "run_dir": logs,
        }),
    })
}
