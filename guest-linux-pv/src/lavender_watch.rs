//! What Linux does when its peer Lavender stops running (a crash the hypervisor contained, a
//! hang its watchdog caught). The hypervisor tells Linux with `GuestEvent::Down` on its control
//! ring 0 (the hotplug actor reads it); the agent then ends what Linux still holds for
//! Lavender:
//!
//! * the delegation server is killed: every context thread of a Lavender process, its open
//!   descriptors and its calls in flight end with it (the kernel closes them), and PID 1
//!   starts the next server generation as it does after any death of the server;
//! * Lavender's processes are marked lost (`vmctl ps`: `lost`), a `vmctl exec` waiting on
//!   one says so and exits 137, and later process commands are refused at once.
//!
//! The `agent_peer_down` marker reports it (the guest, its state, the server's pid and open
//! descriptors when it was killed, the processes lost).

use nix::sys::signal::{kill, Signal};

use crate::report;

/// Guest `guest` (Linux's peer: Lavender, the one guest Linux shares a region with) went down
/// in `state` (`stopped`, `halted`): lets go of what Linux held for it.
pub fn peer_down(guest: u32, state: &str) {
    let server = crate::delegation::server::pid();
    let server_fds = server.and_then(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|dir| dir.count())
    });
    let killed = server.is_some_and(|pid| kill(pid, Signal::SIGKILL).is_ok());
    let lost = crate::exec::lavender_stopped(state);
    report::emit(&report::marker("agent_peer_down", |o| {
        o.u64("guest", guest.into())
            .str("state", state)
            .u64(
                "server_pid",
                server.map_or(0, |pid| pid.as_raw().unsigned_abs().into()),
            )
            .u64("server_fds", server_fds.unwrap_or(0) as u64)
            .bool("server_killed", killed)
            .u64("processes_lost", lost as u64);
    }));
}
