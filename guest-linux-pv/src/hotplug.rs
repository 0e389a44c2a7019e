//! Linux's hotplug actor: the agent carries out the hypervisor's core events with the
//! kernel's own CPU hotplug (`/sys/devices/system/cpu/cpuN/online`) and answers on the
//! control channel. Revoke: take the CPU offline, then `Released` (the hypervisor parks the
//! core once the dead CPU halts), or `Declined` (reason `unable`) when Linux keeps it (the
//! write failed: the kernel refused, or it is CPU 0); told to refuse, it declines with reason
//! `refused`. Grant: bring the CPU online (the kernel starts it with
//! INIT/SIPI, which the hypervisor emulates), then `Online`, or `Offline` when it failed.
//! Linux is never forced: what it cannot do, it says.
//!
//! The hypervisor rings Linux's doorbell device after each event it puts on the ring, and
//! PID 1's doorbell listener wakes the actor ([`crate::doorbell::also_wake`]); the actor
//! still looks every [`SAFETY_POLL`], in case a wake-up was lost. Without the device (a kernel
//! of the user's) nothing wakes it and it polls every [`POLL`]. It also looks every
//! [`WATCH_POLL`] while a move the agent itself asked for (`vmctl move-core`) is about to
//! send it an event ([`expect_event`]).

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use vmcall_proto::message::{CoreEvent, DeclineReason, GuestEvent, HypervisorEvent};

use crate::control::Control;
use crate::report;

/// How often the actor looks at its ring when no doorbell wakes it: each look costs Linux a
/// timer interrupt and two context switches, about 0.1 ms of a CPU under Bochs.
const POLL: Duration = Duration::from_millis(2);
/// How often it looks when the doorbell wakes it: only for a wake-up that never came.
const SAFETY_POLL: Duration = Duration::from_millis(100);
/// How often it looks while an event is expected: a move's revoke or grant waits for the
/// actor's look (1 ms on average at [`POLL`]), and a look costs Linux a timer interrupt and
/// two context switches, about 0.1 ms of a CPU under Bochs, so only for a short while.
const WATCH_POLL: Duration = Duration::from_micros(100);
/// How long an event is expected after a move is asked for: the owner's answer comes first
/// (Lavender releases a core in some 20 µs of virtual time under Bochs), but a busy owner may
/// take up to the move's deadline, and the actor goes back to [`POLL`] then.
const WATCH: Duration = Duration::from_millis(20);

/// When the actor carried out one grant or revoke, on the TSC ([`crate::exec::tsc_now`]), the
/// clock the hypervisor stamps a move's stages with: the moves benchmark splits Linux's part
/// of a move into the actor's reaction, Linux's own sysfs write and the confirmation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub core: u64,
    /// A grant (the CPU brought online); otherwise a revoke.
    pub online: bool,
    /// Linux did it (the write succeeded).
    pub ok: bool,
    /// The actor took the event off its ring.
    pub taken_tsc: u64,
    /// The sysfs write returned (the answer is sent right after).
    pub written_tsc: u64,
}

/// The last events carried out, oldest first, until [`take_carried`]; a fixed array, so
/// that the actor never allocates (see [`set_online`]).
const CARRIED_KEPT: usize = 8;
static CARRIED: Mutex<([Carried; CARRIED_KEPT], usize)> = Mutex::new((
    [Carried {
        core: 0,
        online: false,
        ok: false,
        taken_tsc: 0,
        written_tsc: 0,
    }; CARRIED_KEPT],
    0,
));

fn note_carried(carried: Carried) {
    let Ok(mut kept) = CARRIED.lock() else { return };
    let (list, len) = &mut *kept;
    if *len == CARRIED_KEPT {
        list.rotate_left(1);
        *len -= 1;
    }
    list[*len] = carried;
    *len += 1;
}

/// The events carried out since the last call, oldest first.
pub fn take_carried() -> Vec<Carried> {
    let Ok(mut kept) = CARRIED.lock() else {
        return Vec::new();
    };
    let (list, len) = &mut *kept;
    let taken = list[..*len].to_vec();
    *len = 0;
    taken
}

/// Core events the actor has taken off its ring.
static HANDLED: AtomicU64 = AtomicU64::new(0);
/// Until when ([`now_ns`]) the actor looks every [`WATCH_POLL`], as long as it has handled
/// [`WATCH_BASE`] core events and no more. Atomics, not a lock the management thread could
/// hold while the actor waits.
static WATCH_UNTIL_NS: AtomicU64 = AtomicU64::new(0);
static WATCH_BASE: AtomicU64 = AtomicU64::new(0);
/// The actor's thread, woken by [`expect_event`].
static ACTOR: OnceLock<Thread> = OnceLock::new();

/// Nanoseconds on the monotonic clock since the first call.
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// How many core events the actor has taken so far: read before a move is asked for, for
/// [`expect_event`].
pub fn events_handled() -> u64 {
    HANDLED.load(Ordering::Acquire)
}

/// A move that sends Linux a core event (a revoke or a grant) was just asked for, when the
/// actor had taken `seen` events: unless it has taken one since, it looks at its ring at once
/// and then every [`WATCH_POLL`] until its next core event, for at most [`WATCH`]. Called
/// once the move is asked for, so an ordinary thread preempted between the two does not leave
/// the actor looking for an event that is not coming yet.
pub fn expect_event(seen: u64) {
    WATCH_BASE.store(seen, Ordering::Release);
    WATCH_UNTIL_NS.store(
        now_ns().saturating_add(WATCH.as_nanos() as u64),
        Ordering::Release,
    );
    if let Some(actor) = ACTOR.get() {
        actor.unpark();
    }
}

/// How long the actor waits before it looks at its ring again.
fn next_look() -> Duration {
    let watching = now_ns() < WATCH_UNTIL_NS.load(Ordering::Acquire)
        && HANDLED.load(Ordering::Acquire) == WATCH_BASE.load(Ordering::Acquire);
    if watching {
        WATCH_POLL
    } else if crate::doorbell::listening() {
        SAFETY_POLL
    } else {
        POLL
    }
}

/// The Linux CPU number of `core`, from the `tandem.cores=` list.
fn cpu_of(cores: &[u64], core: u64) -> Option<usize> {
    cores.iter().position(|&c| c == core)
}

/// Takes Linux's CPU `cpu` online or offline through sysfs; every CPU the agent takes offline
/// or brings back goes through here (see [`crate::delegation::server::cpu_leaving`]). Nothing
/// here allocates but a failure's message: the actor runs at real-time priority, and musl's
/// allocator has one lock, which an ordinary thread of the agent (vmctl's answerer parsing the
/// status page) held while the actor preempted it, so the actor waited until Linux's CPU load
/// let that thread finish (about 5 ms under Bochs).
pub fn set_online(cpu: usize, online: bool) -> Result<(), String> {
    let mut text = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    write!(cursor, "/sys/devices/system/cpu/cpu{cpu}/online").map_err(|e| e.to_string())?;
    let len = cursor.position() as usize;
    // `fs::write` makes the C string of a short path on the stack.
    let path = Path::new(OsStr::from_bytes(&text[..len]));
    if !online {
        // The delegation server's pollers are pinned to their CPUs: one leaves this one first.
        crate::delegation::server::cpu_leaving(cpu);
    }
    let written = fs::write(path, if online { "1" } else { "0" });
    if online || written.is_err() {
        crate::delegation::server::cpu_back(cpu);
    }
    written.map_err(|e| format!("writing {}: {e}", path.display()))
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
    let _ = ACTOR.set(std::thread::current());
    crate::doorbell::also_wake(std::thread::current());
    loop {
        match control.next_event() {
            Ok(Some(HypervisorEvent::Guest(GuestEvent::Down { guest, state }))) => {
                crate::lavender_watch::peer_down(guest, state.name());
            }
            Ok(Some(HypervisorEvent::Core(event))) => {
                HANDLED.fetch_add(1, Ordering::AcqRel);
                let answer = match behaviour() {
                    Behaviour::Act => {
                        let taken_tsc = crate::exec::tsc_now();
                        let answer = act(&cores, event);
                        // Noted before the answer goes: the move, and so whoever waits for
                        // it, ends with the answer.
                        if let CoreEvent::Grant { .. } | CoreEvent::Revoke { .. } = event {
                            note_carried(Carried {
                                core: event.core().index() as u64,
                                online: matches!(event, CoreEvent::Grant { .. }),
                                ok: matches!(
                                    answer,
                                    CoreEvent::Online { .. } | CoreEvent::Released { .. }
                                ),
                                taken_tsc,
                                written_tsc: crate::exec::tsc_now(),
                            });
                        }
                        answer
                    }
                    Behaviour::Refuse => refuse(event),
                    Behaviour::Ignore => continue,
                };
                match control.send(answer) {
                    // The move waits for this answer: the monitor reads it at once rather than
                    // at its next pass.
                    Ok(()) => control.kick(),
                    Err(e) => report::emit(&report::error("control", &e, |_| {})),
                }
            }
            // An `unpark` from `expect_event` ends the wait early.
            Ok(None) => std::thread::park_timeout(next_look()),
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
    fn the_last_events_carried_out_are_kept_oldest_first_and_taken_once() {
        let _ = take_carried();
        for core in 0..(CARRIED_KEPT as u64 + 3) {
            note_carried(Carried {
                core,
                ..Carried::default()
            });
        }
        let cores: Vec<u64> = take_carried().iter().map(|c| c.core).collect();
        assert_eq!(cores, (3..CARRIED_KEPT as u64 + 3).collect::<Vec<_>>());
        assert!(take_carried().is_empty());
    }

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
