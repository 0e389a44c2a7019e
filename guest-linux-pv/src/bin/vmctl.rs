//! `vmctl`: watch and steer Tandem from the Linux shell. It asks the PV agent over its Unix
//! socket (the agent owns the control channel and the holder token; see the agent's
//! `management` module for why).

#[path = "../vmctl_proto.rs"]
mod vmctl_proto;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vmctl_proto::SOCKET;

const EXIT_STATUSES: &str = "Exit statuses: 0 success; 1 the owner refused or kept the core \
(move called off); 2 bad usage; 3 an input the hypervisor refuses (unknown core or guest, a \
core the target may not hold, a boot core, a core already there); 4 another move is in \
flight; 5 timeout; 6 needs root; 7 the agent or hypervisor cannot be reached.";

/// Watch and steer the Tandem hypervisor from Linux: which guest owns each core, moving
/// cores between Linux and Lavender, and the policy that moves them.
#[derive(Parser)]
#[command(name = "vmctl", version, after_help = EXIT_STATUSES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Each core's owner, state, since when and last move; each guest's cores and load.
    Status {
        /// Print the hypervisor's status page as JSON (with Linux's own view under "linux").
        #[arg(long)]
        json: bool,
    },
    /// The last core moves (the hypervisor keeps 8), oldest first, with outcome and stages.
    Trace {
        /// Show only the last N moves.
        #[arg(short = 'n', value_name = "N")]
        count: Option<usize>,
        /// Keep watching and print each new move as it ends (stop with Ctrl-C).
        #[arg(long)]
        follow: bool,
        /// One JSON object per move.
        #[arg(long)]
        json: bool,
    },
    /// Move CORE to GUEST and wait until it runs there; prints each stage's time. Needs root.
    MoveCore {
        /// The core's index (as `vmctl status` lists them).
        core: u64,
        /// The guest that gets the core (`lavender`, `linux`, ...).
        #[arg(long)]
        to: String,
        /// How long the move may take, in milliseconds (hypervisor time); the default is the
        /// hypervisor's (5000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch the hypervisor's core-allocation policy: `static` (the boot partition),
    /// `autonomous` (the hypervisor watches idle time and exits) or `cooperative` (the
    /// guests' load reports and requests). Needs root.
    Rebalance {
        #[arg(long, value_parser = ["static", "autonomous", "cooperative"])]
        policy: String,
        /// The autonomous policy's sampling period, 1 to 1000 ms of hypervisor time (default:
        /// keep the current one).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
        period_ms: Option<u64>,
        /// Print the policy now in force as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (request, json_out) = match &cli.command {
        Command::Status { json } => (json!({"cmd": "status"}), *json),
        Command::Trace {
            count,
            follow,
            json,
        } => return trace(*count, *follow, *json),
        Command::MoveCore {
            core,
            to,
            timeout,
            json,
        } => {
            // The agent checks too (it knows who is asking); this only says it sooner.
            if !nix::unistd::geteuid().is_root() {
                eprintln!("vmctl: moving a core needs root");
                return ExitCode::from(exit::PERMISSION);
            }
            (
                json!({"cmd": "move", "core": core, "to": to, "timeout_ms": timeout.unwrap_or(0)}),
                *json,
            )
        }
        Command::Rebalance {
            policy,
            period_ms,
            json,
        } => {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("vmctl: switching the policy needs root");
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
            eprintln!("vmctl: cannot reach the Tandem agent at {SOCKET}: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    if reply["ok"] != true {
        let code = reply["code"].as_str().unwrap_or("unavailable");
        if json_out {
            println!("{reply}");
        }
        eprintln!(
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
        Command::Trace { .. } => {}
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
                eprintln!("vmctl: {}", text(&reply["message"]));
                return ExitCode::from(exit::UNAVAILABLE);
            }
            Err(e) => {
                eprintln!("vmctl: cannot reach the Tandem agent at {SOCKET}: {e}");
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
    writeln!(stream, "{request}")?;
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
        let load = match guest.get("load") {
            Some(l) => format!(
                "{} runnable, {} per mille busy",
                text(&l["runnable"]),
                text(&l["busy_permille"])
            ),
            None if guest["kind"] == "linux" => format!("loadavg {}", list(&linux["loadavg"])),
            None => "-".into(),
        };
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
        "policy: {} (period {} ms) since {} us; {} moves, {} declined; last decision: {}",
        text(&policy["name"]),
        text(&policy["period_ms"]),
        text(&policy["since_us"]),
        text(&policy["moves"]),
        text(&policy["declined"]),
        last
    );
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
mod tests {
    use super::*;

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
}
