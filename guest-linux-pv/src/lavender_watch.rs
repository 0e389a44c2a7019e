//! What Linux does when Lavender stops running (a crash the hypervisor contained, a hang its
//! watchdog caught): a thread reads Lavender's state from the hypervisor's status page every
//! [`PERIOD`] and, when it leaves `running`, ends what Linux still holds for it:
//!
//! * the delegation server is killed: every context thread of a Lavender process, its open
//!   descriptors and its calls in flight end with it (the kernel closes them), and PID 1
//!   starts the next server generation as it does after any death of the server;
//! * Lavender's processes are marked lost (`vmctl ps`: `lost`), a `vmctl exec` waiting on
//!   one says so and exits 137, and later process commands are refused at once.
//!
//! The `lavender_down_seen` marker reports it (the state, the server's pid and open
//! descriptors when it was killed, the processes lost).

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use serde_json::Value;

use crate::control::Control;
use crate::report;

/// How often Lavender's state is looked at.
const PERIOD: Duration = Duration::from_millis(100);

/// Lavender's state on a status page (`running`, `stopped`, ...), if the page lists it.
pub fn lavender_state(page: &Value) -> Option<&str> {
    page["guests"]
        .as_array()?
        .iter()
        .find(|guest| guest["kind"] == "lavender")?["state"]
        .as_str()
}

/// Watches for good (run on a thread of its own); acts once, when Lavender stops running.
pub fn watch(control: Arc<Control>) {
    let mut seen_running = false;
    loop {
        std::thread::sleep(PERIOD);
        let Ok(page) = control.status() else { continue };
        let Ok(page) = serde_json::from_str::<Value>(&page) else {
            continue;
        };
        match lavender_state(&page) {
            Some("running") => seen_running = true,
            Some(down) if seen_running => {
                lavender_stopped(down);
                return;
            }
            _ => {}
        }
    }
}

fn lavender_stopped(down: &str) {
    let server = crate::delegation::server::pid();
    let server_fds = server.and_then(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|dir| dir.count())
    });
    let killed = server.is_some_and(|pid| kill(pid, Signal::SIGKILL).is_ok());
    let lost = crate::exec::lavender_stopped(down);
    report::emit(&report::marker("lavender_down_seen", |o| {
        o.str("state", down)
            .u64(
                "server_pid",
                server.map_or(0, |pid| pid.as_raw().unsigned_abs().into()),
            )
            .u64("server_fds", server_fds.unwrap_or(0) as u64)
            .bool("server_killed", killed)
            .u64("processes_lost", lost as u64);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lavender_is_found_by_kind() {
        let page = json!({"guests": [
            {"name": "linux", "kind": "linux", "state": "running"},
            {"name": "lav", "kind": "lavender", "state": "stopped"},
        ]});
        assert_eq!(lavender_state(&page), Some("stopped"));
        assert_eq!(lavender_state(&json!({"guests": []})), None);
        assert_eq!(lavender_state(&json!({})), None);
    }
}
