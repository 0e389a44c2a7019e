//! `vmctl`'s command line: what it takes and what it refuses before anything is asked of the
//! agent. Kept apart from the rest of `vmctl` (sockets, output) so that the fuzz target in
//! `guest-linux-pv/fuzz/` parses arguments exactly as `vmctl` does.

use clap::{Parser, Subcommand};

/// Core indices are below 64 (`vmcall_proto::cores`).
pub const MAX_CORES: u64 = 64;
/// The longest move timeout the hypervisor accepts.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

const EXIT_STATUSES: &str = "Exit statuses: 0 success; 1 the owner refused or kept the core \
(move called off); 2 bad usage; 3 an input the hypervisor refuses (unknown core or guest, a \
core the target may not hold, a boot core, a core already there); 4 another move is in \
flight; 5 timeout; 6 needs root; 7 the agent or hypervisor cannot be reached. `ps`, `kill`, \
`stop`, `cont`: 3 no such process, 6 needs root, 7 unreachable. `exec` exits with the Lavender \
process's status (128+N when signal N ended it: a fault, a kill; 137 when Lavender stopped \
while it ran), or 125 when vmctl, the agent \
or Lavender failed or refused (not root, unreachable), 126 when the file is not a program \
Lavender can run (not an ELF, wrong architecture, too large), 127 when it does not exist.";

/// Watch and steer the Tandem hypervisor from Linux: which guest owns each core, moving
/// cores between Linux and Lavender, and the policy that moves them.
#[derive(Parser)]
#[command(name = "vmctl", version, after_help = EXIT_STATUSES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Each core's owner, state, since when and last move; each guest's cores and load; the
    /// agent's and its delegation server's open descriptors.
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
    /// VM exits per guest and reason with the time the hypervisor spent handling them, core
    /// moves by outcome, and each move stage's median. Times are the hypervisor's TSC time in
    /// µs (virtual under Bochs with `clock: sync=none`).
    Stats {
        /// Keep reporting every S seconds, each report the change since the one before.
        #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: Option<u64>,
        /// With --interval: stop after N reports (default: until Ctrl-C).
        #[arg(long, value_name = "N", requires = "interval", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Also list each core's exits, per guest.
        #[arg(long)]
        per_core: bool,
        /// Start the figures over first (needs root).
        #[arg(long)]
        reset: bool,
        /// One JSON object per report.
        #[arg(long)]
        json: bool,
    },
    /// Move CORE to GUEST and wait until it runs there; prints each stage's time. Needs root.
    MoveCore {
        /// The core's index (as `vmctl status` lists them), 0 to 63.
        #[arg(value_parser = clap::value_parser!(u64).range(..MAX_CORES))]
        core: u64,
        /// The guest that gets the core (`lavender`, `linux`, ...).
        #[arg(long)]
        to: String,
        /// How long the move may take, in milliseconds (hypervisor time), 1 to 60000; the
        /// default is the hypervisor's (5000).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
        timeout: Option<u64>,
        /// Let the owner decline, as it may a policy's revoke (Lavender does when its runnable
        /// threads would exceed its cores without the core); without it the owner must give
        /// the core up (Lavender by the deadline or by force; Linux is never forced).
        #[arg(long)]
        negotiable: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the Lavender program PROGRAM (an ELF file on Linux's file system, e.g. in
    /// /usr/lib/tandem/lavender/) with vmctl's own stdin, stdout and stderr, wait for it and exit
    /// with its status. Ctrl-C kills it, Ctrl-Z stops it (and `fg` continues it). Needs root.
    Exec {
        /// The program's file.
        program: std::path::PathBuf,
        /// Its arguments (vmctl's own `--cores` and `--detach` are taken anywhere).
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        /// The most of Lavender's cores its threads run on at once (1 to the number of cores
        /// Lavender may hold; more is refused).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=64))]
        cores: u16,
        /// Print its pid and return at once; it runs on (`vmctl ps`, `kill`, `stop`, `cont`),
        /// its output on Lavender's console.
        #[arg(long)]
        detach: bool,
    },
    /// Lavender's processes: pid, program, state, exit status, core limit, the cores its
    /// threads ran on, threads, CPU time and delegated calls (ended ones are kept with their
    /// final state).
    Ps {
        /// One JSON array of processes.
        #[arg(long)]
        json: bool,
    },
    /// Kill Lavender process PID (it ends with status 137). Needs root.
    Kill { pid: u32 },
    /// Stop Lavender process PID: its threads park until `cont`. Needs root.
    Stop { pid: u32 },
    /// Continue a stopped Lavender process. Needs root.
    Cont { pid: u32 },
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

/// The program and its arguments of a plain `vmctl exec PROGRAM [ARGS...]`, where no word
/// after `exec` starts with `-` (so none is an option of vmctl's: one core, attached), every
/// word is UTF-8 and the program's is not empty; `None` for anything else, which clap parses. This is what clap
/// gives for such a command line, without clap: building clap's parser is most of vmctl's
/// own work before it asks the agent, and that is paid on every `vmctl exec`.
pub fn plain_exec(words: &[std::ffi::OsString]) -> Option<(std::path::PathBuf, Vec<String>)> {
    let [_, exec, program, args @ ..] = words else {
        return None;
    };
    let plain = |word: &std::ffi::OsString| {
        word.to_str()
            .filter(|w| !w.starts_with('-'))
            .map(String::from)
    };
    if exec != "exec" {
        return None;
    }
    // clap takes no empty path.
    let program = plain(program).filter(|program| !program.is_empty())?;
    let args = args.iter().map(plain).collect::<Option<Vec<String>>>()?;
    Some((program.into(), args))
}

/// `exec`'s own options among the program's arguments (clap hands everything after the
/// program over): `--cores N`, `--cores=N` and `--detach` are vmctl's.
pub fn own_options(
    args: &[String],
    mut cores: u16,
    mut detach: bool,
) -> Result<(Vec<String>, u16, bool), String> {
    let mut rest = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let value = match word.as_str() {
            "--detach" => {
                detach = true;
                continue;
            }
            "--cores" => words.next().map(String::as_str),
            other => match other.strip_prefix("--cores=") {
                Some(value) => Some(value),
                None => {
                    rest.push(word.clone());
                    continue;
                }
            },
        };
        cores = value
            .and_then(|v| v.parse().ok())
            .filter(|n| (1..=64).contains(n))
            .ok_or("--cores takes a number from 1 to 64")?;
    }
    Ok((rest, cores, detach))
}
