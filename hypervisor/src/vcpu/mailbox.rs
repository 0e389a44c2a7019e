//! Requests to a core that is parked in the hypervisor (prepare a vCPU, start a vCPU). The
//! sender writes the mailbox, then wakes the core with the wake IPI. A start carries the
//! generation of the grant it was made for: the core re-checks it with the core manager
//! before it enters, since the grant may have been withdrawn meanwhile.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use crate::arch::percpu::CPUS;

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

/// One core's mailbox, in its per-CPU block (`arch::percpu`).
pub struct Mailbox {
    kind: AtomicU8,
    guest: AtomicU8,
    vector: AtomicU8,
    generation: AtomicU32,
    /// The guest granted the core, plus one (0: none), whose vCPU to prepare.
    prepare: AtomicU8,
    /// The core polls the mailbox ([`poll_for_request`]): a start needs no wake-up IPI.
    polled: AtomicBool,
}

impl Mailbox {
    pub const fn new() -> Self {
        Self {
            kind: AtomicU8::new(EMPTY),
            guest: AtomicU8::new(0),
            vector: AtomicU8::new(0),
            generation: AtomicU32::new(0),
            prepare: AtomicU8::new(0),
            polled: AtomicBool::new(false),
        }
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Self::new()
    }
}

/// A request to start a vCPU of `guest` for its grant of `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartRequest {
    pub guest: u8,
    pub generation: u32,
    pub start: Start,
}

/// Asks parked CPU `core` to start a vCPU of `guest` for its grant of `generation`.
pub fn post_start(core: usize, guest: u8, generation: u32, start: Start) {
    let mailbox = &CPUS[core].mailbox;
    mailbox.guest.store(guest, Ordering::Relaxed);
    mailbox.generation.store(generation, Ordering::Relaxed);
    let kind = match start {
        Start::Entry64 => ENTRY64,
        Start::RealMode { vector } => {
            mailbox.vector.store(vector, Ordering::Relaxed);
            REAL_MODE
        }
    };
    // The guest and vector are visible before the kind that announces them; sequentially
    // consistent with the poller's flag (see [`needs_wake`]).
    mailbox.kind.store(kind, Ordering::SeqCst);
}

/// After [`post_start`]: whether CPU `core` must be woken (with the wake IPI) to see the
/// request. Not while it polls its mailbox: the IPI would only stay pending in its APIC
/// until taken, on the start's path. The poller clears its flag, then looks at the mailbox
/// once more, and the sender posts, then reads the flag, all sequentially consistent, so
/// that either the poller sees the request or the sender sees it no longer polls.
pub fn needs_wake(core: usize) -> bool {
    !CPUS[core].mailbox.polled.load(Ordering::SeqCst)
}

/// Polls the mailbox of CPU `core` (the calling core) until a request comes or the TSC
/// reaches `until`; whether one came. A start posted meanwhile sends no wake-up IPI.
pub fn poll_for_request(core: usize, until: u64) -> bool {
    let mailbox = &CPUS[core].mailbox;
    mailbox.polled.store(true, Ordering::SeqCst);
    let came = loop {
        if has_request(core) {
            break true;
        }
        if crate::arch::cpu::read_tsc() >= until {
            break false;
        }
        core::hint::spin_loop();
    };
    mailbox.polled.store(false, Ordering::SeqCst);
    came || mailbox.kind.load(Ordering::SeqCst) != EMPTY
}

/// Whether CPU `core` has a start or prepare request waiting.
pub fn has_request(core: usize) -> bool {
    let mailbox = &CPUS[core].mailbox;
    mailbox.kind.load(Ordering::Acquire) != EMPTY || mailbox.prepare.load(Ordering::Acquire) != 0
}

/// Takes the pending start request of CPU `core`, if any.
pub fn take_start(core: usize) -> Option<StartRequest> {
    let mailbox = &CPUS[core].mailbox;
    let start = match mailbox.kind.swap(EMPTY, Ordering::Acquire) {
        ENTRY64 => Start::Entry64,
        REAL_MODE => Start::RealMode {
            vector: mailbox.vector.load(Ordering::Relaxed),
        },
        _ => return None,
    };
    Some(StartRequest {
        guest: mailbox.guest.load(Ordering::Relaxed),
        generation: mailbox.generation.load(Ordering::Relaxed),
        start,
    })
}

/// Asks parked CPU `core` to prepare a vCPU of `guest` (it was granted to it), so that
/// the guest's STARTUP IPI finds it ready.
pub fn post_prepare(core: usize, guest: u8) {
    CPUS[core]
        .mailbox
        .prepare
        .store(guest.saturating_add(1), Ordering::Release);
}

/// Takes the pending prepare request of CPU `core`, if any.
pub fn take_prepare(core: usize) -> Option<u8> {
    CPUS[core]
        .mailbox
        .prepare
        .swap(0, Ordering::Acquire)
        .checked_sub(1)
}
