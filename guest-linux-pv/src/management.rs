//! The agent's management socket, which `vmctl` talks to ([`crate::vmctl_proto`]).
//!
//! Why a socket to the agent rather than vmctl mapping the control region itself: the region
//! needs root (`/dev/mem`), so `vmctl status` would be root-only; its rings have one producer
//! and one consumer, which is the agent; the holder token never leaves the agent; and the
//! kernel tells the agent who is asking (`SO_PEERCRED`), so only root moves cores.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{json, Value};
use vmcall_proto::hypercall::{vmcall, Hypercall, HypercallFailure, Status};

use crate::control::Control;
use crate::report;
use crate::vmctl_proto::SOCKET;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How often a waiting move looks at the status page.
const POLL: Duration = Duration::from_millis(10);

/// Threads kept waiting for the next connection when none is being answered.
const SPARE_THREADS: usize = 2;
/// How long a thread whose `accept` failed waits before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Listens for good: threads wait in `accept` on the socket, and the one the kernel hands a
/// connection answers it itself (an attached `vmctl exec`'s connection then goes to the exec
/// reader, which writes the process's state changes to it). A thread that takes a connection when no other waits starts one first, and a thread
/// that has answered waits again unless [`SPARE_THREADS`] others do: starting a thread is a
/// good part of a short command's cost, so it is paid between connections. (A listener thread
/// that handed each connection to a waiting thread cost every command one more thread
/// wake-up, some 0.5 ms under Bochs.)
pub fn serve(control: Arc<Control>) {
    let listener = match listen() {
        Ok(listener) => listener,
        Err(e) => {
            report::emit(&report::error("management_socket", &e, |o| {
                o.str("path", SOCKET);
            }));
            return;
        }
    };
    let acceptors = Arc::new(Acceptors {
        control,
        listener,
        waiting: AtomicUsize::new(0),
    });
    acceptors.run();
}

/// The threads that accept and answer connections.
struct Acceptors {
    control: Arc<Control>,
    listener: UnixListener,
    /// Threads waiting in `accept`.
    waiting: AtomicUsize,
}

impl Acceptors {
    /// One thread's life: accept, answer, again, while it is needed.
    fn run(self: &Arc<Self>) {
        loop {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let accepted = self.listener.accept();
            let accepted_tsc = crate::exec::tsc_now();
            let last = self.waiting.fetch_sub(1, Ordering::AcqRel) == 1;
            let Ok((stream, _)) = accepted else {
                // The socket's own errors (a connection reset before it was taken, no
                // descriptor left): this thread tries again a moment later, and starts none.
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            };
            if last {
                // The last one waiting: another waits before this one answers.
                let acceptors = self.clone();
                std::thread::spawn(move || acceptors.run());
            }
            answer(&self.control, stream, accepted_tsc);
            if self.waiting.load(Ordering::Acquire) >= SPARE_THREADS {
                return;
            }
        }
    }
}

fn listen() -> std::io::Result<UnixListener> {
    let path = Path::new(SOCKET);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Everyone may ask; the agent decides per command from the caller's uid.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Answers the request on `stream`, accepted at TSC `accepted_tsc`.
fn answer(control: &Control, stream: UnixStream, accepted_tsc: u64) {
    let uid = getsockopt(&stream, PeerCredentials).map(|c| c.uid()).ok();
    // The request's first bytes may carry descriptors (`vmctl exec`'s program and streams).
    let mut first = [0u8; MAX_REQUEST as usize];
    let (line, fds) = match crate::fdpass::receive(&stream, &mut first) {
        Ok((len, fds)) => {
            let mut line = first[..len].to_vec();
            if !line.ends_with(b"\n") {
                let mut reader = BufReader::new((&stream).take(MAX_REQUEST));
                let _ = reader.read_until(b'\n', &mut line);
            }
            (Ok(String::from_utf8_lossy(&line).into_owned()), fds)
        }
        Err(e) => (Err(e), Vec::new()),
    };
    let reply = match line {
        Ok(line) => match serde_json::from_str::<Value>(&line) {
            Ok(request) if crate::exec::handles(&request) => {
                return crate::exec::answer(&stream, uid, &request, fds, accepted_tsc, || {
                    status(control).ok()
                })
            }
            Ok(request) => handle(control, uid, &request),
            Err(e) => error("bad_request", format!("the request is not JSON: {e}")),
        },
        Err(e) => error("bad_request", format!("reading the request: {e}")),
    };
    let _ = crate::exec::send_line(&stream, &reply);
}

/// The longest move timeout the hypervisor accepts (`moves.rs`).
const MAX_MOVE_TIMEOUT_MS: u64 = 60_000;

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"ok": false, "code": code, "message": message.into()})
}

fn handle(control: &Control, uid: Option<u32>, request: &Value) -> Value {
    match request["cmd"].as_str() {
        Some("status") => match status(control) {
            Ok(page) => json!({"ok": true, "status": page, "linux": linux_view()}),
            Err(e) => error("unavailable", e),
        },
        Some("stats") => {
            let reset = request["reset"] == true;
            if reset && uid != Some(0) {
                return error(
                    "permission",
                    format!(
                        "resetting the statistics needs root (the caller is {})",
                        who(uid)
                    ),
                );
            }
            stats(control, reset)
        }
        Some("move") => {
            if uid != Some(0) {
                return error(
                    "permission",
                    format!("moving a core needs root (the caller is {})", who(uid)),
                );
            }
            let (Some(core), Some(to)) = (request["core"].as_u64(), request["to"].as_str()) else {
                return error("bad_request", "a move needs \"core\" and \"to\"");
            };
            let timeout_ms = request["timeout_ms"].as_u64().unwrap_or(0);
            // The hypervisor refuses longer ones too; checked here before the wait below
            // is computed from it.
            if timeout_ms > MAX_MOVE_TIMEOUT_MS {
                return error(
                    "bad_request",
                    format!("timeout_ms {timeout_ms} is above {MAX_MOVE_TIMEOUT_MS}"),
                );
            }
            let negotiable = request["negotiable"].as_bool().unwrap_or(false);
            move_core(control, core, to, timeout_ms, negotiable)
        }
        Some("rebalance") => {
            if uid != Some(0) {
                let who = uid.map_or("an unknown user".into(), |u| format!("uid {u}"));
                return error(
                    "permission",
                    format!("switching the policy needs root (the caller is {who})"),
                );
            }
            let Some(policy) = request["policy"].as_str() else {
                return error("bad_request", "a rebalance needs \"policy\"");
            };
            let period_ms = request["period_ms"].as_u64().unwrap_or(0);
            rebalance(control, policy, period_ms)
        }
        _ => error("bad_request", "unknown command"),
    }
}

fn who(uid: Option<u32>) -> String {
    uid.map_or("an unknown user".into(), |u| format!("uid {u}"))
}

/// How long a `STATS` request may wait for the hypervisor's BSP (it serves requests between
/// and during moves).
const STATS_WAIT: Duration = Duration::from_secs(5);

/// Asks the hypervisor for fresh figures (after a reset when `reset`) and returns its stats
/// page once it shows the request served (`{"ok": true, "stats": page}`, or an error).
pub fn stats(control: &Control, reset: bool) -> Value {
    // SAFETY: as for CORE_MOVE in `move_core`: the region was validated, so this runs under
    // Tandem; STATS only reads and writes registers.
    let called = unsafe {
        vmcall(
            Hypercall::Stats,
            [u64::from(reset), 0, 0, 0, 0],
            control.holder_token,
        )
    };
    let number = match called {
        Ok(result) => result.results[0],
        Err(e) => {
            return error(
                "unavailable",
                format!("the hypervisor refused STATS ({e:?})"),
            )
        }
    };
    let until = Instant::now() + STATS_WAIT;
    loop {
        let page = control
            .stats()
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()));
        if let Ok(page) = &page {
            if page["request"]
                .as_u64()
                .is_some_and(|served| served >= number)
            {
                return json!({"ok": true, "stats": page});
            }
        }
        if Instant::now() > until {
            return error(
                "unavailable",
                format!(
                    "the hypervisor did not publish its figures within {} s",
                    STATS_WAIT.as_secs()
                ),
            );
        }
        std::thread::sleep(POLL);
    }
}

fn status(control: &Control) -> Result<Value, String> {
    let page = control.status()?;
    serde_json::from_str(&page).map_err(|e| format!("status page: {e}"))
}

/// What Linux itself says: CPUs online and its load average.
fn linux_view() -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let load: Vec<f64> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    json!({
        "cpus_online": read("/sys/devices/system/cpu/online").trim(),
        "loadavg": load,
        "load": crate::linux_load::last(),
        "agent": agent_view(),
    })
}

/// The agent's own open descriptors and its delegation server's (a leak shows as a count
/// that only grows; `vmctl status --json` shows them for long runs).
fn agent_view() -> Value {
    let open_fds = |pid: &str| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| dir.count() as u64)
            .ok()
    };
    let server = crate::delegation::server::pid();
    json!({
        "open_fds": open_fds("self"),
        "server_pid": server.map(|pid| pid.as_raw()),
        "server_open_fds": server.and_then(|pid| open_fds(&pid.as_raw().to_string())),
    })
}

fn cores_text(cores: &Value) -> String {
    let list: Vec<String> = cores
        .as_array()
        .map(|a| a.iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    list.join(", ")
}

/// Checks a move against the status page (for clear messages; the hypervisor checks again),
/// asks the hypervisor for it, and waits for its result.
fn move_core(control: &Control, core: u64, to: &str, timeout_ms: u64, negotiable: bool) -> Value {
    let page = match status(control) {
        Ok(page) => page,
        Err(e) => return error("unavailable", e),
    };
    let guests = page["guests"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = guests.iter().filter_map(|g| g["name"].as_str()).collect();
    let Some(target) = guests.iter().find(|g| g["name"] == to) else {
        return error(
            "unknown_guest",
            format!("no guest named '{to}' (guests: {})", names.join(", ")),
        );
    };
    if target["state"] != "running" {
        return error(
            "not_allowed",
            format!(
                "guest '{to}' is {}: it cannot take a core",
                target["state"].as_str().unwrap_or("not running")
            ),
        );
    }
    let cores = page["cores"].as_array().cloned().unwrap_or_default();
    let Some(current) = cores.get(core as usize).filter(|_| core < 64) else {
        return error(
            "unknown_core",
            format!(
                "no core {core}: this machine has cores 0 to {}",
                cores.len().saturating_sub(1)
            ),
        );
    };
    let allowed = &target["allowed"];
    if !allowed
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c.as_u64() == Some(core)))
    {
        return error(
            "not_allowed",
            format!(
                "guest '{to}' may not hold core {core} (it may hold {})",
                cores_text(allowed)
            ),
        );
    }
    let owner = current["owner"].as_str().unwrap_or("");
    if owner == to {
        return error(
            "already_there",
            format!("core {core} already belongs to '{to}'"),
        );
    }
    if let Some(g) = guests.iter().find(|g| g["name"] == owner) {
        if g["boot_core"].as_u64() == Some(core) {
            return error(
                "boot_core",
                format!("core {core} is the boot core of '{owner}', which keeps it"),
            );
        }
    }
    if page["move_in_flight"] == true {
        return error(
            "busy",
            "another core move is in flight; try again when it ends",
        );
    }
    let Some(target_id) = target["id"].as_u64() else {
        return error("unavailable", "the status page names no guest id");
    };
    // Linux's hotplug actor gets the revoke (from Linux) or the grant (to Linux) within
    // microseconds of the call: it looks for it at once rather than at its next poll.
    let is_linux = |name: &str| {
        guests
            .iter()
            .any(|g| g["name"] == name && g["kind"] == "linux")
    };
    let to_linux_actor = (is_linux(owner) || is_linux(to)).then(crate::hotplug::events_handled);
    // SAFETY: the control region's header was written by the Tandem hypervisor (its magic
    // and ABI version were validated when it was attached), so this runs as a Tandem guest,
    // where VMCALL is defined; CORE_MOVE only reads registers and returns values in them.
    let called = unsafe {
        vmcall(
            Hypercall::CoreMove,
            // R10: bit 0, the owner may decline (ABI.md, `CORE_MOVE`).
            [core, target_id, timeout_ms, u64::from(negotiable), 0],
            control.holder_token,
        )
    };
    if let (Ok(_), Some(seen)) = (&called, to_linux_actor) {
        crate::hotplug::expect_event(seen);
    }
    let id = match called {
        Ok(result) => result.results[0],
        Err(e) => {
            let status = match e {
                HypercallFailure::Status(status) => Some(status),
                HypercallFailure::Unknown(_) => None,
            };
            let (code, text) = match status {
                Some(Status::Busy) => ("busy", "another core move is in flight"),
                Some(Status::InvalidCore) => ("unknown_core", "the hypervisor has no such core"),
                Some(Status::InvalidArgument) => {
                    ("not_allowed", "the hypervisor refused this move")
                }
                Some(Status::PermissionDenied) => {
                    ("unavailable", "the hypervisor refused the holder token")
                }
                _ => ("unavailable", "CORE_MOVE failed"),
            };
            return error(code, format!("{text} ({e:?})"));
        }
    };
    // Linux's clock runs with the machine; give the hypervisor's own deadline room.
    let wait = Duration::from_millis(timeout_ms.max(5_000) * 3) + Duration::from_secs(30);
    let until = Instant::now() + wait;
    loop {
        if let Ok(page) = status(control) {
            let done = page["moves"]
                .as_array()
                .and_then(|moves| moves.iter().find(|m| m["id"].as_u64() == Some(id)).cloned());
            if let Some(result) = done {
                return outcome(result);
            }
        }
        if Instant::now() > until {
            return error(
                "timeout",
                format!("move {id} did not report within {} s", wait.as_secs()),
            );
        }
        std::thread::sleep(POLL);
    }
}

fn outcome(result: Value) -> Value {
    let core = &result["core"];
    let name = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let (from, to) = (name(&result["from"]), name(&result["to"]));
    let (code, message) = match result["outcome"].as_str() {
        Some("done") => return json!({"ok": true, "move": result}),
        Some("refused") => {
            let why = match result["decline_reason"].as_str().unwrap_or("") {
                "busy" => ": its runnable threads would exceed its cores without it".to_string(),
                "" => String::new(),
                other => format!(" ({other})"),
            };
            ("refused", format!("{from} refused to give core {core} up{why}"))
        }
        Some("cancelled") => (
            "cancelled",
            format!("{from} did not give core {core} up in time; the move was called off and the core stays {from}'s"),
        ),
        Some("timeout") => (
            "timeout",
            format!("{to} did not start core {core} in time; the core is back in the hypervisor's pool"),
        ),
        _ => ("failed", format!("the move of core {core} failed")),
    };
    let mut reply = error(code, message);
    reply["move"] = result;
    reply
}

/// The policies `SET_POLICY` knows, by number.
const POLICIES: [&str; 3] = ["static", "autonomous", "cooperative"];
/// The longest sampling period the hypervisor accepts.
const MAX_PERIOD_MS: u64 = 1000;

/// Asks the hypervisor to switch to `policy` (with `period_ms`, 0 to keep the period) and
/// waits until its status page shows it in force.
fn rebalance(control: &Control, policy: &str, period_ms: u64) -> Value {
    let Some(number) = POLICIES.iter().position(|p| *p == policy) else {
        return error(
            "bad_request",
            format!(
                "no policy named '{policy}' (policies: {})",
                POLICIES.join(", ")
            ),
        );
    };
    if period_ms > MAX_PERIOD_MS {
        return error(
            "bad_request",
            format!("the period is 1 to {MAX_PERIOD_MS} ms (asked: {period_ms})"),
        );
    }
    let switches_before = status(control)
        .ok()
        .and_then(|p| p["policy"]["switches"].as_u64())
        .unwrap_or(0);
    // SAFETY: the control region's header was written by the Tandem hypervisor (its magic
    // and ABI version were validated when it was attached), so this runs as a Tandem guest,
    // where VMCALL is defined; SET_POLICY only reads registers.
    let called = unsafe {
        vmcall(
            Hypercall::SetPolicy,
            [number as u64, period_ms, 0, 0, 0],
            control.holder_token,
        )
    };
    if let Err(e) = called {
        return error("unavailable", format!("SET_POLICY failed ({e:?})"));
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(page) = status(control) {
            let now = &page["policy"];
            if now["name"] == policy && now["switches"].as_u64().unwrap_or(0) > switches_before {
                return json!({"ok": true, "policy": now});
            }
        }
        if Instant::now() > until {
            return error("timeout", "the hypervisor did not switch within 30 s");
        }
        std::thread::sleep(POLL);
    }
}
