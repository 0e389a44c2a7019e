//! `vmctl`: watch and steer Tandem from the Linux shell. It asks the PV agent over its Unix
//! socket (the agent owns the control channel and the holder token; see the agent's
//! `management` module for why).
//!
//! vmctl has no Rust `main`: its entry is [`main`] below, called by the C runtime's start
//! code, so the standard library's start-up does not run. That start-up sets up what vmctl
//! does not use (an alternate signal stack and handlers that report a stack overflow, the
//! main thread's name) and, under Bochs, took 1.1 ms of every vmctl's start, a thirteenth of
//! a whole `vmctl exec`; the two parts of it vmctl relies on are done in [`main`].

#![cfg_attr(not(test), no_main)]

// vmctl only sends descriptors; the agent receives them.
#[allow(dead_code)]
#[path = "../fdpass.rs"]
mod fdpass;
#[path = "../vmctl_cli.rs"]
mod vmctl_cli;
#[path = "../vmctl_jobs.rs"]
mod vmctl_jobs;
#[path = "../vmctl_proto.rs"]
mod vmctl_proto;

use std::ffi::{c_char, c_int, CStr, OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use clap::Parser;
use serde_json::{json, Value};
use vmctl_cli::{own_options, Cli, Command};
use vmctl_jobs::say;
use vmctl_proto::SOCKET;

/// vmctl's entry: the command line's `argc` words at `argv`, from the C runtime. (In the
/// unit tests' build the test harness is the entry, and this is an ordinary function.)
#[cfg_attr(not(test), no_mangle)]
extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    let words = (0..usize::try_from(argc).unwrap_or(0))
        .map(|i| {
            // SAFETY: the start code passes `argc` pointers to NUL-terminated strings that
            // live as long as the process (C11 5.1.2.2.1).
            let word = unsafe { CStr::from_ptr(*argv.add(i)) };
            OsStr::from_bytes(word.to_bytes()).to_os_string()
        })
        .collect();
    standard_streams_open();
    // As Rust's start-up does: a write to a closed pipe or socket fails with `EPIPE`, which
    // vmctl reports, instead of killing it.
    // SAFETY: ignoring a signal installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
    // `exit` flushes std's stdout (if used) as returning from Rust's `main` does.
    std::process::exit(exit_status(run(words)))
}

/// Opens `/dev/null` on each of descriptors 0, 1 and 2 that is closed, as Rust's start-up
/// does: a socket or file vmctl opens then never takes a standard stream's number (its
/// output would go there, and `vmctl exec` passes the three on to the process).
fn standard_streams_open() {
    for fd in 0..3 {
        // SAFETY: `F_GETFD` reads a descriptor's flags and touches no memory of ours.
        let closed = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } == -1
            && nix::errno::Errno::last() == nix::errno::Errno::EBADF;
        if closed {
            // The lowest free number: `fd`. Kept open for vmctl's life.
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null");
            std::mem::forget(null);
        }
    }
}

/// The number `code` stands for (the standard library has no stable way to read it back).
fn exit_status(code: ExitCode) -> c_int {
    (0..=u8::MAX)
        .find(|&n| ExitCode::from(n) == code)
        .map_or(1, c_int::from)
}

fn run(words: Vec<OsString>) -> ExitCode {
    if let Some((program, args)) = vmctl_cli::plain_exec(&words) {
        return vmctl_jobs::exec(&program, &args, 1, false);
    }
    let cli = Cli::parse_from(words);
    let (request, json_out) = match &cli.command {
        Command::Exec {
            program,
            args,
            cores,
            detach,
        } => {
            return match own_options(args, *cores, *detach) {
                Ok((args, cores, detach)) => vmctl_jobs::exec(program, &args, cores, detach),
                Err(message) => {
                    say!("vmctl: {message}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Ps { json } => return vmctl_jobs::ps(*json),
        Command::Kill { pid } => return vmctl_jobs::signal(*pid, "kill"),
        Command::Stop { pid } => return vmctl_jobs::signal(*pid, "stop"),
        Command::Cont { pid } => return vmctl_jobs::signal(*pid, "cont"),
        Command::Status { json } => (json!({"cmd": "status"}), *json),
        Command::Trace {
            count,
            follow,
            json,
        } => return trace(*count, *follow, *json),
        Command::Stats {
            interval,
            count,
            per_core,
            reset,
            json,
        } => {
            let options = StatsOptions {
                interval: *interval,
                count: *count,
                per_core: *per_core,
                reset: *reset,
                json: *json,
            };
            return stats(&options);
        }
        Command::MoveCore {
            core,
            to,
            timeout,
            negotiable,
            json,
        } => {
            // The agent checks too (it knows who is asking); this only says it sooner.
            if !nix::unistd::geteuid().is_root() {
                say!("vmctl: moving a core needs root");
                return ExitCode::from(exit::PERMISSION);
            }
            (
                json!({"cmd": "move", "core": core, "to": to, "timeout_ms": timeout.unwrap_or(0),
                       "negotiable": negotiable}),
                *json,
            )
        }
        Command::Rebalance {
            policy,
            period_ms,
            json,
        } => {
            if !nix::unistd::geteuid().is_root() {
                say!("vmctl: switching the policy needs root");
                return ExitCode::from(exit::PERMISSION);
            }
            (
                json!({"cmd": "rebalance", "policy": policy, "period_ms": period_ms.unwrap_or(0)}),
                *json,
            )
        }
    };
    let reply = match ask(&request) {
        Ok(reply) => reply,
        Err(e) => {
            say!("vmctl: cannot reach the Tandem agent at {SOCKET}: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    if reply["ok"] != true {
        let code = reply["code"].as_str().unwrap_or("unavailable");
        if json_out {
            println!("{reply}");
        }
        say!(
            "vmctl: {}",
            reply["message"]
                .as_str()
                .unwrap_or("the agent gave no reason")
        );
        return ExitCode::from(exit_code(code));
    }
    match cli.command {
        Command::Status { json: true } => {
            let mut page = reply["status"].clone();
            page["linux"] = reply["linux"].clone();
            println!("{page}");
        }
        Command::Status { json: false } => print_status(&reply["status"], &reply["linux"]),
        Command::MoveCore { json: true, .. } => println!("{}", reply["move"]),
        Command::MoveCore { json: false, .. } => print_move(&reply["move"]),
        Command::Rebalance { json: true, .. } => println!("{}", reply["policy"]),
        Command::Rebalance { json: false, .. } => {
            let p = &reply["policy"];
            println!(
                "policy: {} (period {} ms), in force since {} us",
                text(&p["name"]),
                text(&p["period_ms"]),
                text(&p["since_us"])
            );
        }
        Command::Trace { .. }
        | Command::Stats { .. }
        | Command::Exec { .. }
        | Command::Ps { .. }
        | Command::Kill { .. }
        | Command::Stop { .. }
        | Command::Cont { .. } => {}
    }
    ExitCode::from(exit::OK)
}

/// `vmctl trace`: the moves on the status page, then (with `follow`) each new one.
fn trace(count: Option<usize>, follow: bool, json_out: bool) -> ExitCode {
    let mut shown = 0u64;
    let mut first = true;
    loop {
        let reply = match ask(&json!({"cmd": "status"})) {
            Ok(reply) if reply["ok"] == true => reply,
            Ok(reply) => {
                say!("vmctl: {}", text(&reply["message"]));
                return ExitCode::from(exit::UNAVAILABLE);
            }
            Err(e) => {
                say!("vmctl: cannot reach the Tandem agent at {SOCKET}: {e}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        };
        let moves = new_moves(
            &reply["status"]["moves"],
            shown,
            if first { count } else { None },
        );
        for m in &moves {
            if json_out {
                println!("{m}");
            } else {
                print_move(m);
            }
            shown = shown.max(m["id"].as_u64().unwrap_or(0));
        }
        if !follow {
            return ExitCode::from(exit::OK);
        }
        first = false;
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

struct StatsOptions {
    interval: Option<u64>,
    count: Option<u64>,
    per_core: bool,
    reset: bool,
    json: bool,
}

/// `vmctl stats`: one report, or with `interval` one every S seconds, each the change since the
/// one before.
fn stats(options: &StatsOptions) -> ExitCode {
    if options.reset && !nix::unistd::geteuid().is_root() {
        say!("vmctl: resetting the statistics needs root");
        return ExitCode::from(exit::PERMISSION);
    }
    let mut before: Option<Value> = None;
    let mut reports = 0u64;
    loop {
        let reset = options.reset && reports == 0;
        let page = match ask(&json!({"cmd": "stats", "reset": reset})) {
            Ok(reply) if reply["ok"] == true => reply["stats"].clone(),
            Ok(reply) => {
                say!("vmctl: {}", text(&reply["message"]));
                return ExitCode::from(exit_code(reply["code"].as_str().unwrap_or("")));
            }
            Err(e) => {
                say!("vmctl: cannot reach the Tandem agent at {SOCKET}: {e}");
                return ExitCode::from(exit::UNAVAILABLE);
            }
        };
        let shown = match &before {
            Some(before) => stats_delta(&page, before),
            None => page.clone(),
        };
        let shown = with_times(shown);
        if options.json {
            println!("{shown}");
        } else {
            if reports > 0 {
                println!();
            }
            print_stats(&shown, options.per_core);
        }
        reports += 1;
        let Some(seconds) = options.interval else {
            return ExitCode::from(exit::OK);
        };
        if options.count.is_some_and(|n| reports >= n) {
            return ExitCode::from(exit::OK);
        }
        before = Some(page);
        std::thread::sleep(std::time::Duration::from_secs(seconds));
    }
}

/// `now` less `before` (counts, cycles and move counts), with `interval_us` the time between
/// them. After a reset in between, `now` as it is.
fn stats_delta(now: &Value, before: &Value) -> Value {
    let mut delta = now.clone();
    if now["reset_generation"] != before["reset_generation"] {
        return delta;
    }
    let minus = |a: &Value, b: &Value| {
        json!(a
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(b.as_u64().unwrap_or(0)))
    };
    let exits_minus = |now: &mut Value, before: &Value| {
        for e in now.as_array_mut().into_iter().flatten() {
            let old = before
                .as_array()
                .and_then(|b| b.iter().find(|o| o["reason"] == e["reason"]))
                .cloned()
                .unwrap_or(Value::Null);
            e["count"] = minus(&e["count"], &old["count"]);
            e["cycles"] = minus(&e["cycles"], &old["cycles"]);
        }
        if let Some(list) = now.as_array_mut() {
            list.retain(|e| e["count"] != 0);
        }
    };
    let find = |list: &Value, key: &str, value: &Value| -> Value {
        list.as_array()
            .and_then(|l| l.iter().find(|x| &x[key] == value))
            .cloned()
            .unwrap_or(Value::Null)
    };
    for g in delta["guests"].as_array_mut().into_iter().flatten() {
        let old = find(&before["guests"], "name", &g["name"]);
        exits_minus(&mut g["exits"], &old["exits"]);
    }
    for c in delta["cores"].as_array_mut().into_iter().flatten() {
        let old_core = find(&before["cores"], "core", &c["core"]);
        for g in c["guests"].as_array_mut().into_iter().flatten() {
            let old = find(&old_core["guests"], "name", &g["name"]);
            exits_minus(&mut g["exits"], &old["exits"]);
        }
    }
    if let Some(moves) = delta["moves"].as_object_mut() {
        for (name, value) in moves.iter_mut() {
            *value = minus(value, &before["moves"][name]);
        }
    }
    delta["interval_us"] = minus(&now["published_us"], &before["published_us"]);
    delta
}

/// Adds `time_us` (from `cycles` and the page's `tsc_hz`) to every exit entry.
fn with_times(mut page: Value) -> Value {
    let hz = page["tsc_hz"]
        .as_u64()
        .filter(|&hz| hz > 0)
        .unwrap_or(1_000_000);
    let fill = |exits: &mut Value| {
        for e in exits.as_array_mut().into_iter().flatten() {
            let cycles = e["cycles"].as_u64().unwrap_or(0);
            e["time_us"] = json!((u128::from(cycles) * 1_000_000 / u128::from(hz)) as u64);
        }
    };
    for g in page["guests"].as_array_mut().into_iter().flatten() {
        fill(&mut g["exits"]);
    }
    for c in page["cores"].as_array_mut().into_iter().flatten() {
        for g in c["guests"].as_array_mut().into_iter().flatten() {
            fill(&mut g["exits"]);
        }
    }
    page
}

fn print_exits(rows: &mut Vec<[String; 5]>, label: &str, exits: &Value) {
    let (mut count, mut time) = (0, 0);
    for e in exits.as_array().into_iter().flatten() {
        let (n, us) = (
            e["count"].as_u64().unwrap_or(0),
            e["time_us"].as_u64().unwrap_or(0),
        );
        count += n;
        time += us;
        rows.push([
            label.to_string(),
            text(&e["reason"]),
            n.to_string(),
            us.to_string(),
            format!("{:.1}", us as f64 / n.max(1) as f64),
        ]);
    }
    rows.push([
        label.to_string(),
        "(all)".into(),
        count.to_string(),
        time.to_string(),
        format!("{:.1}", time as f64 / count.max(1) as f64),
    ]);
}

fn print_stats(page: &Value, per_core: bool) {
    match page.get("interval_us") {
        Some(us) => println!("over the last {} us:", text(us)),
        None => println!(
            "since {} us (boot or the last reset; {} resets):",
            text(&page["since_us"]),
            text(&page["reset_generation"])
        ),
    }
    let mut rows = Vec::new();
    for g in page["guests"].as_array().into_iter().flatten() {
        print_exits(&mut rows, &text(&g["name"]), &g["exits"]);
    }
    let table = |first: &str, rows: &[[String; 5]]| {
        println!(
            "{:<14} {:<20} {:>10} {:>12} {:>9}",
            first, "EXIT REASON", "COUNT", "TIME(us)", "AVG(us)"
        );
        for r in rows {
            println!(
                "{:<14} {:<20} {:>10} {:>12} {:>9}",
                r[0], r[1], r[2], r[3], r[4]
            );
        }
    };
    table("GUEST", &rows);
    if per_core {
        let mut rows = Vec::new();
        for c in page["cores"].as_array().into_iter().flatten() {
            for g in c["guests"].as_array().into_iter().flatten() {
                let label = format!("{}/{}", text(&c["core"]), text(&g["name"]));
                print_exits(&mut rows, &label, &g["exits"]);
            }
        }
        println!();
        table("CORE/GUEST", &rows);
    }
    let m = &page["moves"];
    println!();
    println!(
        "moves: {} done, {} refused, {} cancelled, {} timed out, {} failed, {} forced",
        text(&m["done"]),
        text(&m["refused"]),
        text(&m["cancelled"]),
        text(&m["timeouts"]),
        text(&m["failed"]),
        text(&m["forced"])
    );
    let stages = page["stages"].as_array().cloned().unwrap_or_default();
    if !stages.is_empty() {
        println!(
            "{:<24} {:<15} {:>6} {:>11}",
            "MOVE", "STAGE", "MOVES", "MEDIAN(us)"
        );
        for s in &stages {
            println!(
                "{:<24} {:<15} {:>6} {:>11}",
                format!("{} -> {}", text(&s["from"]), text(&s["to"])),
                text(&s["stage"]),
                text(&s["count"]),
                text(&s["median_us"])
            );
        }
    }
    println!("(times: the hypervisor's TSC, {} Hz; virtual under Bochs with clock sync=none; stage medians over the last 64 completed moves)", text(&page["tsc_hz"]));
}

/// The moves of `moves` newer than id `after`, the last `count` of them when given.
fn new_moves(moves: &Value, after: u64, count: Option<usize>) -> Vec<Value> {
    let newer: Vec<Value> = moves
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["id"].as_u64().is_some_and(|id| id > after))
        .cloned()
        .collect();
    let skip = count.map_or(0, |n| newer.len().saturating_sub(n));
    newer.into_iter().skip(skip).collect()
}

fn ask(request: &Value) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(SOCKET)?;
    // One write: formatted straight into the socket, the request would go a token at a time.
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn print_status(page: &Value, linux: &Value) {
    println!(
        "{:<5} {:<11} {:<10} {:>14}  LAST MOVE",
        "CORE", "OWNER", "STATE", "SINCE(us)"
    );
    for core in page["cores"].as_array().into_iter().flatten() {
        let last = match core.get("last_move_id") {
            Some(id) => format!(
                "#{id} {} in {} us",
                text(&core["last_move_outcome"]),
                text(&core["last_move_us"])
            ),
            None => "-".into(),
        };
        println!(
            "{:<5} {:<11} {:<10} {:>14}  {} ({}, by {})",
            text(&core["core"]),
            text(&core["owner"]),
            text(&core["state"]),
            text(&core["since_us"]),
            last,
            text(&core["last_reason"]),
            text(&core["last_by"])
        );
    }
    println!();
    println!(
        "{:<10} {:<8} {:<8} {:<8} LOAD",
        "GUEST", "STATE", "HELD", "ALLOWED"
    );
    for guest in page["guests"].as_array().into_iter().flatten() {
        let load = guest_load(guest, linux);
        println!(
            "{:<10} {:<8} {:<8} {:<8} {}",
            text(&guest["name"]),
            text(&guest["state"]),
            list(&guest["held"]),
            list(&guest["allowed"]),
            load
        );
    }
    let policy = &page["policy"];
    let last = policy["decisions"]
        .as_array()
        .and_then(|d| d.last())
        .map_or("-".into(), |d| {
            format!(
                "core {} {} -> {} ({}, {})",
                text(&d["core"]),
                text(&d["from"]),
                text(&d["to"]),
                text(&d["reason"]),
                text(&d["outcome"])
            )
        });
    println!();
    println!(
        "hypervisor: {}; {} passes of its own work, {} us in all",
        match page["monitor_core"].as_bool() {
            Some(true) => "keeps core 0 for itself (a monitor core)",
            Some(false) => "no core of its own: it works on the guests' exits",
            None => "-",
        },
        text(&page["monitor"]["passes"]),
        text(&page["monitor"]["pass_us"])
    );
    println!(
        "policy: {} (period {} ms) since {} us; {} moves, {} declined; last decision: {}",
        text(&policy["name"]),
        text(&policy["period_ms"]),
        text(&policy["since_us"]),
        text(&policy["moves"]),
        text(&policy["declined"]),
        last
    );
    if let Some(requests) = requests(policy) {
        println!("{requests}");
    }
    if let Some(d) = policy.get("last_decline") {
        println!(
            "last decline: core {} kept by {} ({}) at {} us",
            text(&d["core"]),
            text(&d["owner"]),
            text(&d["reason"]),
            text(&d["at_us"])
        );
    }
    let counts = &page["counts"];
    println!();
    println!(
        "moves: {} done, {} refused, {} cancelled, {} timed out, {} failed, {} forced; \
         times are the hypervisor's TSC time (page of {} us)",
        text(&counts["done"]),
        text(&counts["refused"]),
        text(&counts["cancelled"]),
        text(&counts["timeouts"]),
        text(&counts["failed"]),
        text(&counts["forced"]),
        text(&page["published_us"])
    );
    let agent = &linux["agent"];
    if !agent.is_null() {
        println!(
            "agent: {} open fds; delegation server (pid {}): {} open fds",
            text(&agent["open_fds"]),
            text(&agent["server_pid"]),
            text(&agent["server_open_fds"])
        );
    }
}

/// What each guest's last load report asks of the policy, for `vmctl status`: more cores,
/// none, or cores it offers (and whether the offer is final: the guest's work that used
/// them ended, so a cooperative policy sends them to the pool at once). `None` before any
/// report.
fn requests(policy: &Value) -> Option<String> {
    let s = |n: i64| if n == 1 { "" } else { "s" };
    let said: Vec<String> = policy["guests"]
        .as_array()?
        .iter()
        .filter_map(|guest| {
            let report = guest.get("report")?;
            let what = match report["request"].as_i64()? {
                0 => "wants the cores it holds".to_string(),
                n if n > 0 => format!("asks for {n} more core{}", s(n)),
                n if report["final_offer"] == true => format!(
                    "offers {} core{} (final: the work that used them ended)",
                    -n,
                    s(-n)
                ),
                n => format!("offers {} core{}", -n, s(-n)),
            };
            Some(format!("{} {what}", text(&guest["name"])))
        })
        .collect();
    (!said.is_empty()).then(|| format!("last reports: {}", said.join("; ")))
}

/// A guest's load for `vmctl status`: Lavender's last load report, Linux's own figures from
/// the agent, or "not reported".
fn guest_load(guest: &Value, linux: &Value) -> String {
    if let Some(l) = guest.get("load") {
        return format!(
            "{} runnable, {} per mille busy (its report)",
            text(&l["runnable"]),
            text(&l["busy_permille"])
        );
    }
    if guest["kind"] != "linux" {
        return "not reported".into();
    }
    let l = &linux["load"];
    if l.is_null() {
        return format!("loadavg {}", list(&linux["loadavg"]));
    }
    let mut shown = format!(
        "{} runnable, {} per mille busy",
        text(&l["runnable"]),
        text(&l["busy_permille"])
    );
    if let Some(psi) = l["psi_some_avg10"].as_f64() {
        shown.push_str(&format!(", cpu pressure {psi:.1}%"));
    }
    shown.push_str(&format!(
        " (/proc/stat; loadavg {})",
        list(&linux["loadavg"])
    ));
    shown
}

fn print_move(result: &Value) {
    println!(
        "move #{}: core {} {} -> {}: {} in {} us ({}, by {})",
        text(&result["id"]),
        text(&result["core"]),
        text(&result["from"]),
        text(&result["to"]),
        text(&result["outcome"]),
        text(&result["total_us"]),
        text(&result["reason"]),
        text(&result["by"])
    );
    if let Some(why) = result["decline_reason"].as_str().filter(|r| !r.is_empty()) {
        println!("  declined: {why}");
    }
    for stage in result["stages"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {:>10} us",
            text(&stage["stage"]),
            text(&stage["us"])
        );
    }
}

/// vmctl's exit statuses, documented in its `--help`.
pub mod exit {
    pub const OK: u8 = 0;
    /// The owner refused to give the core up, or kept it past the deadline (cancelled).
    pub const REFUSED: u8 = 1;
    // 2: bad command-line usage (clap exits with it by itself).
    /// An input the hypervisor refuses: unknown core or guest, a core the target may not
    /// hold, a guest's boot core, a core the target holds already.
    pub const INVALID: u8 = 3;
    /// Another move is in flight.
    pub const BUSY: u8 = 4;
    /// The move did not complete in time (the target never started the core).
    pub const TIMEOUT: u8 = 5;
    /// The command needs root.
    pub const PERMISSION: u8 = 6;
    /// The agent or the hypervisor cannot be reached, or answered nonsense.
    pub const UNAVAILABLE: u8 = 7;
}

/// The exit status for an error `code` of a reply.
pub fn exit_code(code: &str) -> u8 {
    match code {
        "refused" | "cancelled" => exit::REFUSED,
        "unknown_core" | "unknown_guest" | "not_allowed" | "boot_core" | "already_there"
        | "bad_request" => exit::INVALID,
        "busy" => exit::BUSY,
        "timeout" => exit::TIMEOUT,
        "permission" => exit::PERMISSION,
        _ => exit::UNAVAILABLE,
    }
}

#[cfg(test)]
#[path = "../vmctl_refusals.rs"]
mod refusals;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_code_is_read_back_as_its_number() {
        assert_eq!(exit_status(ExitCode::SUCCESS), 0);
        assert_eq!(exit_status(ExitCode::FAILURE), 1);
        assert_eq!(exit_status(ExitCode::from(3)), 3);
        assert_eq!(exit_status(ExitCode::from(137)), 137);
    }

    #[test]
    fn trace_shows_the_newest_moves_once() {
        let moves = json!([{"id": 3}, {"id": 4}, {"id": 5}]);
        let ids = |v: Vec<Value>| {
            v.iter()
                .map(|m| m["id"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(new_moves(&moves, 0, None)), [3, 4, 5]);
        assert_eq!(ids(new_moves(&moves, 0, Some(2))), [4, 5]);
        assert_eq!(ids(new_moves(&moves, 4, None)), [5]);
        assert!(new_moves(&json!(null), 0, None).is_empty());
    }

    #[test]
    fn every_command_parses_and_has_help() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["vmctl", "move-core", "3"]).is_err());
        assert!(Cli::try_parse_from(["vmctl", "trace", "-n", "2", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["vmctl", "rebalance", "--policy", "cooperative"]).is_ok());
        assert!(Cli::try_parse_from([
            "vmctl",
            "rebalance",
            "--policy",
            "autonomous",
            "--period-ms",
            "5"
        ])
        .is_ok());
        assert!(Cli::try_parse_from(["vmctl", "rebalance", "--policy", "greedy"]).is_err());
        assert!(Cli::try_parse_from([
            "vmctl",
            "rebalance",
            "--policy",
            "static",
            "--period-ms",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn stats_options_parse() {
        let parsed = Cli::try_parse_from([
            "vmctl",
            "stats",
            "--interval",
            "2",
            "--count",
            "3",
            "--per-core",
            "--json",
        ])
        .unwrap();
        let Command::Stats {
            interval,
            count,
            per_core,
            reset,
            json,
        } = parsed.command
        else {
            panic!("not stats");
        };
        assert_eq!(
            (interval, count, per_core, reset, json),
            (Some(2), Some(3), true, false, true)
        );
        // An interval of 0, a count without an interval, a word for a number: usage errors.
        for bad in [
            &["vmctl", "stats", "--interval", "0"][..],
            &["vmctl", "stats", "--count", "2"],
            &["vmctl", "stats", "--interval", "soon"],
            &["vmctl", "move-core", "x", "--to", "lavender"],
            &[
                "vmctl",
                "move-core",
                "3",
                "--to",
                "lavender",
                "--timeout",
                "-1",
            ],
        ] {
            let e = Cli::try_parse_from(bad).err().unwrap();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        assert!(Cli::try_parse_from(["vmctl", "stats", "--reset"]).is_ok());
    }

    #[test]
    fn each_refusal_has_its_exit_status() {
        for (code, status) in [
            ("refused", 1),
            ("cancelled", 1),
            ("unknown_core", 3),
            ("unknown_guest", 3),
            ("not_allowed", 3),
            ("boot_core", 3),
            ("already_there", 3),
            ("bad_request", 3),
            ("busy", 4),
            ("timeout", 5),
            ("permission", 6),
            ("unavailable", 7),
            ("something new", 7),
        ] {
            assert_eq!(exit_code(code), status, "{code}");
        }
    }

    #[test]
    fn stats_deltas_and_times() {
        let before = json!({
            "published_us": 1_000, "tsc_hz": 50_000_000, "reset_generation": 0,
            "guests": [{"name": "linux", "exits": [
                {"reason": "cpuid", "count": 10, "cycles": 5_000},
                {"reason": "hlt", "count": 4, "cycles": 400}]}],
            "cores": [{"core": 1, "guests": [{"name": "linux", "exits": [
                {"reason": "cpuid", "count": 10, "cycles": 5_000}]}]}],
            "moves": {"done": 2, "forced": 0},
        });
        let mut now = before.clone();
        now["published_us"] = json!(3_000);
        now["guests"][0]["exits"][0] = json!({"reason": "cpuid", "count": 15, "cycles": 55_000});
        now["cores"][0]["guests"][0]["exits"][0] =
            json!({"reason": "cpuid", "count": 15, "cycles": 55_000});
        now["moves"]["done"] = json!(5);
        let delta = with_times(stats_delta(&now, &before));
        assert_eq!(delta["interval_us"], 2_000);
        // hlt did not change: left out of the delta.
        assert_eq!(
            delta["guests"][0]["exits"],
            json!([{"reason": "cpuid", "count": 5, "cycles": 50_000, "time_us": 1_000}])
        );
        assert_eq!(delta["cores"][0]["guests"][0]["exits"][0]["count"], 5);
        assert_eq!(delta["moves"]["done"], 3);
        // After a reset in between, the new figures as they are.
        now["reset_generation"] = json!(1);
        assert_eq!(stats_delta(&now, &before)["moves"]["done"], 5);
    }

    #[test]
    fn requests_say_what_each_guest_asks_and_whether_an_offer_is_final() {
        assert_eq!(requests(&json!({"guests": [{"name": "lavender"}]})), None);
        let policy = json!({"guests": [
            {"name": "lavender", "report": {"request": -1, "final_offer": true}},
            {"name": "linux", "report": {"request": 2, "final_offer": false}},
        ]});
        assert_eq!(
            requests(&policy).as_deref(),
            Some(
                "last reports: lavender offers 1 core (final: the work that used them ended); \
                 linux asks for 2 more cores"
            )
        );
        let policy = json!({"guests": [
            {"name": "lavender", "report": {"request": -2, "final_offer": false}},
            {"name": "linux", "report": {"request": 0}},
        ]});
        assert_eq!(
            requests(&policy).as_deref(),
            Some("last reports: lavender offers 2 cores; linux wants the cores it holds")
        );
    }

    #[test]
    fn load_is_shown_or_said_missing() {
        let lavender = json!({"kind": "lavender"});
        assert_eq!(guest_load(&lavender, &Value::Null), "not reported");
        let reported = json!({"kind": "lavender", "load": {"runnable": 8, "busy_permille": 990}});
        assert!(guest_load(&reported, &Value::Null).starts_with("8 runnable, 990 per mille"));
        let linux = json!({"kind": "linux"});
        let view = json!({"loadavg": [1.0, 0.5, 0.1], "load": {"runnable": 2, "busy_permille": 600, "psi_some_avg10": 3.5}});
        assert_eq!(
            guest_load(&linux, &view),
            "2 runnable, 600 per mille busy, cpu pressure 3.5% (/proc/stat; loadavg 1.0,0.5,0.1)"
        );
    }

    #[test]
    fn exec_takes_its_options_anywhere_and_passes_the_programs_on() {
        let parse = |words: &[&str]| match Cli::try_parse_from(words).map(|cli| cli.command) {
            Ok(Command::Exec {
                args,
                cores,
                detach,
                ..
            }) => own_options(&args, cores, detach).unwrap(),
            _ => panic!("{words:?} did not parse"),
        };
        assert_eq!(
            parse(&["vmctl", "exec", "p", "--cores", "2"]),
            (vec![], 2, false)
        );
        assert_eq!(
            parse(&["vmctl", "exec", "--detach", "p"]),
            (vec![], 1, true)
        );
        assert_eq!(
            parse(&["vmctl", "exec", "p", "-l", "path=x", "--cores", "2"]),
            (vec!["-l".into(), "path=x".into()], 2, false)
        );
        assert!(own_options(&["--cores".into(), "0".into()], 1, false).is_err());
        assert!(own_options(&["--cores".into()], 1, false).is_err());
        assert!(Cli::try_parse_from(["vmctl", "exec", "--cores", "0", "p"]).is_err());
        assert!(Cli::try_parse_from(["vmctl", "kill", "x"]).is_err());
    }

    #[test]
    fn a_plain_exec_parses_as_clap_parses_it_and_anything_else_goes_to_clap() {
        let words = |w: &[&str]| -> Vec<std::ffi::OsString> { w.iter().map(Into::into).collect() };
        for plain in [
            &["vmctl", "exec", "/usr/lib/tandem/lavender/status", "0"][..],
            &["vmctl", "exec", "p"],
            &["vmctl", "exec", "p", "a b", "", "x=1"],
        ] {
            let (program, args) = vmctl_cli::plain_exec(&words(plain)).unwrap();
            let Ok(Command::Exec {
                program: clap_program,
                args: clap_args,
                cores: 1,
                detach: false,
            }) = Cli::try_parse_from(plain).map(|cli| cli.command)
            else {
                panic!("{plain:?}: clap parses no plain exec");
            };
            assert_eq!((program, args), (clap_program, clap_args), "{plain:?}");
        }
        for other in [
            &["vmctl", "exec"][..],
            &["vmctl", "exec", ""],
            &["vmctl", "exec", "p", "--cores", "2"],
            &["vmctl", "exec", "p", "-l"],
            &["vmctl", "exec", "--detach", "p"],
            &["vmctl", "exec", "p", "--help"],
            &["vmctl", "ps"],
            &["vmctl", "status", "exec", "p"],
        ] {
            assert_eq!(vmctl_cli::plain_exec(&words(other)), None, "{other:?}");
        }
    }
}
