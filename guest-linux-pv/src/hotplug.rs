//! Linux's hotplug actor: the agent carries out the hypervisor's core events with the
//! kernel's own CPU hotplug (`/sys/devices/system/cpu/cpuN/online`) and answers on the
//! control channel. Revoke: take the CPU offline, then `Released` (the hypervisor parks the
//! core once the dead CPU halts), or `Declined` (reason `unable`) when Linux keeps it (the
//! write failed: the kernel refused, or it is CPU 0); told to refuse, it declines with reason
//! `refused`. Grant: bring the CPU online (the kernel starts it with
//! INIT/SIPI, which the hypervisor emulates), then `Online`, or `Offline` when it failed.
//! Linux is never forced: what it cannot do, it says.

use std::fs;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmcall_proto::message::{CoreEvent, DeclineReason, GuestEvent, HypervisorEvent};

use crate::control::Control;
use crate::report;

/// How often the actor looks at its ring: Linux has no handler for the hypervisor's
/// control interrupt, so the ring is polled.
const POLL: Duration = Duration::from_millis(2);

/// The Linux CPU number of `core`, from the `tandem.cores=` list.
fn cpu_of(cores: &[u64], core: u64) -> Option<usize> {
    cores.iter().position(|&c| c == core)
}

pub fn set_online(cpu: usize, online: bool) -> Result<(), String> {
    let path = format!("/sys/devices/system/cpu/cpu{cpu}/online");
    fs::write(&path, if online { "1" } else { "0" }).map_err(|e| format!("writing {path}: {e}"))
}

/// How the actor answers, for the agent's `vmctl-moves` self-test, which shows what vmctl
/// says when Linux refuses a move or never answers. Set only from inside the agent (the
/// self-test runs in PID 1 when the command line asks for it); nothing outside can reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Carry events out (always, outside the self-test).
    Act,
    /// Answer without doing anything: keep a revoked CPU, leave a granted one offline.
    Refuse,
    /// Take events off the ring and never answer (as a stuck agent would).
    Ignore,
}

static BEHAVIOUR: AtomicU8 = AtomicU8::new(Behaviour::Act as u8);

/// Sets how the actor answers from the next event on.
pub fn set_behaviour(behaviour: Behaviour) {
    BEHAVIOUR.store(behaviour as u8, Ordering::Release);
}

fn behaviour() -> Behaviour {
    match BEHAVIOUR.load(Ordering::Acquire) {
        b if b == Behaviour::Refuse as u8 => Behaviour::Refuse,
        b if b == Behaviour::Ignore as u8 => Behaviour::Ignore,
        _ => Behaviour::Act,
    }
}

/// Serves core events for good (run on a thread of its own). A guest event (Lavender is down)
/// goes to [`crate::lavender_watch`], which lets go of what Linux held for Lavender.
pub fn serve(control: Arc<Control>, cores: Vec<u64>) {
    if let Err(e) = crate::system::run_ahead_of_ordinary_tasks() {
        report::emit(&report::error("hotplug_priority", &e, |_| {}));
    }
    loop {
        match control.next_event() {
            Ok(Some(HypervisorEvent::Guest(GuestEvent::Down { guest, state }))) => {
                crate::lavender_watch::peer_down(guest, state.name());
            }
            Ok(Some(HypervisorEvent::Core(event))) => {
                let answer = match behaviour() {
                    Behaviour::Act => act(&cores, event),
                    Behaviour::Refuse => refuse(event),
                    Behaviour::Ignore => continue,
                };
                if let Err(e) = control.send(answer) {
                    report::emit(&report::error("control", &e, |_| {}));
                }
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                report::emit(&report::error("control", &e, |_| {}));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// What Linux answers when it keeps things as they are.
fn refuse(event: CoreEvent) -> CoreEvent {
    let core = event.core();
    match event {
        CoreEvent::Grant { .. } => CoreEvent::Offline { core },
        CoreEvent::Revoke { .. } => CoreEvent::Declined {
            core,
            reason: DeclineReason::Refused,
        },
        _ => CoreEvent::Online { core },
    }
}

/// Carries out `event`; the answer for the hypervisor.
fn act(cores: &[u64], event: CoreEvent) -> CoreEvent {
    let core = event.core();
    let cpu = cpu_of(cores, core.index() as u64);
    match event {
        CoreEvent::Revoke { .. } => match cpu.filter(|&cpu| cpu != 0) {
            Some(cpu) if set_online(cpu, false).is_ok() => CoreEvent::Released { core },
            _ => CoreEvent::Declined {
                core,
                reason: DeclineReason::Unable,
            },
        },
        CoreEvent::Grant { .. } => match cpu.filter(|&cpu| cpu != 0) {
            Some(cpu) if set_online(cpu, true).is_ok() => CoreEvent::Online { core },
            _ => CoreEvent::Offline { core },
        },
        // Only the hypervisor sends grants and revokes; anything else is answered with
        // what Linux has.
        other => {
            let online = cpu.is_some_and(|cpu| {
                fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/online"))
                    .map_or(cpu == 0, |t| t.trim() == "1")
            });
            if online {
                CoreEvent::Online { core: other.core() }
            } else {
                CoreEvent::Offline { core: other.core() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::cores::CoreId;

    #[test]
    fn the_boot_cpu_and_unknown_cores_are_kept() {
        let cores = [1, 3];
        assert_eq!(cpu_of(&cores, 3), Some(1));
        let core = CoreId::new(1).unwrap();
        let revoke = CoreEvent::Revoke {
            core,
            deadline_us: 1000,
            negotiable: false,
        };
        assert_eq!(
            act(&cores, revoke),
            CoreEvent::Declined {
                core,
                reason: DeclineReason::Unable
            }
        );
        assert_eq!(
            refuse(revoke),
            CoreEvent::Declined {
                core,
                reason: DeclineReason::Refused
            }
        );
        let stranger = CoreId::new(2).unwrap();
        assert_eq!(
            act(&cores, CoreEvent::Grant { core: stranger }),
            CoreEvent::Offline { core: stranger }
        );
    }
}
