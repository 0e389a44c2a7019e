//! What the hypervisor does on its own when a guest misbehaves, so the rest of the machine
//! goes on: a core whose guest missed the release deadline is taken by force, the registers
//! its vCPU had are kept for the guest, and the guest is told; a guest that stopped (a crash, a violation, a reset, a hang) or halted is reported
//! once all its cores are back in the pool, and the guests it shares a region with are told;
//! the hang watchdog stops a guest whose control channel falls silent
//! past its configured deadline (`watchdog_ms`). Runs on the BSP, from its monitor loop and
//! from the clients of the core manager that force releases (the core test, `moves`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use heapless::Vec;
use log::{error, warn};
use spin::Mutex;
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{CoreState, ForcedState};
use vmcall_proto::message::{CoreEvent, DownState, GuestEvent};

use crate::arch::cpu;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::cores::{Requester, Stage, CORES};
use crate::guest::{self, Guest, GuestState};
use crate::partition::MAX_GUESTS;
use crate::platform::MAX_CPUS;
use crate::watchdog::{self, Heartbeats};
use crate::{console, time, vcpu};

static HEARTBEATS: Heartbeats<MAX_GUESTS> = Heartbeats::new();
/// Cores taken by force from each guest, ever.
static FORCED: [AtomicU64; MAX_GUESTS] = [const { AtomicU64::new(0) }; MAX_GUESTS];
/// The registers each core's vCPU had when it was last taken by force, and whose they are,
/// until that guest reads them (`FORCED_STATE`). Written by the forced core as it leaves the
/// guest, read by a vCPU of the same guest.
static FORCED_STATES: [Mutex<Option<(u8, ForcedState)>>; MAX_CPUS] =
    [const { Mutex::new(None) }; MAX_CPUS];
/// Whether each guest's `guest_down` was printed.
static DOWN_REPORTED: [AtomicBool; MAX_GUESTS] = [const { AtomicBool::new(false) }; MAX_GUESTS];

/// The release deadline of `core` passed while `guest` still runs there: the core manager
/// marks it (its vCPU checks the mark before every VM entry) and an NMI makes the vCPU exit
/// now, whatever the guest does (even spinning with interrupts off). `false` if the core is
/// not `guest`'s to take (it parked meanwhile).
pub fn force(guest: &Guest, core: usize, by: Requester) -> bool {
    let forced = CORES.force(core, guest.id, by).is_ok();
    if forced {
        crate::vcpu::send_to_vcpu(core, guest.id, || {
            LocalApic::X2Apic.send_nmi(CPUS[core].apic_id())
        });
    }
    forced
}

/// `core`, taken from `guest` by [`force`], is parked: counts it, reports it (`core_forced`)
/// and tells the guest (`CoreEvent::Taken` on its control channel), so that it stops counting
/// on the core and picks up what its kernel left queued there. The core's clean-up ran (or
/// runs) on the core itself before it can serve anyone else.
pub fn taken(guest: &Guest, core: usize, deadline_us: u32) {
    let count = FORCED[usize::from(guest.id)].fetch_add(1, Ordering::Relaxed) + 1;
    let record = CORES.record(core);
    let revoke_to_parked_us = record.map_or(0, |r| {
        time::us_for_ticks(r.between(Stage::Revoked, Stage::Parked))
    });
    let parked = CORES.state(core) == CoreState::Parked;
    warn!(
        "guest '{}' missed the release deadline of cpu{core} ({deadline_us} us): taken by force ({count} so far)",
        guest.name()
    );
    console::marker("core_forced", |o| {
        o.str("guest", guest.name())
            .u64("cpu", core as u64)
            .u64("deadline_us", deadline_us.into())
            .u64("revoke_to_parked_us", revoke_to_parked_us)
            .bool("parked", parked)
            .u64("forced_total", count);
    });
    let Some(control) = &guest.control else {
        return;
    };
    let Some(id) = CoreId::new(core as u64) else {
        return;
    };
    if let Err(e) = control.send(CoreEvent::Taken { core: id }) {
        warn!(
            "cannot tell '{}' that cpu{core} was taken: {e}",
            guest.name()
        );
        return;
    }
    vcpu::doorbell::wake_for_control(guest, CORES.first_owned(guest.id));
}

/// The vCPU of guest `guest` on `core` is leaving it by force with these registers: they are
/// kept for the guest, replacing any it did not read, so it can resume the thread that ran
/// there ([`hand_over_forced_state`]). Runs on `core`, before it parks.
pub fn keep_forced_state(guest: u8, core: usize, state: ForcedState) {
    if let Some(slot) = FORCED_STATES.get(core) {
        *slot.lock() = Some((guest, state));
    }
}

/// Gives guest `guest` the registers kept for `core` if they are its own: `deliver` copies
/// them to the guest, and on success they are forgotten (each is read once). `None` when
/// nothing of this guest is kept for the core; a failed `deliver` keeps them.
pub fn hand_over_forced_state<E>(
    guest: u8,
    core: usize,
    deliver: impl FnOnce(&ForcedState) -> Result<(), E>,
) -> Option<Result<(), E>> {
    let mut kept = FORCED_STATES.get(core)?.lock();
    let (owner, state) = kept.as_ref()?;
    if *owner != guest {
        return None;
    }
    let delivered = deliver(state);
    if delivered.is_ok() {
        *kept = None;
    }
    Some(delivered)
}

/// How many cores were taken from guest `id` by force.
pub fn forced_count(id: u8) -> u64 {
    FORCED
        .get(usize::from(id))
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Guest `id`'s control channel carried a heartbeat (a load report).
pub fn heartbeat(id: u8) {
    HEARTBEATS.beat(usize::from(id), cpu::read_tsc());
}

/// How often the BSP must look at the guests for their watchdogs (ms), if any has one: its
/// monitor loop arms its timer for this.
pub fn check_period_ms() -> Option<u32> {
    guest::all()
        .iter()
        .filter_map(|g| g.config.watchdog_ms)
        .map(watchdog::check_period_ms)
        .min()
}

/// The BSP's look at the guests: stops a running guest whose watchdog expired, and reports a
/// stopped or halted guest once every core it held is back in the pool.
pub fn poll() {
    for guest in guest::all() {
        match guest.state() {
            GuestState::Running => check_watchdog(guest),
            state => report_down(guest, state),
        }
    }
}

fn check_watchdog(guest: &'static Guest) {
    let Some(ms) = guest.config.watchdog_ms else {
        return;
    };
    let deadline = time::ticks_for_us(u64::from(ms) * 1000);
    let now = cpu::read_tsc();
    let Some(silent) = HEARTBEATS.overdue(usize::from(guest.id), now, deadline) else {
        return;
    };
    let silent_ms = silent / (time::tsc_hz() / 1000).max(1);
    error!(
        "guest '{}' hung: no heartbeat on its control channel for {silent_ms} ms (watchdog {ms} ms); stopping it",
        guest.name()
    );
    console::marker("guest_hung", |o| {
        o.str("guest", guest.name())
            .u64("watchdog_ms", ms.into())
            .u64("silent_ms", silent_ms)
            .u64("check_period_ms", watchdog::check_period_ms(ms).into())
            .u64("tsc", now);
    });
    console::marker("guest_stopped", |o| {
        o.str("guest", guest.name()).str("code", "hung").display(
            "detail",
            &format_args!("no heartbeat for {silent_ms} ms (watchdog {ms} ms)"),
        );
    });
    guest.set_state(GuestState::Stopped);
    // Every core of the guest leaves at once: a hung core may spin with interrupts off,
    // which only an NMI interrupts.
    vcpu::kick_out(guest, usize::MAX);
}

fn report_down(guest: &Guest, state: GuestState) {
    let id = usize::from(guest.id);
    if DOWN_REPORTED[id].load(Ordering::Relaxed) || CORES.cores_of(guest.id) != 0 {
        return;
    }
    DOWN_REPORTED[id].store(true, Ordering::Relaxed);
    let allowed = guest.config.allowed_cores;
    let in_pool = allowed
        .iter()
        .map(|c| c.index())
        .filter(|&c| CORES.state(c) == CoreState::Parked && CORES.owner(c).is_none());
    let state = if state == GuestState::Halted {
        DownState::Halted
    } else {
        DownState::Stopped
    };
    let told = tell_peers(guest, state);
    console::marker("guest_down", |o| {
        o.str("guest", guest.name())
            .str("state", state.name())
            .array("cores_in_pool", |a| {
                for core in in_pool {
                    a.u64(core as u64);
                }
            })
            .u64("forced_releases", forced_count(guest.id))
            .array("peers_told", |a| {
                for name in &told {
                    a.str(name);
                }
            });
    });
}

/// Tells every running guest that shares a region with `guest`, now down with every core
/// back in the pool, that it is (`GuestEvent::Down` on the peer's ring 0; Lavender also gets
/// the control interrupt): whatever the peer waits for from it through their region will never
/// come, and the peer can fail it now. The names of the peers told.
fn tell_peers(guest: &Guest, state: DownState) -> Vec<&'static str, MAX_GUESTS> {
    let mut told = Vec::new();
    let running_peers = guest
        .peers
        .iter()
        .filter_map(|&id| guest::by_id(id))
        .filter(|peer| peer.state() == GuestState::Running);
    for peer in running_peers {
        let Some(control) = &peer.control else {
            continue;
        };
        let event = GuestEvent::Down {
            guest: guest.id.into(),
            state,
        };
        if let Err(e) = control.send(event) {
            warn!(
                "cannot tell '{}' that '{}' is down: {e}",
                peer.name(),
                guest.name()
            );
            continue;
        }
        vcpu::doorbell::wake_for_control(peer, CORES.first_owned(peer.id));
        let _ = told.push(peer.name());
    }
    told
}
