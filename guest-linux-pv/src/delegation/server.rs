//! The delegation server runs as a child process of PID 1, so it can die (a bug, the OOM
//! killer, `kill -9`) without taking Linux down, and PID 1 starts a new one, which attaches
//! to the rings where the old one left them as the region's next epoch. Lavender's callers
//! whose calls died with it get `EIO` once its heartbeat has been silent for
//! `vmcall_proto::delegation::SILENCE_MS` (or at once when the next epoch begins); calls
//! after the restart are served.
//!
//! The counters live in anonymous shared memory mapped before the fork, so PID 1 reads what
//! every server generation counted.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};
use vmcall_proto::region::SharedRegion;

use super::{serve, Counters, Limits};
use crate::report;

/// A server that dies sooner than this after starting is not restarted (it would only die
/// again: its setup fails).
const MIN_LIFE: Duration = Duration::from_secs(1);

struct Running {
    pid: Pid,
    started: Instant,
    region: SharedRegion<'static>,
    root: PathBuf,
    limits: Limits,
    counters: &'static Counters,
    generation: u64,
}

/// The one server PID 1 supervises.
static SERVER: Mutex<Option<Running>> = Mutex::new(None);

/// The counters' mapping, for [`cpu_leaving`] and [`cpu_back`] (PID 1's CPU hotplug).
static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();

/// PID 1 is about to take Linux's CPU `cpu` offline: the server's workers leave it
/// (`CpuPins::leaving`). Nothing here allocates.
pub fn cpu_leaving(cpu: usize) {
    if let Some(counters) = COUNTERS.get() {
        counters.pins.leaving(cpu);
    }
}

/// CPU `cpu` is online again, or PID 1 failed to take it offline: workers may pin there.
pub fn cpu_back(cpu: usize) {
    if let Some(counters) = COUNTERS.get() {
        counters.pins.back(cpu);
    }
}

/// Counters every server generation adds to, zeroed.
pub fn shared_counters() -> Result<&'static Counters, String> {
    let len = NonZeroUsize::new(size_of::<Counters>()).ok_or("empty counters")?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing; it is
    // never unmapped, so the reference is good for 'static. The kernel zero-fills it, and
    // `Counters` is made only of atomics, for which all-zero bytes are a valid value (0).
    // MAP_SHARED keeps it shared with the forked server, which only touches it atomically.
    unsafe {
        let memory = mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )
        .map_err(|e| format!("cannot map the counters: {}", e.desc()))?;
        let counters: &'static Counters = &*memory.as_ptr().cast::<Counters>();
        Ok(COUNTERS.get_or_init(|| counters))
    }
}

/// Starts the server process. Called by PID 1 while it runs no other thread.
pub fn start(
    region: SharedRegion<'static>,
    root: PathBuf,
    limits: Limits,
    counters: &'static Counters,
) -> Result<Pid, String> {
    let pid = spawn(region, &root, limits, counters)?;
    let generation = 1;
    announce(pid, generation);
    *SERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
        pid,
        started: Instant::now(),
        region,
        root,
        limits,
        counters,
        generation,
    });
    Ok(pid)
}

fn announce(pid: Pid, generation: u64) {
    report::emit(&report::marker("delegation_server", |o| {
        o.u64("pid", pid.as_raw() as u64)
            .u64("generation", generation);
    }));
}

fn spawn(
    region: SharedRegion<'static>,
    root: &std::path::Path,
    limits: Limits,
    counters: &'static Counters,
) -> Result<Pid, String> {
    let (broker, server_end) = crate::exec::broker::pair()
        .map_err(|e| format!("cannot make the stdio broker's sockets: {}", e.desc()))?;
    // SAFETY: PID 1 runs a single thread (the server's threads live in the child), so the
    // child may go on with ordinary Rust: no lock can be held by a thread that vanished.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(server_end);
            crate::exec::broker::serve(broker);
            Ok(child)
        }
        Ok(ForkResult::Child) => {
            drop(broker);
            crate::exec::broker::keep(server_end);
            // PID 1 blocks the signals it takes through a signalfd; the server wants the
            // default actions (SIGTERM at shutdown ends it).
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            if let Err(reason) = serve(region, root, limits, counters) {
                report::emit(&report::error("delegation", &reason, |_| {}));
                std::process::exit(1);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Err(e) => Err(format!("cannot fork the delegation server: {}", e.desc())),
    }
}

/// The running server's pid.
pub fn pid() -> Option<Pid> {
    SERVER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|running| running.pid)
}

/// PID 1 collected `pid`: if it was the server, a new one starts (unless it died young).
/// Returns whether `pid` was the server.
pub fn exited(pid: Pid) -> bool {
    let mut server = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(running) = server.as_mut().filter(|running| running.pid == pid) else {
        return false;
    };
    if running.started.elapsed() >= MIN_LIFE {
        restart(running);
    } else {
        report::emit(&report::error(
            "delegation",
            &"the delegation server died right after starting; not restarting it",
            |_| {},
        ));
        *server = None;
    }
    true
}

/// Collects `pid`, which has been killed, and goes on as PID 1's loop does when it reaps a
/// child ([`exited`]): for the self-test, which runs before that loop. The new server's pid.
pub fn collect(pid: Pid) -> Result<Pid, String> {
    waitpid(pid, None).map_err(|e| format!("waitpid {pid}: {}", e.desc()))?;
    if !exited(pid) {
        return Err(format!("{pid} was not the delegation server"));
    }
    self::pid().ok_or_else(|| "the delegation server was not restarted".into())
}

fn restart(running: &mut Running) {
    match spawn(
        running.region,
        &running.root,
        running.limits,
        running.counters,
    ) {
        Ok(pid) => {
            running.pid = pid;
            running.started = Instant::now();
            running.generation += 1;
            announce(pid, running.generation);
        }
        Err(reason) => report::emit(&report::error("delegation", &reason, |_| {})),
    }
}
