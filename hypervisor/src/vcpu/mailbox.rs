//! Requests to a core that is parked in the hypervisor (prepare a vCPU, start a vCPU). The
//! sender writes the mailbox, then wakes the core with the mailbox IPI if it sleeps
//! ([`wake`]; a core that polls or works sees the request at its next look). A start carries
//! the generation of the grant it was made for: the core re-checks it with the core manager
//! before it enters, since the grant may have been withdrawn meanwhile.

use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use crate::arch::descriptors::{self, MAILBOX_VECTOR};
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::cores::WakeFlag;

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
    /// Up while the core sleeps awaiting the mailbox IPI ([`sleep_until_request`]).
    asleep: WakeFlag,
}

impl Mailbox {
    pub const fn new() -> Self {
        Self {
            kind: AtomicU8::new(EMPTY),
            guest: AtomicU8::new(0),
            vector: AtomicU8::new(0),
            generation: AtomicU32::new(0),
            prepare: AtomicU8::new(0),
            asleep: WakeFlag::new(),
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
    // The guest and vector are visible before the kind that announces them.
    mailbox.kind.store(kind, Ordering::Release);
}

/// After a post to CPU `core`'s mailbox: wakes the core with the mailbox IPI if it sleeps,
/// or is about to. A core that polls or works is sent none: it sees the request at its next
/// look, with no interrupt left on its way to it.
pub fn wake(core: usize) {
    if CPUS[core].mailbox.asleep.take() {
        LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), MAILBOX_VECTOR);
    }
}

/// Halts CPU `core` (the calling core, interrupts disabled) until a request comes to its
/// mailbox, or an interrupt or NMI wakes it; returns with no mailbox IPI pending or on its
/// way. An IPI that a sender owes it (it took the flag) is waited for and ended here: it
/// reaches the core even when the core saw the request before the IPI came, and taken
/// later it would be delivered to the guest the core enters next.
pub fn sleep_until_request(core: usize) {
    let asleep = &CPUS[core].mailbox.asleep;
    asleep.raise();
    if !has_request(core) {
        descriptors::wait_for_wakeup();
    }
    if asleep.lower() {
        // The mailbox stub leaves its vector in service (it sends no EOI), so that its
        // in-service bit tells whether the IPI came (SDM Vol. 3A §11.8.4: the bit is set
        // when the interrupt is delivered to the processor, cleared by the EOI).
        let apic = LocalApic::X2Apic;
        while !apic.in_service(MAILBOX_VECTOR) {
            descriptors::wait_for_wakeup();
        }
        apic.end_of_interrupt();
    }
}

/// Polls the mailbox of CPU `core` (the calling core) until a request comes or the TSC
/// reaches `until`; whether one came. A request posted meanwhile sends no IPI (the core's
/// flag is down).
pub fn poll_for_request(core: usize, until: u64) -> bool {
    loop {
        if has_request(core) {
            return true;
        }
        if crate::arch::cpu::read_tsc() >= until {
            return false;
        }
        core::hint::spin_loop();
    }
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
