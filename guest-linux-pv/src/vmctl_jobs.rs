//! `vmctl exec/ps/kill/stop/cont`: Lavender processes run like local ones. Included by
//! vmctl (`#[path]`); the agent's `exec` module is the other end.
//!
//! `vmctl exec` passes the agent the program file and its own stdin, stdout and stderr with
//! `SCM_RIGHTS`, so the Lavender process reads and writes them through delegation; it then
//! waits for the agent's lines, one per state change of the process (sent as Lavender
//! notifies them, never polled), and exits with the process's status. Ctrl-C (SIGINT, and
//! SIGTERM, SIGHUP, SIGQUIT) kills the remote process; Ctrl-Z stops it and stops vmctl, and
//! `fg` (SIGCONT) continues both.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Condvar, Mutex};

use nix::sys::signal::{raise, SigSet, SigmaskHow, Signal};
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

/// The pid of the process an attached exec runs (0 until Lavender started it), and its
/// change: a signal that comes before the pid waits for it.
static RUNNING: Mutex<u32> = Mutex::new(0);
static STARTED: Condvar = Condvar::new();

fn fail(status: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmctl: {message}");
    ExitCode::from(status)
}

/// Checks `path` as a Lavender program before bothering the agent: clear messages.
fn open_program(path: &Path) -> Result<File, ExitCode> {
    let shown = path.display();
    let mut file = File::open(path).map_err(|e| match e.kind() {
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
    let got = file.read(&mut header).unwrap_or(0);
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
    // The agent reads it from the start.
    nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekSet)
        .map_err(|e| fail(exec_exit::FAILED, format!("{shown}: {}", e.desc())))?;
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
    // Signals are taken by a thread of ours (sigwait), so they are blocked before any thread.
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
    let absolute = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    let request = json!({
        "cmd": "exec",
        "program": absolute.display().to_string(),
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
    let fds = [
        file.as_raw_fd(),
        std::io::stdin().as_raw_fd(),
        std::io::stdout().as_raw_fd(),
        std::io::stderr().as_raw_fd(),
    ];
    let fds = if detach { &fds[..1] } else { &fds[..] };
    if let Err(e) = fdpass::send(&stream, format!("{request}\n").as_bytes(), fds) {
        return fail(
            exec_exit::FAILED,
            format!("sending the request: {}", e.desc()),
        );
    }
    drop(file);
    if !detach {
        std::thread::spawn(move || forward_signals(signals));
    }
    let mut lines = BufReader::new(&stream).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            return fail(exec_exit::FAILED, "the agent closed the connection");
        };
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
        let pid = reply["pid"].as_u64().unwrap_or(0) as u32;
        match reply["event"].as_str() {
            Some("started") if detach => {
                println!("{pid}");
                return ExitCode::SUCCESS;
            }
            Some("started") => {
                *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = pid;
                STARTED.notify_all();
            }
            Some("stopped") => eprintln!("vmctl: Lavender process {pid} stopped"),
            Some("continued") => eprintln!("vmctl: Lavender process {pid} continued"),
            Some("exited") => {
                let status = reply["status"].as_i64().unwrap_or(0);
                return ExitCode::from((status & 0xff) as u8);
            }
            Some("killed") => {
                let signal = reply["signal"].as_u64().unwrap_or(0);
                eprintln!(
                    "vmctl: Lavender process {pid} killed by signal {signal}{}",
                    signal_name(signal)
                );
                return ExitCode::from((128 + signal.min(127)) as u8);
            }
            Some("lost") => {
                let lavender = reply["lavender"].as_str().unwrap_or("down");
                eprintln!(
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
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        _ => "",
    }
}

/// Turns vmctl's own signals into commands for the remote process, for good. A signal that
/// comes while the exec is on its way acts once the process has a pid (if the exec fails,
/// vmctl exits meanwhile).
fn forward_signals(signals: SigSet) {
    loop {
        let Ok(signal) = signals.wait() else { return };
        let pid = {
            let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            while *running == 0 {
                running = STARTED.wait(running).unwrap_or_else(|e| e.into_inner());
            }
            *running
        };
        let action = match signal {
            Signal::SIGTSTP => "stop",
            Signal::SIGCONT => "cont",
            _ => "kill",
        };
        let _ = ask(&json!({"cmd": "signal", "pid": pid, "action": action}));
        if signal == Signal::SIGTSTP {
            // Stopped like a local job: the shell shows it, and `fg` sends SIGCONT.
            let _ = raise(Signal::SIGSTOP);
        }
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
