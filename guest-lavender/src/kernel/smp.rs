//! Cores coming and going: bring-up of a granted core (a STARTUP IPI into the trampoline, per-core
//! set-up, joining the scheduler) and teardown of a revoked one (no new threads, migrate the
//! rest, quiesce the timer, release by hypercall on the core itself).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use guest_lavender::descriptors::MAX_CORE_SLOTS;
use guest_lavender::trampoline;
use log::{debug, error, warn};
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::Wake;

use crate::kernel::arch::context::Stack;
use crate::kernel::arch::{self, apic, traces};
use crate::kernel::interrupts::{RESCHEDULE_VECTOR, SPURIOUS_VECTOR, TICK_US, TIMER_VECTOR};
use crate::kernel::sched;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, control, faults, time};

/// The first stack of a started core (its idle loop and interrupt handling while idle).
const IDLE_STACK_BYTES: usize = 32 * 1024;
/// No bring-up in flight.
const NONE: usize = usize::MAX;

/// The trampoline page, chosen and made executable at boot; 0 when bring-up is unavailable.
static TRAMPOLINE_PAGE: AtomicU64 = AtomicU64::new(0);
/// The slot whose core is running the trampoline: one bring-up at a time, because every core
/// starts from the same page and reads its parameters from it.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(NONE);
/// TSC when the grant of the core in each slot arrived (`lavender_core_online`'s start).
static GRANTED_AT: [AtomicU64; MAX_CORE_SLOTS] = [const { AtomicU64::new(0) }; MAX_CORE_SLOTS];
/// TSC when the STARTUP IPI to the core in each slot was sent.
static STARTUP_SENT_AT: [AtomicU64; MAX_CORE_SLOTS] = [const { AtomicU64::new(0) }; MAX_CORE_SLOTS];
/// TSC when the revoke of the core in each slot arrived, when that core entered `leave`, and
/// when it made its release hypercall; and how many threads it handed off. The leaving core
/// only stores them: another core composes its marker later ([`note_released`]).
static REVOKED_AT: [AtomicU64; MAX_CORE_SLOTS] = [const { AtomicU64::new(0) }; MAX_CORE_SLOTS];
static LEFT_AT: [AtomicU64; MAX_CORE_SLOTS] = [const { AtomicU64::new(0) }; MAX_CORE_SLOTS];
static RELEASING_AT: [AtomicU64; MAX_CORE_SLOTS] = [const { AtomicU64::new(0) }; MAX_CORE_SLOTS];
static MIGRATED_AT_LEAVE: [AtomicUsize; MAX_CORE_SLOTS] =
    [const { AtomicUsize::new(0) }; MAX_CORE_SLOTS];
/// Each slot's idle stack and the core that last ran on it, kept while that core runs in the
/// slot and after it leaves: its next start in the slot reuses the stack (no allocation, no
/// zeroing on the bring-up path). The hypervisor grants parked cores only, so that core has
/// stopped using the stack by then; a different core gets a fresh one, since the last one may
/// still be finishing its release on it.
static IDLE_STACKS: [IrqMutex<Option<(CoreId, Stack)>>; MAX_CORE_SLOTS] =
    [const { IrqMutex::new(None) }; MAX_CORE_SLOTS];
/// Idle stacks made at boot, one per core Lavender may be granted: a core's first bring-up
/// takes one instead of allocating and zeroing 32 KiB on the way (about 200 µs under Bochs).
static SPARE_IDLE_STACKS: IrqMutex<Vec<Stack>> = IrqMutex::new(Vec::new());

/// A marker of a core that came or went, printed later by any core's timer tick: a console
/// line costs milliseconds of virtual time under Bochs (a serial line), which must not delay
/// a bring-up or eat into a release deadline.
enum Deferred {
    /// TSC values, made into microseconds only when printed (a 128-bit division is
    /// dozens of instructions, which the started core would spend before its first thread).
    Online {
        core: CoreId,
        slot: usize,
        /// The grant was handled.
        granted_at: u64,
        /// The STARTUP IPI was sent (the boot core's preparation).
        startup_sent_at: u64,
        /// The core reached its Rust entry (STARTUP, the trampoline).
        checked_in_at: u64,
        thread: bool,
        /// The first pass of the core's scheduler (when `thread`, its first thread started
        /// then): the hypervisor's grant time pairs with it.
        first_pass_tsc: u64,
    },
    /// What a started core held on arrival (`test=inherit`).
    Arrived {
        core: CoreId,
        registers: traces::Registers,
        tpr: u64,
        lvt_timer: u64,
        tsc_deadline: u64,
    },
    /// TSC values, made into microseconds only when printed.
    Released {
        core: CoreId,
        slot: usize,
        revoked_at: u64,
        /// The leaving core entered `leave`.
        left_at: u64,
        /// The leaving core made its release hypercall.
        releasing_at: u64,
        migrated: usize,
    },
}

static DEFERRED: IrqMutex<VecDeque<Deferred>> = IrqMutex::new(VecDeque::new());
/// Room reserved in `DEFERRED` at boot, so a core on its way in or out does not allocate.
const DEFERRED_MARKERS: usize = 256;

/// Prints the markers cores left for later (see [`Deferred`]).
pub fn print_deferred_markers() {
    loop {
        let Some(next) = DEFERRED.lock().pop_front() else {
            return;
        };
        match next {
            Deferred::Online {
                core,
                slot,
                granted_at,
                startup_sent_at,
                checked_in_at,
                thread,
                first_pass_tsc,
            } => console::marker("lavender_core_online", |o| {
                let since_grant = |at: u64| time::ticks_to_us(at.wrapping_sub(granted_at));
                let prepare_us = since_grant(startup_sent_at);
                let checkin_us = since_grant(checked_in_at);
                let bringup_us = since_grant(first_pass_tsc);
                o.u64("core", core.index() as u64)
                    .u64("slot", slot as u64)
                    .u64("prepare_us", prepare_us)
                    .u64("checkin_us", checkin_us)
                    .u64("bringup_us", bringup_us)
                    .bool("thread", thread)
                    .u64("first_pass_tsc", first_pass_tsc);
            }),
            Deferred::Arrived {
                core,
                registers,
                tpr,
                lvt_timer,
                tsc_deadline,
            } => console::marker("core_arrival_state", |o| {
                o.u64("core", core.index() as u64)
                    .u64("tpr", tpr)
                    .hex("lvt_timer", lvt_timer)
                    .u64("tsc_deadline", tsc_deadline)
                    .hex("cr2", registers.cr2);
                o.array("xmm", |a| {
                    for value in registers.xmm {
                        a.u64(value);
                    }
                });
                o.array("dr", |a| {
                    for value in registers.dr {
                        a.u64(value);
                    }
                });
            }),
            Deferred::Released {
                core,
                slot,
                revoked_at,
                left_at,
                releasing_at,
                migrated,
            } => console::marker("lavender_core_released", |o| {
                let leave_us = time::ticks_to_us(left_at.wrapping_sub(revoked_at));
                let release_us = time::ticks_to_us(releasing_at.wrapping_sub(revoked_at));
                o.u64("core", core.index() as u64)
                    .u64("slot", slot as u64)
                    .u64("leave_us", leave_us)
                    .u64("release_us", release_us)
                    .u64("migrated", migrated as u64);
            }),
        }
    }
}

/// Chooses the trampoline page among `usable` ranges below 1 MiB. Called at boot, before the
/// frame allocator hands anything out; the caller reserves the page.
pub fn choose_trampoline_page(usable: impl IntoIterator<Item = (u64, u64)>) -> Option<u64> {
    trampoline::choose_page(usable)
}

/// Makes the reserved page the trampoline page (after Lavender's page tables are active).
pub fn set_trampoline_page(page: u64) {
    match arch::trampoline::prepare_page(page) {
        Ok(()) => TRAMPOLINE_PAGE.store(page, Ordering::Relaxed),
        Err(problem) => error!("AP trampoline page {page:#x} unusable: {problem}"),
    }
}

/// Waits up to `timeout_us` for a started core that has not reached its Rust entry yet (the
/// trampoline is in use) to get there. `true` when no bring-up is in flight (any more).
pub fn wait_for_bring_up(timeout_us: u64) -> bool {
    let deadline = time::now() + time::us_to_ticks(timeout_us);
    while IN_FLIGHT.load(Ordering::Acquire) != NONE {
        if time::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Starts `core` in `slot`: idle stack, trampoline set up for it, STARTUP.
pub fn bring_up(core: CoreId, slot: usize, granted_at: u64) -> bool {
    let page = TRAMPOLINE_PAGE.load(Ordering::Relaxed);
    let Some(vector) = trampoline::startup_vector(page) else {
        error!("{core}: cannot start, no AP trampoline page");
        return false;
    };
    let top = {
        let mut idle = IDLE_STACKS[slot].lock();
        match &*idle {
            Some((last, stack)) if *last == core => stack.top(),
            _ => {
                let spare = SPARE_IDLE_STACKS.lock().pop();
                let stack = spare.unwrap_or_else(|| Stack::new(IDLE_STACK_BYTES));
                let top = stack.top();
                *idle = Some((core, stack));
                top
            }
        }
    };
    if let Err(problem) = arch::trampoline::install(page, slot, top) {
        error!("{core}: cannot install the AP trampoline: {problem}");
        return false;
    }
    GRANTED_AT[slot].store(granted_at, Ordering::Relaxed);
    sched::prepare_slot(slot, core.index() as u32, top);
    IN_FLIGHT.store(slot, Ordering::Release);
    // A core the hypervisor grants is an application processor awaiting a STARTUP IPI, as
    // after reset (SDM Vol. 3A §9.4): the STARTUP alone starts it, with no INIT before it
    // and none of the MP protocol's delays (§9.4.4.1). A second STARTUP follows only if the
    // core is silent (`control::tick`).
    apic::send_startup(core.index() as u32, vector);
    STARTUP_SENT_AT[slot].store(time::now(), Ordering::Relaxed);
    true
}

/// A second STARTUP to a core that has not checked in.
pub fn resend_startup(core: CoreId) {
    if let Some(vector) = trampoline::startup_vector(TRAMPOLINE_PAGE.load(Ordering::Relaxed)) {
        debug!("{core}: no check-in yet, second STARTUP");
        apic::send_startup(core.index() as u32, vector);
    }
}

/// How many cores Lavender may ever hold (its partition's allowed set).
static CORES_ALLOWED: AtomicUsize = AtomicUsize::new(1);

/// How many cores Lavender may ever hold: the most a process may be limited to.
pub fn cores_allowed() -> usize {
    CORES_ALLOWED.load(Ordering::Relaxed)
}

/// Sets up the boot core's slot 0 and starts its timer (its APIC is enabled already: see
/// [`enable_apic`]).
pub fn init_boot_core(core: CoreId, cores_allowed: usize) {
    CORES_ALLOWED.store(cores_allowed, Ordering::Relaxed);
    sched::init();
    SPARE_IDLE_STACKS
        .lock()
        .extend((1..cores_allowed).map(|_| Stack::new(IDLE_STACK_BYTES)));
    // Markers wait for an idle loop; a busy Lavender may see many moves before it has one.
    DEFERRED.lock().reserve(DEFERRED_MARKERS);
    // The hypervisor makes every core's x2APIC ID its core index, which Lavender relies on to
    // address IPIs. Checked once here: the read exits to the hypervisor, which a started core
    // cannot afford on its bring-up path.
    if apic::id() != core.index() as u32 {
        warn!("{core}: x2APIC ID reads {}, not the core index", apic::id());
    }
    // The boot stack's top is not known here: the boot core leaves through its idle loop.
    sched::prepare_slot(0, core.index() as u32, 0);
    sched::join(0);
    apic::start_periodic_timer(TIMER_VECTOR, time::apic_ticks_for_us(TICK_US));
}

/// Software-enables this core's local APIC and ends interrupts left in service in it.
pub fn enable_apic(core: CoreId) {
    let stale = apic::enable(SPURIOUS_VECTOR);
    if stale > 0 {
        warn!("{core}: ended {stale} interrupt(s) left in service in its local APIC");
    }
}

/// Whether started cores report what they hold on arrival (`test=inherit`).
static REPORT_ARRIVALS: AtomicBool = AtomicBool::new(false);

/// Has every core started from now on report its state on arrival.
pub fn report_arrivals() {
    REPORT_ARRIVALS.store(true, Ordering::Relaxed);
}

/// The Rust entry of a started core, on its idle stack, interrupts off.
pub fn ap_main(slot: usize) -> ! {
    // Read first, before this kernel sets anything of its own on the core.
    let arrival = REPORT_ARRIVALS
        .load(Ordering::Relaxed)
        .then(|| (traces::read(), apic::arrival_state()));
    let checked_in_at = time::now();
    arch::gdt::load(slot);
    arch::idt::load();
    arch::user::init_core(slot);
    IN_FLIGHT.store(NONE, Ordering::Release);
    let index = sched::core_of(slot);
    let core = CoreId::new(u64::from(index)).unwrap_or(CoreId::ZERO);
    if let Some((registers, (tpr, lvt_timer, tsc_deadline))) = arrival {
        DEFERRED.lock().push_back(Deferred::Arrived {
            core,
            registers,
            tpr,
            lvt_timer,
            tsc_deadline,
        });
    }
    enable_apic(core);
    sched::join(slot);
    control::checked_in(core);
    apic::start_periodic_timer(TIMER_VECTOR, time::apic_ticks_for_us(TICK_US));
    control::online(core);
    sched::idle_loop(slot, |thread| {
        let first_pass_tsc = time::now();
        DEFERRED.lock().push_back(Deferred::Online {
            core,
            slot,
            granted_at: GRANTED_AT[slot].load(Ordering::Relaxed),
            startup_sent_at: STARTUP_SENT_AT[slot].load(Ordering::Relaxed),
            checked_in_at,
            thread,
            first_pass_tsc,
        });
    })
}

/// The core that left `slot` is (about to be) back with the hypervisor: queues its
/// `lavender_core_released` marker from what it noted on its way out.
pub fn note_released(slot: usize, core: CoreId) {
    DEFERRED.lock().push_back(Deferred::Released {
        core,
        slot,
        revoked_at: REVOKED_AT[slot].load(Ordering::Relaxed),
        left_at: LEFT_AT[slot].load(Ordering::Relaxed),
        releasing_at: RELEASING_AT[slot].load(Ordering::Relaxed),
        migrated: MIGRATED_AT_LEAVE[slot].load(Ordering::Relaxed),
    });
}

/// Records when the revoke of the core in `slot` arrived.
pub fn revoke_received(slot: usize, at: u64) {
    REVOKED_AT[slot].store(at, Ordering::Relaxed);
}

/// The leaving core in `slot`, with interrupts off, in its idle loop or on its way out of
/// `running` (the thread it stopped to leave): quiesce, migrate, release. Does not return.
/// What is not needed for the release itself (the core table, the `Released` event, the
/// marker) is left to the cores that stay ([`control::released`]).
pub fn leave(slot: usize, running: Option<sched::ThreadId>) -> ! {
    LEFT_AT[slot].store(time::now(), Ordering::Relaxed);
    apic::stop_timer();
    let (migrated, wake) = sched::close_for_leave(slot, running);
    // Nothing sends this core interrupts any more (it takes no threads, its timer is stopped):
    // let the ones already pending arrive now, while Lavender's handlers can end them, rather
    // than in the hypervisor after the release.
    arch::cpu::accept_pending_interrupts();
    let core = CoreId::new(u64::from(sched::core_of(slot))).unwrap_or(CoreId::ZERO);
    // The hypervisor wakes another core, which notes the release and takes the threads,
    // after taking this one back.
    let wake = wake.and_then(|index| {
        Some(Wake {
            core: CoreId::new(u64::from(index))?,
            vector: RESCHEDULE_VECTOR,
        })
    });
    MIGRATED_AT_LEAVE[slot].store(migrated, Ordering::Relaxed);
    RELEASING_AT[slot].store(time::now(), Ordering::Relaxed);
    if faults::withholds_release(core) {
        faults::withhold_release(core, migrated);
    }
    control::released(slot);
    let failure = arch::hypercall::release_this_core(core, wake);
    // Only a refusal returns. The core is out of Lavender's scheduling for good now.
    error!("{core}: CoreRelease refused: {failure:?}; the core halts");
    console::marker("lavender_core_release_failed", |o| {
        o.u64("core", core.index() as u64)
            .display("error", &format_args!("{failure:?}"));
    });
    arch::cpu::halt_forever()
}
