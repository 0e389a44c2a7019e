//! Interrupt vectors Lavender uses, and their handlers (exceptions are in `trap`).
//!
//! Handlers run with interrupts off on the interrupted thread's stack, so they may end by
//! switching to another thread ([`sched::preempt`]); the interrupted one resumes later from
//! that point and returns from the interrupt then.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::kernel::arch::apic;
use crate::kernel::{control, delegation, faults, sched};

/// The local APIC timer: the scheduler's tick.
pub const TIMER_VECTOR: u8 = 0x30;
/// Sent to a core to make it look at its run queue or its state again.
pub const RESCHEDULE_VECTOR: u8 = 0x31;
/// Spurious interrupts (SDM Vol. 3A §11.9): no EOI.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The timer period.
pub const TICK_US: u64 = 5_000;

static STRAY: AtomicU64 = AtomicU64::new(0);

/// Called by the IDT's common path for vectors 32..=255; `from_user`: the interrupt came from
/// user mode.
pub fn handle(vector: u8, from_user: bool) {
    match vector {
        SPURIOUS_VECTOR => return,
        TIMER_VECTOR => {
            apic::end_of_interrupt();
            faults::tick();
            sched::wake_sleepers();
            control::tick();
            // Linux's process commands, also while every core is busy.
            crate::kernel::delegation::poll_control();
        }
        RESCHEDULE_VECTOR => {
            apic::end_of_interrupt();
            // A core that left may have asked for this wake-up: note its release.
            control::note_releases();
        }
        vector if control::is_notification(vector) => {
            apic::end_of_interrupt();
            control::poll();
        }
        vector if delegation::is_doorbell(vector) => {
            apic::end_of_interrupt();
            delegation::doorbell_rang();
        }
        vector => {
            apic::end_of_interrupt();
            if STRAY.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("stray interrupt vector {vector:#x} (reported once)");
            }
            return;
        }
    }
    if from_user && faults::withholds_in_user_mode() {
        return;
    }
    sched::preempt();
}
