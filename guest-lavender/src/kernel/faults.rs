//! Faults Lavender causes on purpose when its command line asks (`ignore_revoke=`, `fault=`),
//! so the tests can show the hypervisor contains them: a core that never gives itself back, a
//! crash, a hang. Without those words nothing here ever acts.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use guest_lavender::cmdline::{FaultKind, FaultPlan};
use log::warn;
use vmcall_proto::cores::CoreId;

use crate::kernel::arch::{self, apic};
use crate::kernel::{console, sched, time};

/// The core that withholds its release (`ignore_revoke=`); `u32::MAX`: none.
static WITHHOLDING_CORE: AtomicU32 = AtomicU32::new(u32::MAX);
/// The `fault=` kind (0: none, 1: triple fault, 2: hang, 3: panic) and when it strikes (TSC).
static FAULT: AtomicU8 = AtomicU8::new(0);
static FAULT_AT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Set by the first core that strikes, which reports the fault.
static STRUCK: AtomicBool = AtomicBool::new(false);

/// Arms the faults the command line asks for; `fault=` counts from now (the scheduler's start).
pub fn arm(ignore_revoke: Option<u32>, fault: Option<FaultPlan>) {
    if let Some(core) = ignore_revoke {
        WITHHOLDING_CORE.store(core, Ordering::Relaxed);
        warn!("fault test: core {core} will never release itself when revoked");
    }
    if let Some(plan) = fault {
        let at = time::now().saturating_add(time::us_to_ticks(plan.after_ms.saturating_mul(1000)));
        FAULT_AT.store(at, Ordering::Relaxed);
        FAULT.store(
            match plan.kind {
                FaultKind::TripleFault => 1,
                FaultKind::Hang => 2,
                FaultKind::Panic => 3,
            },
            Ordering::Release,
        );
        warn!("fault test: {} in {} ms", plan.kind.as_str(), plan.after_ms);
    }
}

/// Whether `core` withholds its release (`ignore_revoke=`).
pub fn withholds_release(core: CoreId) -> bool {
    WITHHOLDING_CORE.load(Ordering::Relaxed) == core.index() as u32
}

/// Set once the withholding core's current revoke was reported (`lavender_release_withheld`),
/// until the core is taken.
static WITHHELD_REPORTED: AtomicBool = AtomicBool::new(false);

/// Reports the withheld release of `core` (once per revoke): `thread_running` when it keeps
/// running a user thread, `threads_left` the threads queued on it.
fn report_withheld(core: CoreId, thread_running: bool, threads_left: usize) {
    if WITHHELD_REPORTED.swap(true, Ordering::AcqRel) {
        return;
    }
    console::marker("lavender_release_withheld", |o| {
        o.u64("core", core.index() as u64)
            .bool("thread_running", thread_running)
            .u64("threads_left", threads_left as u64)
            .u64("tsc", time::now());
    });
}

/// The revoked `core` has left the scheduler (its threads are in its closed run queue) and
/// should now hand itself back; it never does: it spins with interrupts off until the
/// hypervisor takes it by force, and Lavender hears of that as `Taken`.
pub fn withhold_release(core: CoreId, threads_left: usize) -> ! {
    report_withheld(core, false, threads_left);
    arch::cpu::spin_forever()
}

/// From an interrupt that came from user mode, before it preempts: whether this core withholds
/// its release (it was revoked, and is the `ignore_revoke=` core) and so goes back to the user
/// thread it interrupted instead, with its timer stopped, taking no other thread, until the
/// hypervisor takes it by force with that thread running. (From the kernel, or idle, it leaves
/// the scheduler as any revoked core does and spins once out: [`withhold_release`].)
pub fn withholds_in_user_mode() -> bool {
    // Without `ignore_revoke=` no core withholds: one load, on every interrupt from user mode
    // (among them the revoke a leaving core acts on).
    if WITHHOLDING_CORE.load(Ordering::Relaxed) == u32::MAX {
        return false;
    }
    let slot = sched::current_slot();
    if sched::slot_state(slot) != sched::SlotState::Draining {
        return false;
    }
    let Some(core) = CoreId::new(u64::from(sched::core_of(slot))) else {
        return false;
    };
    if !withholds_release(core) {
        return false;
    }
    apic::stop_timer();
    report_withheld(core, true, sched::queued(slot));
    true
}

/// `core` was taken by force: its next revoke is reported again.
pub fn core_taken(core: CoreId) {
    if withholds_release(core) {
        WITHHELD_REPORTED.store(false, Ordering::Release);
    }
}

/// From every core's timer tick: strikes once the `fault=` time has come.
pub fn tick() {
    let kind = FAULT.load(Ordering::Acquire);
    if kind == 0 || time::now() < FAULT_AT.load(Ordering::Relaxed) {
        return;
    }
    let name = match kind {
        1 => "triple_fault",
        2 => "hang",
        _ => "panic",
    };
    let first = !STRUCK.swap(true, Ordering::AcqRel);
    let core = crate::kernel::sched::current_core();
    if first {
        // Written in place: after this, no core flushes the console queue.
        console::emergency_marker("lavender_fault", |o| {
            o.str("kind", name)
                .u64("core", u64::from(core))
                .u64("tsc", time::now());
        });
    }
    match kind {
        1 => arch::cpu::triple_fault(),
        2 => arch::cpu::spin_forever(),
        // One core panics; the others run on until the hypervisor stops the guest.
        _ if first => panic!("fault test: core {core} panics on purpose"),
        _ => {}
    }
}
