//! `vmctl exec/ps/kill/stop/cont`: Lavender processes run like local ones. Included by
//! vmctl (`#[path]`); the agent's `exec` module is the other end.
//!
//! `vmctl exec` passes the agent the program file and its own stdin, stdout and stderr with
//! `SCM_RIGHTS`, so the Lavender process reads and writes them through delegation; it then
//! waits for the agent's lines, one per state change of the process (sent as Lavender
//! notifies them, never polled), and exits with the process's status. Ctrl-C (SIGINT, and
//! SIGTERM, SIGHUP, SIGQUIT) kills the remote process; Ctrl-Z stops it and stops vmctl, and
//! `fg` (SIGCONT) continues both. vmctl is one thread: it waits for the agent's lines and its
//! own signals (a `signalfd`) in one `poll`, so starting and ending it is a plain process's
//! cost, the launcher's share of every `vmctl exec`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{raise, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{json, Value};

use crate::fdpass;
// One request to the agent, and a JSON value as text: the same as vmctl's other commands.
use crate::vmctl_proto::SOCKET;
use crate::{ask, list, text};

/// Exit statuses of `vmctl exec` itself (as `env` and `timeout` use them): anything else is
/// the process's own status, or 128 + the signal that ended it.
pub mod exec_exit {
    /// vmctl, the agent or Lavender failed or refused (not root, unreachable, no memory).
    pub const FAILED: u8 = 125;
    /// The file is not a program Lavender can run (not an ELF, wrong architecture, too large).
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The file does not exist.
    pub const NOT_FOUND: u8 = 127;
}

/// Exit statuses of `ps`, `kill`, `stop` and `cont` (those of the other commands).
const INVALID: u8 = 3;
const PERMISSION: u8 = 6;
const UNAVAILABLE: u8 = 7;

fn fail(status: u8, message: impl std::fmt::Display) -> ExitCode {
    say!("vmctl: {message}");
    ExitCode::from(status)
}

/// Checks `path` as a Lavender program before bothering the agent: clear messages.
fn open_program(path: &Path) -> Result<File, ExitCode> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            fail(exec_exit::NOT_FOUND, format!("{shown}: no such file"))
        }
        _ => fail(exec_exit::NOT_EXECUTABLE, format!("{shown}: {e}")),
    })?;
    let metadata = file
        .metadata()
        .map_err(|e| fail(exec_exit::NOT_EXECUTABLE, format!("{shown}: {e}")))?;
    if !metadata.is_file() {
        return Err(fail(
            exec_exit::NOT_EXECUTABLE,
            format!("{shown}: not a regular file"),
        ));
    }
    let mut header = [0u8; 20];
    // At offset 0 without moving the file's offset: the agent reads the file with `pread`
    // from its start too, so vmctl need not seek back.
    let got = file.read_at(&mut header, 0).unwrap_or(0);
    if got < header.len() || header[..4] != *b"\x7fELF" {
        return Err(fail(
            exec_exit::NOT_EXECUTABLE,
            format!("{shown}: not an ELF file"),
        ));
    }
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if header[4] != 2 || header[5] != 1 || machine != 62 {
        return Err(fail(
            exec_exit::NOT_EXECUTABLE,
            format!(
                "{shown}: wrong architecture (ELF class {}, data {}, machine {machine}); \
                 Lavender runs 64-bit little-endian x86-64 programs",
                header[4], header[5]
            ),
        ));
    }
    Ok(file)
}

/// `vmctl exec PROGRAM [ARGS...] [--cores N] [--detach]`.
pub fn exec(program: &Path, args: &[String], cores: u16, detach: bool) -> ExitCode {
    let file = match open_program(program) {
        Ok(file) => file,
        Err(code) => return code,
    };
    if !nix::unistd::geteuid().is_root() {
        return fail(exec_exit::FAILED, "starting a Lavender program needs root");
    }
    // Signals are read from a signalfd, so they are blocked (they would end vmctl otherwise)
    // from here; the signalfd is made once the request is out, while vmctl waits for
    // Lavender anyway (a signal that comes before stays pending for it).
    let mut signals = SigSet::empty();
    if !detach {
        for signal in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGTSTP,
            Signal::SIGCONT,
        ] {
            signals.add(signal);
        }
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None);
    }
    // The path as given: the agent reads the program from the descriptor passed with the
    // request and names the process after the path's last component, as Linux names one
    // after the file name it was started by (resolving the path would add a tenth of a
    // millisecond of look-ups to every start).
    let request = json!({
        "cmd": "exec",
        "program": program.display().to_string(),
        "args": args,
        "cores": cores,
        "detach": detach,
    });
    let stream = match UnixStream::connect(SOCKET) {
        Ok(stream) => stream,
        Err(e) => {
            return fail(
                exec_exit::FAILED,
                format!("cannot reach the Tandem agent at {SOCKET}: {e}"),
            )
        }
    };
    // A detached process outlives vmctl: it gets none of vmctl's streams (which would keep
    // a `$(vmctl exec --detach ...)` waiting for their end) and writes to Lavender's console.
    // The streams by number: `std::io::stdin()` and `stdout()` would first set up std's
    // buffered handles, whose first use cost vmctl's start 0.4 ms under Bochs.
    use nix::libc::{STDERR_FILENO, STDIN_FILENO, STDOUT_FILENO};
    let fds = [file.as_raw_fd(), STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO];
    let fds = if detach { &fds[..1] } else { &fds[..] };
    // Serialized straight into bytes (`Display` would go through `core::fmt` as well).
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    if let Err(e) = fdpass::send(&stream, &line, fds) {
        return fail(
            exec_exit::FAILED,
            format!("sending the request: {}", e.desc()),
        );
    }
    drop(file);
    let signal_fd = if detach {
        None
    } else {
        match SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Some(fd),
            Err(e) => {
                // The process is on its way: vmctl still waits for it, without its signals.
                say!(
                    "vmctl: signalfd: {}: Ctrl-C and Ctrl-Z act on vmctl, not on the process",
                    e.desc()
                );
                let _ =
                    nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&signals), None);
                None
            }
        }
    };
    let mut lines = BufReader::new(&stream);
    // The remote process's pid once Lavender started it (0 before), and the signals that came
    // before it: they act once it has a pid (if the exec fails, vmctl exits meanwhile).
    let mut pid = 0;
    let mut early = Vec::new();
    loop {
        if let Some(signal_fd) = &signal_fd {
            // A line already read into the buffer comes first; else wait for either.
            if lines.buffer().is_empty() {
                let mut fds = [
                    PollFd::new(stream.as_fd(), PollFlags::POLLIN),
                    PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return fail(exec_exit::FAILED, format!("poll: {}", e.desc())),
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let (line_ready, signalled) = (ready(&fds[0]), ready(&fds[1]));
                if signalled {
                    while let Ok(Some(info)) = signal_fd.read_signal() {
                        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                            continue;
                        };
                        if pid == 0 {
                            early.push(signal);
                        } else {
                            forward_signal(pid, signal);
                        }
                    }
                }
                if !line_ready {
                    continue;
                }
            }
        }
        let mut line = String::new();
        if !matches!(lines.read_line(&mut line), Ok(1..)) {
            return fail(exec_exit::FAILED, "the agent closed the connection");
        }
        let Ok(reply) = serde_json::from_str::<Value>(&line) else {
            return fail(
                exec_exit::FAILED,
                format!("the agent said nonsense: {line}"),
            );
        };
        if reply["ok"] == false {
            let status = match reply["code"].as_str() {
                Some("not_executable" | "too_large") => exec_exit::NOT_EXECUTABLE,
                _ => exec_exit::FAILED,
            };
            return fail(
                status,
                format!("{}: {}", program.display(), text(&reply["message"])),
            );
        }
        let said_pid = reply["pid"].as_u64().unwrap_or(0) as u32;
        match reply["event"].as_str() {
            Some("started") if detach => {
                println!("{said_pid}");
                return ExitCode::SUCCESS;
            }
            Some("started") => {
                pid = said_pid;
                for signal in early.drain(..) {
                    forward_signal(pid, signal);
                }
            }
            Some("stopped") => say!("vmctl: Lavender process {pid} stopped"),
            Some("continued") => say!("vmctl: Lavender process {pid} continued"),
            Some("exited") => {
                let status = reply["status"].as_i64().unwrap_or(0);
                return ExitCode::from((status & 0xff) as u8);
            }
            Some("killed") => {
                let signal = reply["signal"].as_u64().unwrap_or(0);
                say!(
                    "vmctl: Lavender process {pid} killed by signal {signal}{}",
                    signal_name(signal)
                );
                return ExitCode::from((128 + signal.min(127)) as u8);
            }
            Some("lost") => {
                let lavender = reply["lavender"].as_str().unwrap_or("down");
                say!(
                    "vmctl: Lavender process {pid} lost: Lavender is {lavender} (ended as if \
                     by SIGKILL)"
                );
                return ExitCode::from(128 + 9);
            }
            _ => {}
        }
    }
}

fn signal_name(signal: u64) -> &'static str {
    match signal {
        4 => " (SIGILL)",
        5 => " (SIGTRAP)",
        7 => " (SIGBUS)",
        8 => " (SIGFPE)",
        2 => " (SIGINT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        _ => "",
    }
}

/// Turns one of vmctl's own signals into a command for the remote process `pid`.
fn forward_signal(pid: u32, signal: Signal) {
    let action = match signal {
        Signal::SIGTSTP => "stop",
        Signal::SIGCONT => "cont",
        // Ctrl-C: the remote process ends as a local one would (status 130).
        Signal::SIGINT => "interrupt",
        _ => "kill",
    };
    let _ = ask(&json!({"cmd": "signal", "pid": pid, "action": action}));
    if signal == Signal::SIGTSTP {
        // Stopped like a local job: the shell shows it, and `fg` sends SIGCONT.
        let _ = raise(Signal::SIGSTOP);
    }
}

fn answer(request: &Value) -> Result<Value, ExitCode> {
    let reply = ask(request).map_err(|e| {
        fail(
            UNAVAILABLE,
            format!("cannot reach the Tandem agent at {SOCKET}: {e}"),
        )
    })?;
    if reply["ok"] != true {
        let status = match reply["code"].as_str() {
            Some("no_process" | "bad_request") => INVALID,
            Some("permission") => PERMISSION,
            _ => UNAVAILABLE,
        };
        return Err(fail(status, text(&reply["message"])));
    }
    Ok(reply)
}

/// `vmctl kill|stop|cont PID`.
pub fn signal(pid: u32, action: &str) -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        return fail(PERMISSION, "signalling a Lavender process needs root");
    }
    match answer(&json!({"cmd": "signal", "pid": pid, "action": action})) {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// `vmctl ps [--json]`.
pub fn ps(json_out: bool) -> ExitCode {
    let reply = match answer(&json!({"cmd": "ps"})) {
        Ok(reply) => reply,
        Err(code) => return code,
    };
    let rows = reply["processes"].as_array().cloned().unwrap_or_default();
    if json_out {
        println!("{}", Value::Array(rows));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>5} {:<12} {:<8} {:>6} {:>5} {:<8} {:>7} {:>10} {:>7}",
        "PID", "PROGRAM", "STATE", "STATUS", "CORES", "RAN ON", "THREADS", "CPU(ms)", "CALLS"
    );
    for row in rows {
        let cpu = row["cpu_us"]
            .as_u64()
            .map_or("-".into(), |us| format!("{}.{:03}", us / 1000, us % 1000));
        println!(
            "{:>5} {:<12} {:<8} {:>6} {:>5} {:<8} {:>7} {:>10} {:>7}",
            text(&row["pid"]),
            text(&row["program"]),
            text(&row["state"]),
            text(&row["status"]),
            text(&row["cores"]),
            list(&row["ran_on"]),
            text(&row["threads"]),
            cpu,
            text(&row["calls"])
        );
    }
    ExitCode::SUCCESS
}

/// `eprintln!` in one `write`: vmctl shares the console with the agent's markers and the
/// kernel's messages, and an unbuffered stderr writes each formatted piece on its own, so
/// another writer's line could land in the middle of one of vmctl's.
pub fn say_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// [`say_line`] with `format!` arguments.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::vmctl_jobs::say_line(format_args!($($arg)*))
    };
}
pub(crate) use say;
