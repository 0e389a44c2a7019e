//! `tandem.selftest=policies`: the core-allocation policies on a phase-changing load, driven
//! the way a user at the Linux shell would, with the real `/bin/vmctl`. Lavender's load is its
//! `primes` worker started with `vmctl exec --detach` and ended with `vmctl kill`; Linux's is
//! two CPU-bound shell loops. The movable core is the one Linux holds besides its boot core.
//!
//! 1. `static` (the boot policy), Lavender busy and Linux idle: for [`STATIC_WINDOW`] no core
//!    moves (`policy_phase` `static`);
//! 2. `vmctl rebalance --policy autonomous --period-ms 1`: the core moves to the busy
//!    Lavender (`autonomous`, timed from the switch); then nothing moves for
//!    [`STEADY_WINDOW`] (`autonomous_steady`);
//! 3. Lavender's worker killed, then Linux busy: the core comes back to Linux
//!    (`autonomous_back`, timed from the load step);
//! 4. `vmctl rebalance --policy cooperative` while both run, the load unchanged: nothing moves
//!    (`cooperative_steady_start`);
//! 5. Linux idle, Lavender's worker started: the core goes to Lavender (`cooperative`);
//!    nothing moves under the steady load (`cooperative_steady`);
//! 6. `vmctl move-core CORE --to linux --negotiable` while Lavender's worker runs: Lavender
//!    declines (`busy`), vmctl exits 1 and `vmctl trace` shows why (`policy_decline`);
//! 7. Lavender's worker killed: its offer of the core is final (the work that used it
//!    ended) and the core goes back to the pool (`cooperative_release`); then Linux busy:
//!    the core comes to Linux (`cooperative_back`); then nothing moves
//!    (`cooperative_lavender_idle`);
//! 8. `vmctl status` and `vmctl trace -n 3` as a user sees them (`policy_status`), then
//!    `policies_done`.
//!
//! A move's time is the hypervisor's decision time after the load step (`after_step_us`: the
//! later of the two guests' reports that started their current requests, which every guest
//! sends whatever the policy) and after the switch (`reaction_us`, phase 2). Times are the
//! hypervisor's (its status page, TSC time: virtual under Bochs); the scenario judges them.

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
/// Lavender's worker, installed in the initramfs.
const PRIMES: &str = "/usr/lib/tandem/lavender/primes";
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

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// How long `core` was held by a guest since boot, and how much of it idle (µs), as the policy
/// engine measured it.
fn core_use(page: &Value, core: u64) -> (u64, u64) {
    page["policy"]["cores"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["core"] == core))
        .map_or((0, 0), |c| (num(&c["owned_us"]), num(&c["idle_us"])))
}

/// One phase's marker: the policy, the core's owner, the moves that ended during the phase
/// and, for a move, its decision (reason, giver: a guest or the pool, inputs, time after
/// `start_us` and after the load step the two guests reported).
fn phase(name: &str, page: &Value, core: u64, moves: u64, decision: Option<&Value>, start_us: u64) {
    let (owned, idle) = core_use(page, core);
    report::emit(&report::marker("policy_phase", |o| {
        o.str("phase", name)
            .str("policy", page["policy"]["name"].as_str().unwrap_or("?"))
            .u64("core", core)
            .str("owner", &owner(page, core))
            .u64("moves_during", moves)
            .u64("start_us", start_us)
            .u64("end_us", num(&page["published_us"]))
            .u64("core_owned_us", owned)
            .u64("core_idle_us", idle);
        if let Some(d) = decision {
            let at = num(&d["at_us"]);
            let step =
                num(&d["giver"]["request_since_us"]).max(num(&d["taker"]["request_since_us"]));
            o.str("reason", d["reason"].as_str().unwrap_or("?"))
                .str("from", d["from"].as_str().unwrap_or("?"))
                .u64("decided_us", at)
                .u64("reaction_us", at.saturating_sub(start_us))
                .u64("step_us", step)
                .u64("after_step_us", at.saturating_sub(step))
                .u64("move_id", num(&d["move_id"]))
                .u64("taker_busy_permille", num(&d["taker"]["busy_permille"]))
                .u64("giver_busy_permille", num(&d["giver"]["busy_permille"]))
                .u64("taker_runnable", num(&d["taker"]["runnable"]))
                .u64("taker_wants", num(&d["taker"]["wants"]))
                .bool("giver_final_offer", d["giver"]["final_offer"] == true);
            let moved = page["moves"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["id"] == d["move_id"]));
            if let Some(m) = moved {
                o.u64("move_total_us", num(&m["total_us"]))
                    .u64("move_done_us", num(&m["at_us"]))
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

fn stop_load(load: Vec<Child>) {
    for mut task in load {
        let _ = task.kill();
        let _ = task.wait();
    }
}

/// Starts Lavender's worker (8 threads, rounds until killed, on up to 2 cores: it can use
/// the core the policies give Lavender); its pid.
fn start_lavender() -> Result<u64, String> {
    let ran = vmctl(&[
        "exec",
        "--detach",
        "--cores",
        "2",
        PRIMES,
        "threads=8",
        "limit=200000",
        "rounds=10000",
    ])?;
    if ran.status != 0 {
        return Err(format!("vmctl exec {PRIMES}: {}", ran.stderr.trim()));
    }
    ran.stdout
        .trim()
        .parse()
        .map_err(|_| format!("vmctl exec --detach printed no pid: {:?}", ran.stdout))
}

fn stop_lavender(pid: u64) -> Result<(), String> {
    // A killed process exits with 137: vmctl kill itself says 0.
    let ran = vmctl(&["kill", &pid.to_string()])?;
    if ran.status != 0 {
        return Err(format!("vmctl kill {pid}: {}", ran.stderr.trim()));
    }
    Ok(())
}

/// Waits for `core` to reach `to` and emits the phase `name` for it.
fn moved(name: &str, core: u64, to: &str, before: u64, start_us: u64) -> Result<Value, String> {
    let page = wait_for(MOVE_WAIT, |p| owner(p, core) == to)?;
    if owner(&page, core) != to {
        return Err(format!("{name}: core {core} never reached {to}"));
    }
    phase(
        name,
        &page,
        core,
        done_moves(&page) - before,
        decision_to(&page, core, to),
        start_us,
    );
    Ok(page)
}

/// Waits for the policy to send `core` from guest `from` back to the pool (a decision done
/// after `since_us`) and emits the phase `name` with that decision. The pool may not hold
/// the core by the time the page is read: a Linux made busy for a moment (this test's own
/// `vmctl` processes) takes it from there, so the decision is what is waited for.
fn released(name: &str, core: u64, from: &str, before: u64, since_us: u64) -> Result<(), String> {
    let release = |page: &Value| -> Option<Value> {
        decision_to(page, core, "hypervisor")
            .filter(|d| d["from"] == from && num(&d["at_us"]) >= since_us)
            .cloned()
    };
    let page = wait_for(MOVE_WAIT, |p| release(p).is_some())?;
    let Some(decision) = release(&page) else {
        return Err(format!(
            "{name}: core {core} never went from {from} to the pool"
        ));
    };
    phase(
        name,
        &page,
        core,
        done_moves(&page) - before,
        Some(&decision),
        since_us,
    );
    Ok(())
}

/// Watches [`STEADY_WINDOW`] and emits the phase `name` with the moves made meanwhile (and
/// a `policy_use` marker with the movable core's use at the start, for the benchmark).
fn steady(name: &str, core: u64) -> Result<Value, String> {
    let page = status()?;
    let before = done_moves(&page);
    let start = num(&page["published_us"]);
    let (owned, idle) = core_use(&page, core);
    report::emit(&report::marker("policy_use", |o| {
        o.str("phase", name)
            .u64("at_us", start)
            .u64("core_owned_us", owned)
            .u64("core_idle_us", idle);
    }));
    std::thread::sleep(STEADY_WINDOW);
    let page = status()?;
    phase(name, &page, core, done_moves(&page) - before, None, start);
    Ok(page)
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
    let core_text = core.to_string();

    // 1. static: Lavender busy, Linux idle, nothing moves.
    let mut worker = start_lavender()?;
    let page = wait_for(MOVE_WAIT, |p| {
        last_report(p, "lavender").is_some_and(|(r, _)| r >= 2)
    })?;
    if last_report(&page, "lavender").is_none_or(|(r, _)| r < 2) {
        return Err("Lavender never reported its worker running".into());
    }
    let before = done_moves(&page);
    let start = num(&page["published_us"]);
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

    // 2. autonomous: the core goes to the busy Lavender, then stays.
    let switched = rebalance(&["--policy", "autonomous", "--period-ms", "1"])?;
    moved(
        "autonomous",
        core,
        "lavender",
        done_moves(&page),
        num(&switched["since_us"]),
    )?;
    let page = steady("autonomous_steady", core)?;

    // 3. The reverse under autonomous: Lavender idle, then Linux busy (in this order for the
    // reason given at 7).
    let before = done_moves(&page);
    stop_lavender(worker)?;
    let load = start_load(2)?;
    moved("autonomous_back", core, "linux", before, 0)?;

    // 4. cooperative, switched while both run; the load unchanged: nothing moves.
    let switched = rebalance(&["--policy", "cooperative"])?;
    let page = steady("cooperative_steady_start", core)?;
    let since = num(&switched["since_us"]);

    // 5. Linux idle, Lavender busy: the core goes to Lavender, then stays.
    let before = done_moves(&page);
    stop_load(load);
    worker = start_lavender()?;
    moved("cooperative", core, "lavender", before, since)?;
    steady("cooperative_steady", core)?;

    // 6. A revoke Lavender may decline, while its worker runs: it does, and says why.
    let asked = vmctl(&["move-core", &core_text, "--to", "linux", "--negotiable"])?;
    let traced = vmctl(&["trace", "-n", "1"])?;
    let after = status()?;
    report::emit(&report::marker("policy_decline", |o| {
        o.i64("exit", asked.status.into())
            .str("stderr", asked.stderr.trim())
            .str("trace", &traced.stdout)
            .str("owner", &owner(&after, core));
    }));

    // 7. The reverse under cooperative: Lavender idle, then Linux busy; then nothing moves.
    // Lavender's worker ends first: while both guests are busy the core is contested (a
    // policy may rightly ask Lavender for it, which Lavender declines while its worker runs),
    // and the load step is Linux's report, which a `vmctl kill` made under Linux's load would
    // follow by the kill's own time.
    let before = done_moves(&after);
    stop_lavender(worker)?;
    released(
        "cooperative_release",
        core,
        "lavender",
        before,
        num(&after["published_us"]),
    )?;
    let load = start_load(2)?;
    moved("cooperative_back", core, "linux", before, 0)?;
    steady("cooperative_lavender_idle", core)?;

    // 8. What a user sees.
    let shown = vmctl(&["status"])?;
    let traced = vmctl(&["trace", "-n", "3"])?;
    report::emit(&report::marker("policy_status", |o| {
        o.i64("status_exit", shown.status.into())
            .str("status", &shown.stdout)
            .i64("trace_exit", traced.status.into())
            .str("trace", &traced.stdout);
    }));
    stop_load(load);
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
