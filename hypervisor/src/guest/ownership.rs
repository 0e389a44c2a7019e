//! Who owns each physical core: a guest, or the hypervisor's pool (parked). The single
//! source of truth for IPI filtering and for `QUERY_CORE`.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::platform::MAX_CPUS;

const HYPERVISOR: u8 = u8::MAX;

static OWNER: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(HYPERVISOR) }; MAX_CPUS];

/// The guest id owning CPU `core`, or `None` when the hypervisor holds it.
pub fn owner(core: usize) -> Option<u8> {
    let owner = OWNER.get(core)?.load(Ordering::Acquire);
    (owner != HYPERVISOR).then_some(owner)
}

pub fn assign(core: usize, guest: Option<u8>) {
    OWNER[core].store(guest.unwrap_or(HYPERVISOR), Ordering::Release);
}

/// Bit mask of the cores guest `id` owns.
pub fn cores_of(id: u8) -> u64 {
    (0..MAX_CPUS)
        .filter(|c| owner(*c) == Some(id))
        .fold(0, |mask, c| mask | 1 << c)
}
