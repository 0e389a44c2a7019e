//! `cargo xtask run`: boot the image and show its consoles live.
//!
//! On a terminal the run is interactive: the terminal is the Linux guest's console (COM1,
//! through a pty, see [`crate::shell`]), with the hypervisor's COM2 lines shown between its
//! lines, markers hidden but for notable ones (unless `--show-markers` or
//! `--log debug|trace`), and Ctrl-] stops the run. Otherwise (stdin or stdout not a
//! terminal, or `--batch`) both consoles are printed line by line, markers included, stdin is
//! never read and Ctrl-C stops the run.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::emulator::{Com1, EmulatorKind, Machine, Port, RunDir};
use crate::image::{ImageArgs, LogLevel};
use crate::session::{Outcome, Session};
use crate::shell::{Pty, Shell};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub image: ImageArgs,

    /// Boot this ISO as it is instead of building target/tandem/tandem.iso.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["linux_kernel", "log", "cmdline", "config", "keep_debug_info"])]
    pub iso: Option<PathBuf>,

    /// Emulator to use. Default: qemu-kvm when the host has usable nested VMX, else bochs.
    #[arg(long, value_enum)]
    pub emulator: Option<EmulatorKind>,

    /// Number of CPUs of the emulated machine.
    #[arg(long, default_value_t = 4)]
    pub cpus: u32,

    /// Memory of the emulated machine, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub memory: u32,

    /// Stop, successfully, when a marker with this "ev" appears (e.g. `idle`).
    /// Without it the run goes on until a fatal/panic marker, or until Ctrl-] on a terminal
    /// (Ctrl-C with --batch or without a terminal).
    #[arg(long, value_name = "EV")]
    pub until: Option<String>,

    /// Stop after this many seconds of wall time (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,

    /// Directory for this run's logs. Default: target/tandem/runs/run-<emulator>-<UTC time>/
    /// (e.g. run-bochs-20261201T233533Z, with -2, -3, ... if a run started in the same
    /// second).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,

    /// Do not take the terminal even when there is one: print both consoles line by line,
    /// never read stdin, stop with Ctrl-C. This is what happens anyway when stdin or stdout
    /// is not a terminal. Without it, on a terminal, the terminal is the Linux shell on
    /// COM1 (in raw mode: keys, Ctrl-C included, go to the guest), the hypervisor's COM2
    /// lines are shown between its output, and Ctrl-] stops the run.
    #[arg(long)]
    pub batch: bool,

    /// On a terminal, also show the markers: the machine-readable `@@tandem {json}` lines
    /// that tests and benchmarks read (load reports, counters, events). Without it the
    /// terminal shows only the notable ones (fatal, panic, guest_stopped,
    /// isolation_violation, a Lavender or user-program fault, agent_error); `--log debug`
    /// and `--log trace` show them all too. The run dir's com1.log and com2.log always have
    /// every line, and --batch prints every line.
    #[arg(long)]
    pub show_markers: bool,
}

/// Exit codes beyond 0/1, following `timeout(1)` and shells.
const EXIT_TIMEOUT: u8 = 124;
const EXIT_INTERRUPTED: u8 = 130;

pub fn run(args: RunArgs) -> Result<ExitCode> {
    println!("==> cargo xtask {}", crate::version());
    let emulator = match args.emulator {
        Some(kind) => {
            println!("==> emulator: {} (chosen with --emulator)", kind.name());
            kind
        }
        None => {
            let (kind, why) = EmulatorKind::auto();
            println!("==> emulator: {} ({why})", kind.name());
            kind
        }
    };
    let machine = Machine {
        emulator,
        cpus: args.cpus,
        memory_mib: args.memory,
    };
    // Bad options are reported before minutes of building.
    machine.check()?;
    if let Some(kernel) = &args.image.linux_kernel {
        crate::bzimage::check_file(kernel)?;
    }
    let iso = match &args.iso {
        Some(iso) => iso.clone(),
        None => {
            crate::toolchain::ensure_targets()?;
            args.image.build(
                &crate::image::default_iso(),
                crate::partitions::BuildMachine {
                    cpus: args.cpus,
                    memory_mib: args.memory,
                },
            )?
        }
    };

    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;

    let pty = if !args.batch && crate::shell::terminal_attached() {
        Some(Pty::open().context("opening a pty for COM1")?)
    } else {
        None
    };
    let com1 = match &pty {
        Some(pty) => Com1::Tty(pty.slave_path().to_path_buf()),
        None => Com1::File,
    };
    let run_dir = match &args.run_dir {
        Some(dir) => RunDir::fresh(dir)?,
        None => {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let stem = format!("run-{}-{}", emulator.name(), crate::bench::utc_stamp(secs));
            RunDir::unique(&crate::runs_dir(), &stem)?
        }
    };
    let run_path = run_dir.path().to_path_buf();
    let mut session = match Session::start_with(&machine, &iso, run_dir, &com1) {
        Ok(session) => session,
        Err(e) => {
            // Nothing booted: the folder holds at most the emulator's config, and the error
            // says what went wrong. A folder the user named is removed only if empty.
            let _ = if args.run_dir.is_none() {
                std::fs::remove_dir_all(&run_path)
            } else {
                std::fs::remove_dir(&run_path)
            };
            return Err(e);
        }
    };
    println!(
        "==> booting {} on {} ({} CPUs, {} MiB); logs in {}",
        iso.display(),
        emulator.name(),
        machine.cpus,
        machine.memory_mib,
        session.run_dir().path().display()
    );
    let shell = match pty {
        Some(pty) => {
            println!(
                "    This terminal is the Linux console (COM1, via {}); the hypervisor's COM2 \
                 lines appear between its output.",
                pty.slave_path().display()
            );
            println!(
                "    {} stops the emulator (Ctrl-C goes to Linux). Linux's shell comes up about \
                 a minute into a Bochs run.",
                crate::shell::ESCAPE_NAME
            );
            let com1_log = session.run_dir().console(Port::Com1);
            let show_markers =
                args.show_markers || matches!(args.image.log, LogLevel::Debug | LogLevel::Trace);
            if !show_markers {
                println!(
                    "    Markers (machine-readable event lines) go to the logs only, but for \
                     notable ones (fatal, panic, a guest stopped); --show-markers shows them."
                );
            }
            Some(Shell::start(
                pty,
                &com1_log,
                interrupted.clone(),
                show_markers,
            )?)
        }
        None => {
            println!("    Ctrl-C stops the emulator.");
            None
        }
    };
    let until = args.until.clone();
    let stdout = std::io::stdout();
    let outcome = session.watch(
        |markers| {
            until
                .as_deref()
                .is_some_and(|ev| markers.last().is_some_and(|m| m.ev() == ev))
        },
        args.timeout.map(Duration::from_secs),
        &interrupted,
        |port, line| match &shell {
            // The relay shows COM1 as it arrives, byte by byte; only COM2 is shown here.
            Some(shell) => {
                if port == Port::Com2 {
                    shell.show_line(line);
                }
            }
            // Both consoles are shown as they are: COM2 lines carry their own `[hv]` prefix.
            None => {
                let mut out = stdout.lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        },
    );
    // The terminal is restored before anything else is printed or returned.
    let escaped = shell.as_ref().is_some_and(Shell::escaped);
    let relay = shell.map(Shell::finish).transpose();
    let outcome = outcome?;
    if let Err(e) = relay {
        eprintln!("error: {e:#}");
    }
    if escaped {
        println!("==> {} pressed", crate::shell::ESCAPE_NAME);
    }
    session.stop()?;

    let code = match &outcome {
        Outcome::Satisfied => 0,
        Outcome::TimedOut(_) => EXIT_TIMEOUT,
        Outcome::Interrupted => EXIT_INTERRUPTED,
        Outcome::Terminal(_) | Outcome::Malformed { .. } | Outcome::EmulatorExited(_) => 1,
    };
    println!("==> {outcome}");
    if matches!(outcome, Outcome::EmulatorExited(_)) {
        // Why it exited (a Bochs panic, a QEMU error) is at the end of its own output.
        for log in session.emulator_logs() {
            println!("--- last lines of {}:", log.display());
            println!("{}", crate::emulator::tail(log, 12));
        }
    }
    println!("==> logs kept in {}", session.run_dir().path().display());
    Ok(ExitCode::from(code))
}
