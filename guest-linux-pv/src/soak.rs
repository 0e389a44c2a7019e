//! The load both guests carry while the `vmctl` self-test moves cores (`vmctl-moves:N`,
//! `vmctl-soak:N`), and what it must find unchanged afterwards. Everything goes through the
//! real `/bin/vmctl`, as a user at the shell would:
//!
//! * **Before**: a probe (`soak_probe`, `when: "before"`): the agent's and its delegation
//!   server's open descriptors from `vmctl status --json`, and a `vmctl ps` (Lavender prints
//!   its free frames, live processes and threads as a `lavender_memory` marker when listed).
//! * **During**: Lavender's `primes` worker, detached, on 2 cores (its rounds are checked on
//!   Lavender's console); and two delegation workers, each running one Lavender program after
//!   another with `vmctl exec`: `mix` (writes its own file through Linux, reads it back and
//!   compares, reads the shared file, makes a null call; it says how many bytes it verified)
//!   and `sha256sum` of a 256 KiB file Linux wrote, whose digest must be Linux's.
//! * **After**: the workers finish their current program, `primes` is killed (`vmctl kill`)
//!   and its end awaited, and the probe runs again (`when: "after"`). `soak_load` says what
//!   ran: programs, failures (each one's output), bytes verified, digests checked.
//!
//! A scenario compares the probes: nothing may be lost (descriptors, frames, threads).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::report;

const VMCTL: &str = "/bin/vmctl";
/// Where the image keeps Lavender's programs.
const PROGRAMS: &str = "/usr/lib/tandem/lavender";
/// The file every `sha256sum` run digests and every `mix` run reads a piece of.
const SHARED_FILE: &str = "soak.bin";
const SHARED_BYTES: usize = 256 * 1024;
/// How long the detached primes worker may take to end once killed (Linux time).
const KILL_WAIT: Duration = Duration::from_secs(30);
/// Rounds of each `mix` run (48 KiB written and verified per round).
const MIX_ROUNDS: u64 = 2;

/// What the delegation workers did.
#[derive(Default)]
struct Tally {
    programs: u64,
    bytes_verified: u64,
    digests_checked: u64,
    failures: Vec<String>,
}

/// The load while it runs.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Tally>>,
    primes: u32,
    started: Instant,
}

/// The bytes of the shared file (a fixed xorshift64 sequence).
fn shared_bytes() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = Vec::with_capacity(SHARED_BYTES);
    while bytes.len() < SHARED_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(SHARED_BYTES);
    bytes
}

/// Linux's digest of `path` (busybox `sha256sum`).
fn linux_sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .filter(|hex| hex.len() == 64)
        .map(str::to_string)
        .ok_or_else(|| format!("sha256sum {} failed", path.display()))
}

fn vmctl(args: &[&str]) -> Result<(i32, String, String), String> {
    let out = Command::new(VMCTL)
        .args(args)
        .output()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `vmctl ps --json`: Lavender's processes (and its `lavender_memory` marker).
fn processes() -> Result<Vec<Value>, String> {
    let (status, stdout, stderr) = vmctl(&["ps", "--json"])?;
    if status != 0 {
        return Err(format!("vmctl ps failed ({status}): {}", stderr.trim()));
    }
    stdout
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_array)
        })
        .and_then(|v| v.as_array().cloned())
        .ok_or_else(|| format!("vmctl ps --json printed no list: {stdout}"))
}

/// How many times a probe reads the agent's descriptors. The agent's threads open files for
/// a moment (the load reporter reads `/proc` every millisecond, a request is being served):
/// such a descriptor shows in some readings, a leaked one in every reading, so the probe keeps
/// the fewest seen.
const FD_READINGS: usize = 5;

/// One probe: the agent's figures from `vmctl status --json` (its descriptors the fewest of
/// [`FD_READINGS`] readings) and a `vmctl ps`.
fn probe(when: &str) -> Result<(), String> {
    let live = processes()?
        .iter()
        .filter(|p| matches!(p["state"].as_str(), Some("running" | "stopped")))
        .count();
    let (mut agent_fds, mut server_fds, mut server_pid) = (u64::MAX, u64::MAX, 0);
    for _ in 0..FD_READINGS {
        let (status, stdout, stderr) = vmctl(&["status", "--json"])?;
        if status != 0 {
            return Err(format!("vmctl status failed ({status}): {}", stderr.trim()));
        }
        let page: Value =
            serde_json::from_str(stdout.trim()).map_err(|e| format!("vmctl status --json: {e}"))?;
        let agent = &page["linux"]["agent"];
        agent_fds = agent_fds.min(agent["open_fds"].as_u64().unwrap_or(0));
        server_fds = server_fds.min(agent["server_open_fds"].as_u64().unwrap_or(0));
        server_pid = agent["server_pid"].as_u64().unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    report::emit(&report::marker("soak_probe", |o| {
        o.str("when", when)
            .u64("live_processes", live as u64)
            .u64("agent_fds", agent_fds)
            .u64("server_fds", server_fds)
            .u64("server_pid", server_pid);
    }));
    Ok(())
}

/// Writes the shared file, takes the first probe and starts the load.
pub fn start(root: &Path) -> Result<Load, String> {
    let path = root.join(SHARED_FILE);
    fs::write(&path, shared_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let digest = linux_sha256(&path)?;
    probe("before")?;
    let primes = format!("{PROGRAMS}/primes");
    let (status, stdout, stderr) = vmctl(&[
        "exec",
        "--detach",
        "--cores",
        "2",
        &primes,
        "threads=8",
        "limit=200000",
        "rounds=1000",
    ])?;
    let primes: u32 = stdout
        .trim()
        .parse()
        .map_err(|_| format!("vmctl exec --detach primes ({status}): {}", stderr.trim()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = vec![
        spawn_worker(stop.clone(), mix),
        spawn_worker(stop.clone(), move |_| sha256sum(&digest)),
    ];
    Ok(Load {
        stop,
        workers,
        primes,
        started: Instant::now(),
    })
}

/// A worker running `one` (which gets the run's number and returns the bytes it verified, or
/// what went wrong) until told to stop.
fn spawn_worker(
    stop: Arc<AtomicBool>,
    one: impl Fn(u64) -> Result<(u64, u64), String> + Send + 'static,
) -> JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut tally = Tally::default();
        while !stop.load(Ordering::Acquire) {
            match one(tally.programs) {
                Ok((bytes, digests)) => {
                    tally.bytes_verified += bytes;
                    tally.digests_checked += digests;
                }
                Err(failure) => tally.failures.push(failure),
            }
            tally.programs += 1;
        }
        tally
    })
}

/// One `mix` run: its exit status and summary line must say every byte was right.
fn mix(run: u64) -> Result<(u64, u64), String> {
    let program = format!("{PROGRAMS}/mix");
    let id = format!("id={}", run % 1000);
    let rounds = format!("rounds={MIX_ROUNDS}");
    let shared = format!("shared={SHARED_FILE}");
    let (status, stdout, stderr) = vmctl(&["exec", &program, &id, &rounds, &shared])?;
    let summary = stdout
        .lines()
        .find(|l| l.contains(" rounds, "))
        .unwrap_or("");
    let bytes = (MIX_ROUNDS * 48 * 1024).to_string();
    let clean = format!(
        "{MIX_ROUNDS} rounds, {bytes} bytes written, {bytes} verified, {MIX_ROUNDS} null calls, 0 errors"
    );
    if status == 0 && summary.contains(&clean) {
        Ok((MIX_ROUNDS * 48 * 1024, 0))
    } else {
        Err(format!(
            "mix {id}: exit {status}: {} {}",
            stdout.trim(),
            stderr.trim()
        ))
    }
}

/// One `sha256sum` run: Lavender's digest of the shared file must be Linux's.
fn sha256sum(expected: &str) -> Result<(u64, u64), String> {
    let program = format!("{PROGRAMS}/sha256sum");
    let path = format!("path={SHARED_FILE}");
    let (status, stdout, stderr) = vmctl(&["exec", &program, &path])?;
    let want = format!("{expected}  {SHARED_FILE}");
    if status == 0 && stdout.lines().any(|l| l.trim() == want) {
        Ok((SHARED_BYTES as u64, 1))
    } else {
        Err(format!(
            "sha256sum: exit {status}: {} {}",
            stdout.trim(),
            stderr.trim()
        ))
    }
}

/// Stops the load (the workers end their current program), kills `primes`, waits for its
/// end, takes the second probe and reports the load (`soak_load`).
pub fn finish(load: Load, moves: u64) -> Result<(), String> {
    load.stop.store(true, Ordering::Release);
    let mut tally = Tally::default();
    for worker in load.workers {
        let one = worker
            .join()
            .map_err(|_| "a delegation worker panicked".to_string())?;
        tally.programs += one.programs;
        tally.bytes_verified += one.bytes_verified;
        tally.digests_checked += one.digests_checked;
        tally.failures.extend(one.failures);
    }
    let seconds = load.started.elapsed().as_secs();
    let pid = load.primes.to_string();
    let (kill_exit, _, kill_stderr) = vmctl(&["kill", &pid])?;
    let deadline = Instant::now() + KILL_WAIT;
    let primes_state = loop {
        let state = processes()?
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(load.primes)))
            .map(|p| p["state"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|| "gone".into());
        if !matches!(state.as_str(), "running" | "stopped") || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // The last thread's frames go back once the scheduler has switched away from it.
    std::thread::sleep(Duration::from_secs(1));
    probe("after")?;
    report::emit(&report::marker("soak_load", |o| {
        o.u64("moves", moves)
            .u64("linux_seconds", seconds)
            .u64("programs", tally.programs)
            .u64("failed", tally.failures.len() as u64)
            .u64("bytes_verified", tally.bytes_verified)
            .u64("digests_checked", tally.digests_checked)
            .u64("primes_pid", load.primes.into())
            .i64("primes_kill_exit", kill_exit.into())
            .str("primes_state", &primes_state);
        if kill_exit != 0 {
            o.str("kill_stderr", kill_stderr.trim());
        }
        o.array("failures", |a| {
            for failure in tally.failures.iter().take(4) {
                a.str(failure);
            }
        });
    }));
    Ok(())
}

/// The delegation root on the kernel command line (as PID 1 serves it).
pub fn root() -> PathBuf {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    crate::delegation_root(&cmdline)
}
