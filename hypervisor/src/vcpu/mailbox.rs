//! Requests to a core that is parked in the hypervisor (prepare a vCPU, start a vCPU), and
//! to a core running a vCPU (give the core back now). The sender writes the mailbox, then
//! wakes the core with an IPI (the wake vector when parked, an NMI when running a guest).

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::platform::MAX_CPUS;

/// How a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The guest's boot core: 64-bit mode at the guest's `EntryState`.
    Entry64,
    /// A core the guest started with INIT + STARTUP IPI: real mode at `vector << 12`
    /// (Intel SDM Vol. 3A §9.4.4.1).
    RealMode { vector: u8 },
}

const EMPTY: u8 = 0;
const ENTRY64: u8 = 1;
const REAL_MODE: u8 = 2;

struct Mailbox {
    kind: AtomicU8,
    guest: AtomicU8,
    vector: AtomicU8,
    /// The guest granted the core, plus one (0: none), whose vCPU to prepare.
    prepare: AtomicU8,
    force_release: AtomicBool,
}

static MAILBOXES: [Mailbox; MAX_CPUS] = [const {
    Mailbox {
        kind: AtomicU8::new(EMPTY),
        guest: AtomicU8::new(0),
        vector: AtomicU8::new(0),
        prepare: AtomicU8::new(0),
        force_release: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// Asks parked CPU `core` to start a vCPU of `guest`.
pub fn post_start(core: usize, guest: u8, start: Start) {
    let mailbox = &MAILBOXES[core];
    mailbox.guest.store(guest, Ordering::Relaxed);
    let kind = match start {
        Start::Entry64 => ENTRY64,
        Start::RealMode { vector } => {
            mailbox.vector.store(vector, Ordering::Relaxed);
            REAL_MODE
        }
    };
    // Release: the guest and vector are visible before the kind that announces them.
    mailbox.kind.store(kind, Ordering::Release);
}

/// Takes the pending start request of CPU `core`, if any.
pub fn take_start(core: usize) -> Option<(u8, Start)> {
    let mailbox = &MAILBOXES[core];
    let start = match mailbox.kind.swap(EMPTY, Ordering::Acquire) {
        ENTRY64 => Start::Entry64,
        REAL_MODE => Start::RealMode {
            vector: mailbox.vector.load(Ordering::Relaxed),
        },
        _ => return None,
    };
    Some((mailbox.guest.load(Ordering::Relaxed), start))
}

/// Asks parked CPU `core` to prepare a vCPU of `guest` (it was granted to it), so that
/// the guest's STARTUP IPI finds it ready.
pub fn post_prepare(core: usize, guest: u8) {
    MAILBOXES[core]
        .prepare
        .store(guest.saturating_add(1), Ordering::Release);
}

/// Takes the pending prepare request of CPU `core`, if any.
pub fn take_prepare(core: usize) -> Option<u8> {
    MAILBOXES[core]
        .prepare
        .swap(0, Ordering::Acquire)
        .checked_sub(1)
}

/// Asks the vCPU on CPU `core` to leave the core now (a missed release deadline).
pub fn post_force_release(core: usize) {
    MAILBOXES[core].force_release.store(true, Ordering::Release);
}

pub fn take_force_release(core: usize) -> bool {
    MAILBOXES[core].force_release.swap(false, Ordering::AcqRel)
}
