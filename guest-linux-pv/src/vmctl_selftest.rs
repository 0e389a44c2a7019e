//! `tandem.selftest=vmctl-moves:N`: what a user at the Linux shell would do with `vmctl`,
//! run by the agent so a scenario needs no typing. It runs the real `/bin/vmctl` binary:
//!
//! 1. bad inputs, each with its message and exit status (`vmctl_refusal` markers): an
//!    unknown core, an unknown guest, a core the target may not hold, a core the target holds
//!    already, bad usage, a non-root user (vmctl itself and a raw request to the agent's
//!    socket), and `CORE_MOVE` without the holder token;
//! 2. with a CPU load running in Linux and the soak load in both guests (`crate::soak`:
//!    Lavender's primes worker and delegated programs run with `vmctl exec`, probes of
//!    descriptors, frames and threads before and after), N round trips of the last core of
//!    Linux (CPU 1) to Lavender and back; after each move, `/proc/cpuinfo`, the hypervisor
//!    (`QUERY_CORE`) and `vmctl status --json` must agree on the owner (`vmctl_move`
//!    markers), then `vmctl_moves_done`;
//! 3. `vmctl stats`: the figures since boot (`vmctl_stats`), two reports a second apart
//!    (`vmctl_stats_interval`), a reset refused to a user and to a caller without the token
//!    and done for root (`vmctl_refusal`, `vmctl_stats_reset`);
//! 4. what the owner or the hypervisor refuses, each with its message and exit status
//!    (`vmctl_refusal`): a guest's boot core, Linux refusing a revoke, Linux not answering
//!    one in time, a move while another is in flight, and a target that never starts the
//!    core (the agent's hotplug actor is told to refuse or to stay silent for these); then
//!    the figures since the reset (`vmctl_stats_after`).
//!
//! `tandem.selftest=vmctl-basic:N` runs steps 1 and 2 (the nested-KVM scenario, where each of
//! step 4's hotplug checks costs minutes); `tandem.selftest=vmctl-soak:N` runs step 2 alone
//! (`cargo xtask test --soak`, N up to 1000 round trips); `tandem.selftest=vmctl-bench:N` runs
//! step 2's moves alone, without the soak load, for `cargo xtask bench --only moves`, and
//! after each move a `linux_hotplug` marker with when the hotplug actor took the event and
//! when Linux's sysfs write returned.
//!
//! `tandem.selftest_slowdown=K` (1 to 100, default 1) says the machine is K times slower
//! than Tandem under Bochs alone (Tandem under nested KVM inside Bochs: every exit of a
//! guest goes through KVM and Bochs's VMX emulation). Every wait of the self-test is
//! stretched K times: the moves' timeouts (`--timeout`, at most the hypervisor's 60 s; the
//! moves that should succeed get the hypervisor's default 5 s times K) and how long the views
//! may take to agree. The outcomes asked for are the same.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmcall_proto::hypercall::{vmcall, CoreOwnership, CoreState, Hypercall, HypercallFailure};
use vmcall_proto::marker::JsonObject;

use crate::hotplug::{self, Behaviour};
use crate::report;
use crate::selftest::parse_cpuinfo;
use crate::vmctl_proto::SOCKET;

const VMCTL: &str = "/bin/vmctl";
/// An unprivileged user for the refusal checks (no entry in /etc/passwd is needed).
const NOBODY: u32 = 65534;
/// How long the views may take to agree after a move (the agent answers the hypervisor
/// before Linux's own bookkeeping settles).
const SETTLE: Duration = Duration::from_secs(5);
/// The command-line word for the machine's slowdown (see the module's documentation).
const SLOWDOWN_KEY: &str = "tandem.selftest_slowdown";
/// The largest slowdown accepted.
const MAX_SLOWDOWN: u32 = 100;
/// The hypervisor's timeout for a move that names none, and the longest it accepts.
const DEFAULT_MOVE_TIMEOUT_MS: u64 = 5_000;
const MAX_MOVE_TIMEOUT_MS: u64 = 60_000;

/// What the command line asks for: every check (`vmctl-moves:N`), the bad inputs and the
/// round trips under the soak load (`vmctl-basic:N`), the round trips under the soak load
/// (`vmctl-soak:N`) or the round trips alone (`vmctl-bench:N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Checks,
    Basic,
    Soak,
    Bench,
}

/// The mode and round trips asked for on the command line (N from 1 to 1000).
pub fn requested(cmdline: &str) -> Option<(Mode, u32)> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| {
            w.strip_prefix(crate::selftest::SELFTEST_KEY)?
                .strip_prefix('=')
        })
        .find_map(|t| {
            let (mode, n) = if let Some(n) = t.strip_prefix("vmctl-moves:") {
                (Mode::Checks, n)
            } else if let Some(n) = t.strip_prefix("vmctl-basic:") {
                (Mode::Basic, n)
            } else if let Some(n) = t.strip_prefix("vmctl-soak:") {
                (Mode::Soak, n)
            } else {
                (Mode::Bench, t.strip_prefix("vmctl-bench:")?)
            };
            Some((mode, n.parse().ok()?))
        })
        .filter(|(_, n)| (1..=1000).contains(n))
}

/// The machine's slowdown from `tandem.selftest_slowdown=K`: 1 when absent; an error for a
/// word that is not a number from 1 to 100.
pub fn slowdown(cmdline: &str) -> Result<u32, String> {
    let Some(text) = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(SLOWDOWN_KEY)?.strip_prefix('='))
    else {
        return Ok(1);
    };
    text.parse()
        .ok()
        .filter(|k| (1..=MAX_SLOWDOWN).contains(k))
        .ok_or(format!(
            "{SLOWDOWN_KEY}={text}: expected a whole number from 1 to {MAX_SLOWDOWN}"
        ))
}

/// The self-test's waits on a machine `slowdown` times slower than Bochs alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waits {
    slowdown: u32,
}

impl Waits {
    /// A move timeout of `ms` on Bochs alone, stretched (the hypervisor's maximum at most).
    fn timeout(self, ms: u64) -> String {
        (ms * u64::from(self.slowdown))
            .min(MAX_MOVE_TIMEOUT_MS)
            .to_string()
    }

    /// The `--timeout` words for a move that should succeed: none on Bochs alone (vmctl's
    /// default, the hypervisor's 5 s), else that default stretched.
    fn for_move(self) -> Vec<String> {
        if self.slowdown == 1 {
            Vec::new()
        } else {
            vec!["--timeout".into(), self.timeout(DEFAULT_MOVE_TIMEOUT_MS)]
        }
    }

    fn settle(self) -> Duration {
        SETTLE * self.slowdown
    }
}

/// `vmctl move-core CORE --to TO` with `timeout` (the `--timeout` words, if any).
fn move_args<'a>(core: &'a str, to: &'a str, timeout: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["move-core", core, "--to", to];
    args.extend(timeout.iter().map(String::as_str));
    args
}

struct Ran {
    status: i32,
    stdout: String,
    stderr: String,
}

fn vmctl(args: &[&str], uid: Option<u32>) -> Result<Ran, String> {
    let mut command = Command::new(VMCTL);
    command.args(args);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let out = command
        .output()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    Ok(Ran {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

pub fn run(mode: Mode, rounds: u32, slowdown: u32) {
    if let Err(reason) = run_all(mode, rounds, Waits { slowdown }) {
        report::emit(&report::error("selftest", &reason, |o| {
            o.str("test", "vmctl-moves");
        }));
    }
}

fn run_all(mode: Mode, rounds: u32, waits: Waits) -> Result<(), String> {
    // The agent's socket comes up on its own thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(SOCKET).is_err() {
        if Instant::now() > deadline {
            return Err(format!("the agent's socket {SOCKET} never came up"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(mode, Mode::Checks | Mode::Basic) {
        refusals()?;
    }
    let status = status_json()?;
    let linux_id = guest_id(&status, "linux")?;
    let lavender_id = guest_id(&status, "lavender")?;
    let cpus = cpuinfo()?;
    let &(cpu, core) = cpus
        .iter()
        .filter(|(cpu, _)| *cpu != 0)
        .max()
        .ok_or("Linux has only CPU 0 online")?;
    let total = cpus.len();
    let soak = match mode {
        Mode::Checks | Mode::Basic | Mode::Soak => Some(crate::soak::start(&crate::soak::root())?),
        Mode::Bench => None,
    };
    let timeout = waits.for_move();
    let load = start_load()?;
    let mut agreed = 0;
    let mut moves = 0;
    for round in 1..=rounds {
        for (to, id, linux_cpus) in [
            ("lavender", lavender_id, total - 1),
            ("linux", linux_id, total),
        ] {
            moves += 1;
            let core_text = core.to_string();
            let mut args = move_args(&core_text, to, &timeout);
            args.push("--json");
            let ran = vmctl(&args, None)?;
            let result: Value = serde_json::from_str(ran.stdout.trim()).unwrap_or(Value::Null);
            let (seen_cpus, hv_owner, status_owner, agree) =
                observe(u64::from(core), linux_cpus, id, to, waits)?;
            agreed += u32::from(agree && ran.status == 0);
            report::emit(&report::marker("vmctl_move", |o| {
                o.u64("round", round.into())
                    .u64("cpu", cpu.into())
                    .u64("core", core.into())
                    .str("to", to)
                    .i64("exit", ran.status.into())
                    .str("outcome", result["outcome"].as_str().unwrap_or("?"))
                    .u64("total_us", result["total_us"].as_u64().unwrap_or(0))
                    .u64("cpuinfo_cpus", seen_cpus as u64)
                    .str("hv_owner", &hv_owner)
                    .str("status_owner", &status_owner)
                    .bool("agree", agree);
                o.array("stages", |a| {
                    for stage in result["stages"].as_array().into_iter().flatten() {
                        a.object(|s| {
                            s.str("stage", stage["stage"].as_str().unwrap_or("?"))
                                .u64("us", stage["us"].as_u64().unwrap_or(0));
                        });
                    }
                });
                if ran.status != 0 {
                    o.str("stderr", ran.stderr.trim());
                }
            }));
            if mode == Mode::Bench {
                // The agent's own part of the move, for the bench to split Linux's stage.
                for carried in crate::hotplug::take_carried() {
                    report::emit(&report::marker("linux_hotplug", |o| {
                        o.u64("core", carried.core)
                            .str("event", if carried.online { "grant" } else { "revoke" })
                            .bool("ok", carried.ok)
                            .u64("taken_tsc", carried.taken_tsc)
                            .u64("written_tsc", carried.written_tsc);
                    }));
                }
            }
        }
    }
    stop_load(load);
    if let Some(soak) = soak {
        crate::soak::finish(soak, moves)?;
    }
    // The trace lists the last moves, newest last (the hypervisor keeps 8).
    let trace = vmctl(&["trace", "-n", "2", "--json"], None)?;
    let traced: Vec<Value> = trace
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    report::emit(&report::marker("vmctl_trace", |o| {
        o.i64("exit", trace.status.into());
        o.array("moves", |a| {
            for m in &traced {
                a.object(|t| {
                    t.u64("id", m["id"].as_u64().unwrap_or(0))
                        .str("to", m["to"].as_str().unwrap_or("?"))
                        .str("outcome", m["outcome"].as_str().unwrap_or("?"));
                });
            }
        });
    }));
    let text = vmctl(&["status"], None)?;
    // The human-readable table, once, for the log.
    for line in text.stdout.lines() {
        println!("vmctl status: {line}");
    }
    if mode == Mode::Checks {
        stats_checks()?;
        owner_refusals(cpu, core, total, waits)?;
    }
    report::emit(&report::marker("vmctl_moves_done", |o| {
        o.u64("rounds", rounds.into())
            .u64("moves", moves)
            .u64("agreed", agreed.into())
            .bool("ok", agreed as u64 == moves);
    }));
    Ok(())
}

/// A one-line summary of a `vmctl stats --json` report for a marker: the moves, each guest's
/// exit count and time, the cores listed and the stage medians.
fn stats_summary(o: &mut JsonObject<'_, String>, page: &Value) {
    o.u64(
        "reset_generation",
        page["reset_generation"].as_u64().unwrap_or(0),
    );
    o.object("moves", |m| {
        for (name, value) in page["moves"].as_object().into_iter().flatten() {
            m.u64(name, value.as_u64().unwrap_or(0));
        }
    });
    o.array("guests", |a| {
        for g in page["guests"].as_array().into_iter().flatten() {
            let exits = g["exits"].as_array().cloned().unwrap_or_default();
            let sum = |key: &str| exits.iter().filter_map(|e| e[key].as_u64()).sum::<u64>();
            a.object(|j| {
                j.str("name", g["name"].as_str().unwrap_or("?"))
                    .u64("count", sum("count"))
                    .u64("time_us", sum("time_us"))
                    .u64("reasons", exits.len() as u64);
            });
        }
    });
    o.u64(
        "cores",
        page["cores"].as_array().map_or(0, |c| c.len() as u64),
    );
    o.array("stages", |a| {
        for st in page["stages"].as_array().into_iter().flatten() {
            a.object(|j| {
                j.str("from", st["from"].as_str().unwrap_or("?"))
                    .str("to", st["to"].as_str().unwrap_or("?"))
                    .str("stage", st["stage"].as_str().unwrap_or("?"))
                    .u64("count", st["count"].as_u64().unwrap_or(0))
                    .u64("median_us", st["median_us"].as_u64().unwrap_or(0));
            });
        }
    });
    if let Some(us) = page["interval_us"].as_u64() {
        o.u64("interval_us", us);
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Step 3: `vmctl stats`, its interval reports and its reset.
fn stats_checks() -> Result<(), String> {
    // The tables, once, for the log.
    let shown = vmctl(&["stats", "--per-core"], None)?;
    for line in shown.stdout.lines() {
        println!("vmctl stats --per-core: {line}");
    }
    let ran = vmctl(&["stats", "--json"], None)?;
    let page = json_lines(&ran.stdout).pop().unwrap_or(Value::Null);
    report::emit(&report::marker("vmctl_stats", |o| {
        o.i64("exit", ran.status.into());
        stats_summary(o, &page);
    }));
    let ran = vmctl(
        &["stats", "--interval", "1", "--count", "2", "--json"],
        None,
    )?;
    let reports = json_lines(&ran.stdout);
    report::emit(&report::marker("vmctl_stats_interval", |o| {
        o.i64("exit", ran.status.into())
            .u64("reports", reports.len() as u64);
        if let Some(last) = reports.get(1) {
            stats_summary(o, last);
        }
    }));
    // A reset: refused to a user (vmctl, and the agent asked directly) ...
    let ran = vmctl(&["stats", "--reset"], Some(NOBODY))?;
    refusal_marker("stats_reset_not_root", &ran);
    let raw = raw_request_as(NOBODY, r#"{"cmd":"stats","reset":true}"#)?;
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", "stats_reset_socket_not_root")
            .str("code", raw["code"].as_str().unwrap_or(""))
            .str("stderr", raw["message"].as_str().unwrap_or(""));
    }));
    // ... and to a program calling STATS without the holder token ...
    // SAFETY: as in `refusals`: under Tandem, STATS only reads and writes registers.
    let called = unsafe { vmcall(Hypercall::Stats, [1, 0, 0, 0, 0], 0) };
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", "stats_no_token")
            .str("code", &failure(called));
    }));
    // ... and done for root: the figures start over.
    let ran = vmctl(&["stats", "--reset", "--json"], None)?;
    let page = json_lines(&ran.stdout).pop().unwrap_or(Value::Null);
    report::emit(&report::marker("vmctl_stats_reset", |o| {
        o.i64("exit", ran.status.into());
        stats_summary(o, &page);
    }));
    Ok(())
}

fn failure(called: Result<vmcall_proto::hypercall::HypercallResult, HypercallFailure>) -> String {
    match called {
        Ok(_) => "accepted".to_string(),
        Err(HypercallFailure::Status(status)) => format!("{status:?}"),
        Err(e) => format!("{e:?}"),
    }
}

fn refusal_marker(case: &str, ran: &Ran) {
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", case)
            .i64("exit", ran.status.into())
            .str("stderr", ran.stderr.lines().next().unwrap_or(""));
    }));
}

/// Step 4: what the owner or the hypervisor refuses. Core `core` is Linux's CPU `cpu` and
/// Linux's at the start and the end; `total` is Linux's CPU count with it.
fn owner_refusals(cpu: u32, core: u32, total: usize, waits: Waits) -> Result<(), String> {
    let core_text = core.to_string();
    let core_arg = core_text.as_str();
    let timeout = waits.for_move();
    // The boot core of Linux (core 1 in the test configuration, which lets Lavender hold it
    // so that this check is reached).
    let boot = guest_of(&status_json()?, "linux", "boot_core")?;
    let ran = vmctl(&["move-core", &boot.to_string(), "--to", "lavender"], None)?;
    refusal_marker("boot_core", &ran);

    // Linux refuses the revoke: the move is called off at once, the core stays Linux's.
    hotplug::set_behaviour(Behaviour::Refuse);
    let ran = vmctl(&move_args(core_arg, "lavender", &timeout), None)?;
    hotplug::set_behaviour(Behaviour::Act);
    refusal_marker("owner_refused", &ran);

    // Linux does not answer by the deadline: the move is called off.
    hotplug::set_behaviour(Behaviour::Ignore);
    let ran = vmctl(
        &[
            "move-core",
            core_arg,
            "--to",
            "lavender",
            "--timeout",
            &waits.timeout(300),
        ],
        None,
    )?;
    hotplug::set_behaviour(Behaviour::Act);
    refusal_marker("owner_timeout", &ran);

    // Another move while one is in flight (the first one waits on a silent Linux). Its
    // deadline leaves room for seeing it in flight and starting the second `vmctl`: each of
    // those is a process, a few hundred milliseconds under Bochs.
    hotplug::set_behaviour(Behaviour::Ignore);
    let first = Command::new(VMCTL)
        .args([
            "move-core",
            core_arg,
            "--to",
            "lavender",
            "--timeout",
            &waits.timeout(4000),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    let deadline = Instant::now() + waits.settle();
    while status_json()?["move_in_flight"] != true && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ran = vmctl(&["move-core", core_arg, "--to", "lavender"], None)?;
    let first = first
        .wait_with_output()
        .map_err(|e| format!("waiting for vmctl: {e}"))?;
    hotplug::set_behaviour(Behaviour::Act);
    refusal_marker("busy", &ran);
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", "busy_first_move")
            .i64("exit", first.status.code().unwrap_or(-1).into());
    }));

    // The target never starts the core: Lavender gives it back, Linux stays silent on the
    // grant, the core ends in the hypervisor's pool; then it goes back to Linux.
    let to_lavender = vmctl(&move_args(core_arg, "lavender", &timeout), None)?;
    // What a person sees, once, for the log.
    for line in to_lavender.stdout.lines() {
        println!("vmctl move-core {core_arg} --to lavender: {line}");
    }
    hotplug::set_behaviour(Behaviour::Ignore);
    let ran = vmctl(
        &[
            "move-core",
            core_arg,
            "--to",
            "linux",
            "--timeout",
            &waits.timeout(300),
        ],
        None,
    )?;
    hotplug::set_behaviour(Behaviour::Act);
    refusal_marker("target_timeout", &ran);
    let owner_after_timeout = status_owner(u64::from(core))?;
    let back = vmctl(&move_args(core_arg, "linux", &timeout), None)?;
    let linux_id = guest_id(&status_json()?, "linux")?;
    let (seen_cpus, hv_owner, listed, agree) =
        observe(u64::from(core), total, linux_id, "linux", waits)?;
    report::emit(&report::marker("vmctl_owner_checks_done", |o| {
        o.u64("cpu", cpu.into())
            .u64("core", core.into())
            .i64("to_lavender_exit", to_lavender.status.into())
            .str("owner_after_timeout", &owner_after_timeout)
            .i64("back_exit", back.status.into())
            .u64("cpuinfo_cpus", seen_cpus as u64)
            .str("hv_owner", &hv_owner)
            .str("status_owner", &listed)
            .bool("agree", agree);
    }));

    for (args, label) in [
        (&["trace", "-n", "3"][..], "vmctl trace -n 3"),
        (&["status"][..], "vmctl status"),
        (&["stats"][..], "vmctl stats"),
    ] {
        let shown = vmctl(args, None)?;
        for line in shown.stdout.lines().chain(shown.stderr.lines()) {
            println!("{label}: {line}");
        }
    }
    let ran = vmctl(&["stats", "--json"], None)?;
    let page = json_lines(&ran.stdout).pop().unwrap_or(Value::Null);
    report::emit(&report::marker("vmctl_stats_after", |o| {
        o.i64("exit", ran.status.into());
        stats_summary(o, &page);
    }));
    Ok(())
}

/// `owner/state` of `core` on the status page.
fn status_owner(core: u64) -> Result<String, String> {
    let status = status_json()?;
    Ok(status["cores"]
        .as_array()
        .and_then(|c| c.get(core as usize))
        .map(|c| format!("{}/{}", text(&c["owner"]), text(&c["state"])))
        .unwrap_or_default())
}

/// A number field `key` of guest `name` on the status page.
fn guest_of(status: &Value, name: &str, key: &str) -> Result<u64, String> {
    status["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == name))
        .and_then(|g| g[key].as_u64())
        .ok_or(format!("vmctl status gives no {key} for guest '{name}'"))
}

/// Each bad input, with what vmctl said and its exit status.
fn refusals() -> Result<(), String> {
    let cases: [(&str, &[&str], Option<u32>); 6] = [
        (
            "unknown_core",
            &["move-core", "9", "--to", "lavender"],
            None,
        ),
        ("unknown_guest", &["move-core", "3", "--to", "nobody"], None),
        ("not_allowed", &["move-core", "2", "--to", "linux"], None),
        ("already_there", &["move-core", "1", "--to", "linux"], None),
        ("usage", &["move-core", "3"], None),
        (
            "not_root",
            &["move-core", "3", "--to", "lavender"],
            Some(NOBODY),
        ),
    ];
    for (case, args, uid) in cases {
        let ran = vmctl(args, uid)?;
        report::emit(&report::marker("vmctl_refusal", |o| {
            o.str("case", case)
                .i64("exit", ran.status.into())
                .str("stderr", ran.stderr.lines().next().unwrap_or(""));
        }));
    }
    // A program that skips vmctl and asks the agent itself, as a user: refused by the agent.
    let raw = raw_request_as(NOBODY, r#"{"cmd":"move","core":3,"to":"lavender"}"#)?;
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", "socket_not_root")
            .str("code", raw["code"].as_str().unwrap_or(""))
            .str("stderr", raw["message"].as_str().unwrap_or(""));
    }));
    // A program that calls the hypervisor without the holder token.
    // SAFETY: the agent runs under Tandem (its control region was attached and validated);
    // CORE_MOVE only reads and writes registers.
    let called = unsafe { vmcall(Hypercall::CoreMove, [3, 0, 0, 0, 0], 0) };
    let code = failure(called);
    report::emit(&report::marker("vmctl_refusal", |o| {
        o.str("case", "no_token").str("code", &code);
    }));
    Ok(())
}

/// Sends `request` to the agent from a child process running as `uid`.
fn raw_request_as(uid: u32, request: &str) -> Result<Value, String> {
    // The socket's peer credentials are the connecting process's: connect from a child
    // that dropped to `uid` (busybox nc is not in the image, so the agent re-runs vmctl's
    // wire protocol by hand through a shell pipe would need it; a forked helper is simpler).
    let mut child = Command::new("/proc/self/exe")
        .arg("--raw-request")
        .arg(request)
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the raw client: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let _ = child.wait();
    serde_json::from_str(&line).map_err(|e| format!("raw reply {line:?}: {e}"))
}

/// `tandem-agent --raw-request JSON` (not PID 1): one request to the socket, the reply on
/// stdout. Used by the self-test as an unprivileged client that is not vmctl.
pub fn raw_client(request: &str) -> std::process::ExitCode {
    let reply = UnixStream::connect(SOCKET).and_then(|mut stream| {
        writeln!(stream, "{request}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    });
    match reply {
        Ok(line) => {
            print!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn status_json() -> Result<Value, String> {
    let ran = vmctl(&["status", "--json"], None)?;
    if ran.status != 0 {
        return Err(format!(
            "vmctl status failed ({}): {}",
            ran.status, ran.stderr
        ));
    }
    serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("vmctl status --json: {e}"))
}

fn guest_id(status: &Value, name: &str) -> Result<u8, String> {
    status["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == name))
        .and_then(|g| g["id"].as_u64())
        .map(|id| id as u8)
        .ok_or(format!("vmctl status lists no guest '{name}'"))
}

fn cpuinfo() -> Result<Vec<(u32, u32)>, String> {
    fs::read_to_string("/proc/cpuinfo")
        .map(|t| parse_cpuinfo(&t))
        .map_err(|e| format!("/proc/cpuinfo: {e}"))
}

/// Linux's CPU count, the hypervisor's owner of `core` and `vmctl status`'s, once they agree
/// with the move to `to` (or the settle time is over).
fn observe(
    core: u64,
    linux_cpus: usize,
    id: u8,
    to: &str,
    waits: Waits,
) -> Result<(usize, String, String, bool), String> {
    let deadline = Instant::now() + waits.settle();
    loop {
        let seen = cpuinfo()?.len();
        // SAFETY: as in `refusals`: under Tandem, QUERY_CORE only reads the ownership table.
        let ownership = unsafe { vmcall(Hypercall::QueryCore, [core, 0, 0, 0, 0], 0) }
            .ok()
            .and_then(|r| CoreOwnership::from_u64(r.results[0]).ok());
        let hv = match ownership {
            Some(o) if o.state == CoreState::Owned && o.owner == Some(id) => to.to_string(),
            Some(o) => format!("{:?}/{:?}", o.owner, o.state),
            None => "unknown".into(),
        };
        let status = status_json()?;
        let listed = status["cores"]
            .as_array()
            .and_then(|c| c.get(core as usize))
            .map(|c| format!("{}/{}", text(&c["owner"]), text(&c["state"])))
            .unwrap_or_default();
        let agree = seen == linux_cpus && hv == to && listed == format!("{to}/owned");
        if agree || Instant::now() > deadline {
            return Ok((seen, hv, listed, agree));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// A CPU load in Linux for the whole test: a shell spinning.
fn start_load() -> Result<Child, String> {
    let mut command = Command::new("/bin/sh");
    command.args(["-c", "while :; do :; done"]);
    command
        .spawn()
        .map_err(|e| format!("starting the load: {e}"))
}

fn stop_load(mut load: Child) {
    let _ = load.kill();
    let _ = load.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_word() {
        assert_eq!(
            requested("tandem.selftest=vmctl-moves:20"),
            Some((Mode::Checks, 20))
        );
        assert_eq!(
            requested("quiet tandem.selftest=vmctl-bench:5"),
            Some((Mode::Bench, 5))
        );
        assert_eq!(
            requested("tandem.selftest=vmctl-basic:1"),
            Some((Mode::Basic, 1))
        );
        assert_eq!(
            requested("tandem.selftest=vmctl-soak:500"),
            Some((Mode::Soak, 500))
        );
        assert_eq!(requested("tandem.selftest=vmctl-moves:0"), None);
        assert_eq!(requested("tandem.selftest=vmctl-soak:1001"), None);
        assert_eq!(requested("tandem.selftest=vmctl-bench:x"), None);
        assert_eq!(requested("tandem.selftest=cpu-hotplug:3"), None);
    }

    #[test]
    fn slowdown_stretches_every_wait_up_to_the_hypervisors_maximum() {
        assert_eq!(slowdown("tandem.selftest=vmctl-moves:1"), Ok(1));
        assert_eq!(
            slowdown("quiet tandem.selftest=vmctl-moves:1 tandem.selftest_slowdown=12"),
            Ok(12)
        );
        for bad in ["0", "101", "x", "", "-1", "1.5"] {
            let err = slowdown(&format!("tandem.selftest_slowdown={bad}")).unwrap_err();
            assert!(err.contains("from 1 to 100"), "{bad}: {err}");
        }
        let bochs = Waits { slowdown: 1 };
        assert!(
            bochs.for_move().is_empty(),
            "vmctl's default on Bochs alone"
        );
        assert_eq!(bochs.timeout(300), "300");
        assert_eq!(bochs.settle(), SETTLE);
        let nested = Waits { slowdown: 12 };
        assert_eq!(nested.for_move(), ["--timeout", "60000"]);
        assert_eq!(nested.timeout(300), "3600");
        assert_eq!(nested.settle(), Duration::from_secs(60));
        assert_eq!(Waits { slowdown: 100 }.timeout(1000), "60000");
        assert_eq!(
            move_args("3", "linux", &nested.for_move()),
            ["move-core", "3", "--to", "linux", "--timeout", "60000"]
        );
    }
}
