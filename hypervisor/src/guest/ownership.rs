//! Who owns each physical core and in which state of a move it is (docs/architecture.md,
//! "Moving cores"): `Owned` -> `Releasing` -> `Parked` -> `Granted` ->
//! `Owned`. The single source of truth for IPI filtering, INIT/SIPI emulation and
//! `QUERY_CORE`. Lock-free: any core reads, the transitions are single writes.

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use vmcall_proto::hypercall::CoreState;

use crate::platform::MAX_CPUS;

const HYPERVISOR: u8 = u8::MAX;

struct Slot {
    owner: AtomicU8,
    state: AtomicU8,
    /// An INIT IPI from the owner arrived; the next STARTUP IPI starts the vCPU.
    init_pending: AtomicBool,
}

static CORES: [Slot; MAX_CPUS] = [const {
    Slot {
        owner: AtomicU8::new(HYPERVISOR),
        state: AtomicU8::new(CoreState::Parked as u8),
        init_pending: AtomicBool::new(false),
    }
}; MAX_CPUS];

fn state_from(raw: u8) -> CoreState {
    match raw {
        1 => CoreState::Owned,
        2 => CoreState::Releasing,
        4 => CoreState::Granted,
        _ => CoreState::Parked,
    }
}

/// The guest id owning CPU `core`, or `None` when the hypervisor holds it (parked).
pub fn owner(core: usize) -> Option<u8> {
    let owner = CORES.get(core)?.owner.load(Ordering::Acquire);
    (owner != HYPERVISOR).then_some(owner)
}

pub fn state(core: usize) -> CoreState {
    CORES.get(core).map_or(CoreState::Parked, |s| {
        state_from(s.state.load(Ordering::Acquire))
    })
}

/// Moves CPU `core` to `state` for `guest` (`None` only with `Parked`).
pub fn set(core: usize, guest: Option<u8>, state: CoreState) {
    let slot = &CORES[core];
    slot.owner
        .store(guest.unwrap_or(HYPERVISOR), Ordering::Release);
    slot.state.store(state as u8, Ordering::Release);
    if state == CoreState::Parked {
        slot.init_pending.store(false, Ordering::Release);
    }
}

/// Records an INIT IPI to `core` (emulated: the core is not actually reset).
pub fn note_init(core: usize) {
    CORES[core].init_pending.store(true, Ordering::Release);
}

/// Consumes a pending INIT: true if a STARTUP IPI may now start the core.
pub fn take_init(core: usize) -> bool {
    CORES[core].init_pending.swap(false, Ordering::AcqRel)
}

/// Bit mask of the cores guest `id` owns or is being granted.
pub fn cores_of(id: u8) -> u64 {
    (0..MAX_CPUS)
        .filter(|c| owner(*c) == Some(id))
        .fold(0, |mask, c| mask | 1 << c)
}

/// The lowest core guest `id` runs on (`Owned`), where notifications are delivered.
pub fn first_online(id: u8) -> Option<usize> {
    (0..MAX_CPUS).find(|c| owner(*c) == Some(id) && state(*c) == CoreState::Owned)
}
