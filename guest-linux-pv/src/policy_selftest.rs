//! `tandem.selftest=policies`: the core-allocation policies on a phase-changing load, driven
//! the way a user at the Linux shell would, with the real `/bin/vmctl`. Lavender runs its
//! primes worker from boot (busy) while Linux idles; then Linux runs a CPU load and Lavender's
//! worker ends (the reverse). The movable core is the one Linux holds besides its boot core.
//!
//! 1. `static` (the boot policy): for [`STATIC_WINDOW`] no core moves (`policy_phase`
//!    `static`);
//! 2. `vmctl rebalance --policy autonomous --period-ms 1`: the core moves to the busy
//!    Lavender; the decision's time after the switch, its reason and the move
//!    (`policy_phase` `autonomous`); then nothing moves for [`STEADY_WINDOW`];
//! 3. `vmctl rebalance --policy cooperative`: with the load unchanged nothing moves
//!    (`policy_phase` `cooperative_steady`);
//! 4. Linux starts two CPU-bound tasks; once Lavender offers a core (its worker ends, or
//!    between two of its rounds it reports fewer runnable threads than cores) the core comes
//!    back to Linux: the decision's reason, its time after Linux's first busy report and
//!    after the two reports it was decided on (`policy_phase` `cooperative`); then, once
//!    Lavender's worker is done, nothing moves (`cooperative_lavender_idle`);
//! 5. `vmctl status` and `vmctl trace -n 2` as a user sees them (`policy_status`), then
//!    `policies_done`.
//!
//! Times are the hypervisor's (its status page, TSC time: virtual under Bochs); the
//! scenario judges them.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::report;

const VMCTL: &str = "/bin/vmctl";
const WORD: &str = "tandem.selftest=policies";
/// How long `static` is watched (Linux time; virtual under Bochs).
const STATIC_WINDOW: Duration = Duration::from_millis(1500);
/// How long a steady load is watched for moves after a policy settled.
const STEADY_WINDOW: Duration = Duration::from_millis(1000);
/// How long a policy may take to move the core (generous; the scenario judges the time).
const MOVE_WAIT: Duration = Duration::from_secs(60);
/// How long Lavender's worker may run on.
const WORKER_WAIT: Duration = Duration::from_secs(900);
/// How often the status page is read while waiting: each read is a `vmctl` process, whose
/// work the autonomous policy sees as Linux being busy, so it is kept rare (the times judged
/// are the hypervisor's own stamps, not when this loop saw them).
const POLL: Duration = Duration::from_millis(200);

pub fn requested(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == WORD)
}

pub fn run() {
    if let Err(reason) = run_all() {
        report::emit(&report::error("selftest", &reason, |o| {
            o.str("test", "policies");
        }));
    }
}

struct Ran {
    status: i32,
    stdout: String,
    stderr: String,
}

fn vmctl(args: &[&str]) -> Result<Ran, String> {
    let out = Command::new(VMCTL)
        .args(args)
        .output()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    Ok(Ran {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn status() -> Result<Value, String> {
    let ran = vmctl(&["status", "--json"])?;
    if ran.status != 0 {
        return Err(format!("vmctl status failed: {}", ran.stderr.trim()));
    }
    serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("vmctl status --json: {e}"))
}

fn owner(page: &Value, core: u64) -> String {
    page["cores"][core as usize]["owner"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn done_moves(page: &Value) -> u64 {
    page["counts"]["done"].as_u64().unwrap_or(0)
}

/// A guest's last report as the policy engine keeps it: (runnable, when).
fn last_report(page: &Value, name: &str) -> Option<(u64, u64)> {
    let guest = page["policy"]["guests"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)?;
    let report = &guest["report"];
    Some((report["runnable"].as_u64()?, report["at_us"].as_u64()?))
}

/// Reads the status page until `done` says yes or `limit` passes.
fn wait_for(limit: Duration, mut done: impl FnMut(&Value) -> bool) -> Result<Value, String> {
    let until = Instant::now() + limit;
    loop {
        let page = status()?;
        if done(&page) || Instant::now() > until {
            return Ok(page);
        }
        std::thread::sleep(POLL);
    }
}

fn rebalance(args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["rebalance"];
    all.extend_from_slice(args);
    all.push("--json");
    let ran = vmctl(&all)?;
    // Short: Linux's own console lines may interleave with a long one.
    let now: Value = serde_json::from_str(ran.stdout.trim()).unwrap_or(Value::Null);
    report::emit(&report::marker("policy_switch", |o| {
        o.str("args", &args.join(" "))
            .i64("exit", ran.status.into())
            .str("policy", now["name"].as_str().unwrap_or("?"))
            .u64("since_us", now["since_us"].as_u64().unwrap_or(0))
            .str("stderr", ran.stderr.trim());
    }));
    if ran.status != 0 {
        return Err(format!(
            "vmctl rebalance {}: {}",
            args.join(" "),
            ran.stderr.trim()
        ));
    }
    serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("vmctl rebalance --json: {e}"))
}

/// The last decision of the policy in force on `page`, if it moved `core` to `to`.
fn decision_to<'a>(page: &'a Value, core: u64, to: &str) -> Option<&'a Value> {
    page["policy"]["decisions"]
        .as_array()?
        .iter()
        .rev()
        .find(|d| d["core"] == core && d["to"] == to && d["outcome"] == "done")
}

/// One phase's marker: the policy, the core's owner, the moves that ended during the phase
/// and, for a move, its decision (reason, inputs, time after `start_us`, and after the later
/// of the two guests' reports it read, for the cooperative policy).
fn phase(name: &str, page: &Value, core: u64, moves: u64, decision: Option<&Value>, start_us: u64) {
    report::emit(&report::marker("policy_phase", |o| {
        o.str("phase", name)
            .str("policy", page["policy"]["name"].as_str().unwrap_or("?"))
            .u64("core", core)
            .str("owner", &owner(page, core))
            .u64("moves_during", moves)
            .u64("start_us", start_us);
        if let Some(d) = decision {
            let at = d["at_us"].as_u64().unwrap_or(0);
            o.str("reason", d["reason"].as_str().unwrap_or("?"))
                .u64("decided_us", at)
                .u64("reaction_us", at.saturating_sub(start_us))
                .u64(
                    "after_reports_us",
                    at.saturating_sub(
                        d["giver"]["report_at_us"]
                            .as_u64()
                            .unwrap_or(0)
                            .max(d["taker"]["report_at_us"].as_u64().unwrap_or(0)),
                    ),
                )
                .u64("move_id", d["move_id"].as_u64().unwrap_or(0))
                .u64(
                    "taker_busy_permille",
                    d["taker"]["busy_permille"].as_u64().unwrap_or(0),
                )
                .u64(
                    "giver_busy_permille",
                    d["giver"]["busy_permille"].as_u64().unwrap_or(0),
                )
                .u64(
                    "taker_runnable",
                    d["taker"]["runnable"].as_u64().unwrap_or(0),
                )
                .u64("taker_wants", d["taker"]["wants"].as_u64().unwrap_or(0));
            let moved = page["moves"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["id"] == d["move_id"]));
            if let Some(m) = moved {
                o.u64("move_total_us", m["total_us"].as_u64().unwrap_or(0))
                    .u64("move_done_us", m["at_us"].as_u64().unwrap_or(0))
                    .bool("forced", m["forced"] == true);
            }
        }
    }));
}

fn start_load(tasks: usize) -> Result<Vec<Child>, String> {
    (0..tasks)
        .map(|_| {
            Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .map_err(|e| format!("starting the load: {e}"))
        })
        .collect()
}

fn run_all() -> Result<(), String> {
    let page = wait_for(Duration::from_secs(60), |_| true)?;
    // The core Linux holds besides its boot core: the one that moves.
    let linux = page["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "linux"))
        .ok_or("the status page names no 'linux' guest")?;
    let boot = linux["boot_core"].as_u64().ok_or("no boot core")?;
    let core = linux["held"]
        .as_array()
        .and_then(|h| h.iter().filter_map(Value::as_u64).find(|&c| c != boot))
        .ok_or("Linux holds no core besides its boot core")?;
    // Lavender's worker must be running (it reports runnable threads).
    let page = wait_for(Duration::from_secs(120), |p| {
        last_report(p, "lavender").is_some_and(|(r, _)| r >= 2)
    })?;
    if last_report(&page, "lavender").is_none_or(|(r, _)| r < 2) {
        return Err("Lavender never reported its worker running".into());
    }

    // 1. static: nothing moves.
    let before = done_moves(&page);
    let start = page["published_us"].as_u64().unwrap_or(0);
    std::thread::sleep(STATIC_WINDOW);
    let page = status()?;
    phase(
        "static",
        &page,
        core,
        done_moves(&page) - before,
        None,
        start,
    );

    // 2. autonomous: the core goes to the busy Lavender.
    let switched = rebalance(&["--policy", "autonomous", "--period-ms", "1"])?;
    let since = switched["since_us"].as_u64().unwrap_or(0);
    let before = done_moves(&page);
    let page = wait_for(MOVE_WAIT, |p| owner(p, core) == "lavender")?;
    phase(
        "autonomous",
        &page,
        core,
        done_moves(&page) - before,
        decision_to(&page, core, "lavender"),
        since,
    );
    let before = done_moves(&page);
    let start = page["published_us"].as_u64().unwrap_or(0);
    std::thread::sleep(STEADY_WINDOW);
    let page = status()?;
    phase(
        "autonomous_steady",
        &page,
        core,
        done_moves(&page) - before,
        None,
        start,
    );

    // 3. cooperative, the load unchanged: nothing moves.
    let switched = rebalance(&["--policy", "cooperative"])?;
    let since = switched["since_us"].as_u64().unwrap_or(0);
    let before = done_moves(&page);
    std::thread::sleep(STEADY_WINDOW);
    let page = status()?;
    phase(
        "cooperative_steady",
        &page,
        core,
        done_moves(&page) - before,
        None,
        since,
    );

    // 4. The reverse: Linux busy, then Lavender's worker ends. The core moves once Lavender
    // offers it (it reports fewer runnable threads than cores) while Linux asks.
    let load = start_load(2)?;
    let before = done_moves(&page);
    let mut busy_since = None;
    let page = wait_for(WORKER_WAIT, |p| {
        if busy_since.is_none() {
            busy_since = last_report(p, "linux")
                .filter(|&(r, _)| r >= 2)
                .map(|(_, at)| at);
        }
        owner(p, core) == "linux"
    })?;
    phase(
        "cooperative",
        &page,
        core,
        done_moves(&page) - before,
        decision_to(&page, core, "linux"),
        busy_since.unwrap_or(0),
    );
    // Lavender's worker ends while Linux keeps its load: nothing moves back.
    let before = done_moves(&page);
    let page = wait_for(WORKER_WAIT, |p| {
        last_report(p, "lavender").is_some_and(|(r, _)| r == 0)
    })?;
    let idle_at = last_report(&page, "lavender").map_or(0, |(_, at)| at);
    std::thread::sleep(STEADY_WINDOW);
    let page = status()?;
    phase(
        "cooperative_lavender_idle",
        &page,
        core,
        done_moves(&page) - before,
        None,
        idle_at,
    );

    // 5. What a user sees.
    let shown = vmctl(&["status"])?;
    let traced = vmctl(&["trace", "-n", "2"])?;
    report::emit(&report::marker("policy_status", |o| {
        o.i64("status_exit", shown.status.into())
            .str("status", &shown.stdout)
            .i64("trace_exit", traced.status.into())
            .str("trace", &traced.stdout);
    }));
    for mut task in load {
        let _ = task.kill();
        let _ = task.wait();
    }
    report::emit(&report::marker("policies_done", |o| {
        o.bool("ok", true);
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_word() {
        assert!(requested("console=ttyS0 tandem.selftest=policies"));
        assert!(!requested("tandem.selftest=vmctl-moves:3"));
    }
}
