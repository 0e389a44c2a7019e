//! The SMP scheduler: threads (kernel threads, and user threads of processes), one run queue
//! per core, preemption by the timer, work stealing, migration off a leaving core, blocking on
//! latches and sleeping.
//!
//! A user thread is a kernel thread that entered ring 3 and belongs to a process: switching to
//! it also switches CR3 to its process's address space and points the core's kernel-entry
//! stack (TSS.RSP0 and the `SYSCALL` scratch block) at its kernel stack; switching to a kernel
//! thread or the idle loop switches CR3 back to the kernel's root, so a process's tables are
//! in no core's CR3 once its last thread has switched out. An exited user thread that can be
//! joined stays a "zombie" (its stack freed, its control block kept) until it is joined or its
//! process ends, so its id is not reused under a joiner.
//!
//! Threads live in a fixed table of control blocks ([`MAX_THREADS`]); queues hold their
//! indices. A thread that stops running is handled by the code that runs next on its core,
//! after the switch ([`finish_switch`]): only then is its context saved, so only then may it be
//! queued where another core could pick it up, be parked on a latch, or have its stack freed.
//! The policy (where a thread goes, whom to steal from) is [`guest_lavender::placement`].
//!
//! Every lock here is an [`IrqMutex`]; scheduling itself always runs with interrupts off.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use guest_lavender::descriptors::{slot_of_tss_selector, MAX_CORE_SLOTS};
use guest_lavender::forced_thread;
use guest_lavender::load::UsableThreads;
use guest_lavender::placement::{self, CoreLoad};
use vmcall_proto::hypercall::ForcedState;
use x86_64::instructions::interrupts;

use crate::kernel::arch::context::{self, Context, Stack};
use crate::kernel::arch::{address_space, apic, cpu, user};
use crate::kernel::interrupts::RESCHEDULE_VECTOR;
use crate::kernel::process::Process;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, process, smp, time};

/// Most threads that can exist at once.
pub const MAX_THREADS: usize = 256;
/// Stack of each kernel thread.
const THREAD_STACK_BYTES: usize = 32 * 1024;

/// A thread's index in the control-block table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadId(u16);

type Entry = Box<dyn FnOnce() + Send>;

/// A thread control block.
struct Tcb {
    context: Context,
    in_use: AtomicBool,
    /// The stack and, until the thread starts, its body. Dropped (stack freed) when the thread
    /// has exited and another context runs.
    body: IrqMutex<Option<(Stack, Option<Entry>)>>,
    /// For a user thread: its process, its address space's root (0 for a kernel thread) and
    /// the top of its kernel stack.
    process: IrqMutex<Option<Arc<Process>>>,
    space: AtomicU64,
    kernel_top: AtomicU64,
    /// Bumped at every spawn: with the index it makes the id user mode sees.
    generation: AtomicU32,
    joinable: AtomicBool,
    /// Set by the one joiner a thread may have.
    join_claimed: AtomicBool,
    /// Opens when the thread exits; its value then.
    finished: Latch,
    exit_value: AtomicU64,
}

static TCBS: [Tcb; MAX_THREADS] = [const {
    Tcb {
        context: Context::new(),
        in_use: AtomicBool::new(false),
        body: IrqMutex::new(None),
        process: IrqMutex::new(None),
        space: AtomicU64::new(0),
        kernel_top: AtomicU64::new(0),
        generation: AtomicU32::new(0),
        joinable: AtomicBool::new(false),
        join_claimed: AtomicBool::new(false),
        finished: Latch::new(),
        exit_value: AtomicU64::new(0),
    }
}; MAX_THREADS];

/// Threads asleep, with the TSC value to wake them at and the doorbell that also wakes them.
static SLEEPERS: IrqMutex<Vec<(u64, ThreadId, Option<&'static Doorbell>)>> =
    IrqMutex::new(Vec::new());

/// What happens to the thread that stops running, once its context is saved.
#[derive(Clone, Copy)]
enum After {
    /// Back into a run queue (preempted, yielded, or moved off a leaving core).
    Requeue,
    /// Waits on the latch until it opens.
    Block(&'static Latch),
    /// Sleeps until the TSC reaches this value, or the doorbell rings after the generation
    /// given (not at all if it has already).
    Sleep(u64, Option<(&'static Doorbell, u64)>),
    /// Gone: free its stack and control block.
    Exit,
}

struct RunQueue {
    threads: VecDeque<ThreadId>,
    /// Cleared when the core leaves: nothing may be queued there any more.
    open: bool,
}

/// Per-core scheduling state of a core's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotState {
    Offline = 0,
    /// Started, not yet scheduling.
    Starting = 1,
    Online = 2,
    /// Revoked: runs no new thread, sends its threads away, then releases the core.
    Draining = 3,
}

struct Local {
    current: Option<ThreadId>,
    after: Option<(ThreadId, After)>,
}

/// One core slot's scheduler state.
struct Core {
    queue: IrqMutex<RunQueue>,
    local: IrqMutex<Local>,
    /// The idle loop's context (the core's first stack).
    idle: Context,
    /// The top of that stack, where a leaving core continues when it stops a running thread
    /// ([`leave_running`]); 0 when unknown (the boot core's stack), and then it leaves
    /// through its idle loop.
    idle_top: AtomicU64,
    state: AtomicU8,
    core_index: AtomicU32,
    /// Mirrors of the queue length and of `local.current.is_some()`, for lock-free snapshots
    /// (but a core that left with a thread running stays `running` until that thread's time
    /// is settled: [`settle_left`]).
    queued: AtomicUsize,
    running: AtomicBool,
    /// TSC ticks spent running threads, ever; and when the current thread started.
    busy_ticks: AtomicU64,
    busy_since: AtomicU64,
    /// When a leaving core stopped the thread it ran ([`leave_running`]), for the core that
    /// settles that thread's time ([`settle_left`]).
    stopped_at: AtomicU64,
    /// Live processes limited to a number of cores that hold this slot ([`pin_slots`]).
    pinned: AtomicUsize,
}

static CORES: [Core; MAX_CORE_SLOTS] = [const {
    Core {
        queue: IrqMutex::new(RunQueue {
            threads: VecDeque::new(),
            open: false,
        }),
        local: IrqMutex::new(Local {
            current: None,
            after: None,
        }),
        idle: Context::new(),
        idle_top: AtomicU64::new(0),
        state: AtomicU8::new(SlotState::Offline as u8),
        core_index: AtomicU32::new(0),
        queued: AtomicUsize::new(0),
        running: AtomicBool::new(false),
        busy_ticks: AtomicU64::new(0),
        busy_since: AtomicU64::new(0),
        stopped_at: AtomicU64::new(0),
        pinned: AtomicUsize::new(0),
    }
}; MAX_CORE_SLOTS];

/// Threads leaving cores left behind, moved here by a core that stays ([`hand_off`]), for the
/// online cores to take: each takes from here before its own queue, at its next scheduling
/// point (an idle one is woken). Pulling rather than pushing keeps a leaving core's way out
/// short: it places no thread and looks at no other core's queue. Capacity for every thread
/// is reserved at boot ([`init`]), so handing off never allocates.
static HANDED_OFF: IrqMutex<VecDeque<ThreadId>> = IrqMutex::new(VecDeque::new());
/// Mirror of `HANDED_OFF`'s length, so a core with nothing to take there pays one load.
static HANDED_OFF_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Bit `slot` set while the slot is `Online` or `Draining`: the slots a snapshot looks at.
/// A snapshot walks these few bits rather than every slot: at Bochs's 50 instructions per
/// microsecond, a walk over all sixteen slots was a visible part of every enqueue.
static ACTIVE_SLOTS: AtomicU32 = AtomicU32::new(0);
const _: () = assert!(MAX_CORE_SLOTS <= 32);

static CREATED: AtomicU64 = AtomicU64::new(0);
static EXITED: AtomicU64 = AtomicU64::new(0);
static MIGRATED: AtomicU64 = AtomicU64::new(0);
static STOLEN: AtomicU64 = AtomicU64::new(0);

/// The slot of the core running this code.
pub fn current_slot() -> usize {
    slot_of_tss_selector(cpu::task_register()).expect("every core loads its slot's TSS first")
}

pub fn slot_state(slot: usize) -> SlotState {
    match CORES[slot].state.load(Ordering::Acquire) {
        1 => SlotState::Starting,
        2 => SlotState::Online,
        3 => SlotState::Draining,
        _ => SlotState::Offline,
    }
}

fn set_state(slot: usize, state: SlotState) {
    CORES[slot].state.store(state as u8, Ordering::Release);
    if matches!(state, SlotState::Online | SlotState::Draining) {
        ACTIVE_SLOTS.fetch_or(1 << slot, Ordering::AcqRel);
    } else {
        ACTIVE_SLOTS.fetch_and(!(1 << slot), Ordering::AcqRel);
    }
}

/// The hypervisor's index of the core in `slot`.
pub fn core_of(slot: usize) -> u32 {
    CORES[slot].core_index.load(Ordering::Relaxed)
}

/// Prepares `slot` for core `core`, which is about to start (or, for the boot core, is
/// running): an empty, open run queue and nothing running. `idle_top` is the top of the
/// stack its idle loop starts on (0 when unknown).
pub fn prepare_slot(slot: usize, core: u32, idle_top: u64) {
    let cell = &CORES[slot];
    cell.core_index.store(core, Ordering::Relaxed);
    cell.idle_top.store(idle_top, Ordering::Relaxed);
    {
        let mut queue = cell.queue.lock();
        queue.threads.clear();
        queue.open = true;
    }
    cell.queued.store(0, Ordering::Relaxed);
    cell.running.store(false, Ordering::Relaxed);
    *cell.local.lock() = Local {
        current: None,
        after: None,
    };
    set_state(slot, SlotState::Starting);
}

/// The core in `slot` starts scheduling (unless it was revoked while starting).
pub fn join(slot: usize) {
    let joined = CORES[slot].state.compare_exchange(
        SlotState::Starting as u8,
        SlotState::Online as u8,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    if joined.is_ok() {
        ACTIVE_SLOTS.fetch_or(1 << slot, Ordering::AcqRel);
    }
}

/// Marks the core in `slot` as leaving and pokes it, so it stops taking threads, sends away the
/// ones it has and releases itself. The leaving core itself needs no poke: it runs this from an
/// interrupt handler, which preempts right after, or from its idle loop, which looks next.
pub fn drain(slot: usize) {
    set_state(slot, SlotState::Draining);
    if slot != current_slot() {
        apic::send_fixed(core_of(slot), RESCHEDULE_VECTOR);
    }
}

/// The load of each online or draining slot, read as the iterator is walked: what a snapshot
/// holds, for a caller that needs no array (filling and clearing one is a visible part of an
/// idle core's look for work under Bochs).
fn slot_loads() -> impl Iterator<Item = CoreLoad> {
    let mut active = ACTIVE_SLOTS.load(Ordering::Acquire);
    core::iter::from_fn(move || {
        while active != 0 {
            let slot = active.trailing_zeros() as usize;
            active &= active - 1;
            let state = slot_state(slot);
            if matches!(state, SlotState::Online | SlotState::Draining) {
                let cell = &CORES[slot];
                return Some(CoreLoad {
                    slot,
                    queued: cell.queued.load(Ordering::Relaxed),
                    running: cell.running.load(Ordering::Relaxed),
                    accepting: state == SlotState::Online,
                    pinned: cell.pinned.load(Ordering::Relaxed),
                });
            }
        }
        None
    })
}

fn snapshot(loads: &mut [CoreLoad; MAX_CORE_SLOTS]) -> usize {
    let mut count = 0;
    for load in slot_loads() {
        loads[count] = load;
        count += 1;
    }
    count
}

const NO_LOAD: CoreLoad = CoreLoad {
    slot: 0,
    queued: 0,
    running: false,
    accepting: false,
    pinned: 0,
};

/// The slots of a snapshot that accept threads, as a mask.
fn online_mask(loads: impl IntoIterator<Item = CoreLoad>) -> u32 {
    loads
        .into_iter()
        .filter(|load| load.accepting)
        .fold(0, |mask, load| mask | 1 << load.slot)
}

/// The `online` slots `thread` may run on: all of them for a kernel thread or a process
/// without a core limit. With them, the slots its process holds if placing it may claim
/// another (`Process::permitted_slots`).
fn permitted_slots(thread: ThreadId, online: u32) -> (u32, Option<u32>) {
    TCBS[usize::from(thread.0)]
        .process
        .lock()
        .as_ref()
        .map_or((online, None), |process| process.permitted_slots(online))
}

/// A core-limited process took the slots of mask `claimed` and gave up those of `released`.
pub fn pin_slots(claimed: u32, released: u32) {
    for (mask, add) in [(claimed, true), (released, false)] {
        let mut bits = mask;
        while bits != 0 {
            let slot = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(core) = CORES.get(slot) {
                if add {
                    core.pinned.fetch_add(1, Ordering::Relaxed);
                } else {
                    core.pinned.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Whether `thread` may run on `slot`, which its process then holds (`Process::claim_slot`).
fn claim_slot(thread: ThreadId, slot: usize, online: u32) -> bool {
    TCBS[usize::from(thread.0)]
        .process
        .lock()
        .as_ref()
        .is_none_or(|process| process.claim_slot(slot, online))
}

/// Queues `thread` on the best core for it (of those its process may run on) and wakes that
/// core if it idles. `local` is the slot of the calling core.
fn enqueue(thread: ThreadId, local: usize) {
    let mut loads = [NO_LOAD; MAX_CORE_SLOTS];
    loop {
        let count = snapshot(&mut loads);
        let online = online_mask(loads[..count].iter().copied());
        // Never empty while a core accepts threads (`placement::permitted`).
        let (permitted, claiming) = permitted_slots(thread, online);
        for load in &mut loads[..count] {
            load.accepting &= permitted & 1 << load.slot != 0;
        }
        let target = if let Some(held) = claiming {
            // Its process's own pins do not keep it off the slots it holds.
            for load in &mut loads[..count] {
                if held & 1 << load.slot != 0 {
                    load.pinned = load.pinned.saturating_sub(1);
                }
            }
            placement::place_claim(local, &loads[..count])
        } else if slot_state(local) == SlotState::Online {
            placement::place(local, &loads[..count])
        } else {
            placement::migration_target(local, &loads[..count])
        };
        // Some core always accepts threads (the core table never lets the last one leave), but
        // a snapshot can be stale: look again until a queue takes the thread. The caller's own
        // queue is the fallback while it is open (a core that has not joined yet).
        let target = target.unwrap_or(local);
        if !claim_slot(thread, target, online) || !push(target, thread) {
            core::hint::spin_loop();
            continue;
        }
        if target != local {
            if slot_state(local) != SlotState::Online {
                MIGRATED.fetch_add(1, Ordering::Relaxed);
            }
            if !CORES[target].running.load(Ordering::Relaxed) {
                apic::send_fixed(core_of(target), RESCHEDULE_VECTOR);
            }
        }
        return;
    }
}

/// Appends `thread` to the run queue of `slot`; `false` if that queue is closed.
fn push(slot: usize, thread: ThreadId) -> bool {
    let mut queue = CORES[slot].queue.lock();
    if !queue.open {
        return false;
    }
    queue.threads.push_back(thread);
    CORES[slot]
        .queued
        .store(queue.threads.len(), Ordering::Relaxed);
    true
}

fn pop_local(slot: usize) -> Option<ThreadId> {
    let mut queue = CORES[slot].queue.lock();
    let thread = queue.threads.pop_front();
    CORES[slot]
        .queued
        .store(queue.threads.len(), Ordering::Relaxed);
    thread
}

/// The next thread for the core in `slot`: a thread handed off by a core that left first
/// (it was running a moment ago), then its own queue, then one stolen from the busiest queue
/// (from its back: the thread that would have waited longest there). Only threads this core
/// may run are taken: a handed-off thread whose process may not run here is queued where it
/// may, and a thief skips such threads. Its own queue holds only threads placed there.
fn pick_next(slot: usize) -> Option<ThreadId> {
    if slot_state(slot) != SlotState::Online {
        return None;
    }
    if HANDED_OFF_COUNT.load(Ordering::Acquire) > 0 {
        let online = online_mask(slot_loads());
        loop {
            let (thread, left) = {
                let mut handed_off = HANDED_OFF.lock();
                let thread = handed_off.pop_front();
                HANDED_OFF_COUNT.store(handed_off.len(), Ordering::Release);
                (thread, handed_off.len())
            };
            let Some(thread) = thread else { break };
            if !claim_slot(thread, slot, online) {
                enqueue(thread, slot);
                continue;
            }
            // One core was woken for what a leaving core left; each taker wakes the next.
            if left > 0 {
                wake_an_idle_core(slot);
            }
            return Some(thread);
        }
    }
    if let Some(thread) = pop_local(slot) {
        return Some(thread);
    }
    let online = online_mask(slot_loads());
    let victim = placement::steal_victim(slot, slot_loads())?;
    let mut queue = CORES[victim].queue.lock();
    let at = queue
        .threads
        .iter()
        .rposition(|thread| claim_slot(*thread, slot, online))?;
    let thread = queue.threads.remove(at);
    CORES[victim]
        .queued
        .store(queue.threads.len(), Ordering::Relaxed);
    if thread.is_some() {
        STOLEN.fetch_add(1, Ordering::Relaxed);
    }
    thread
}

/// Records on the process of `thread`, if it has one, that it runs on the core in `slot`.
fn note_ran_on(slot: usize, thread: ThreadId) {
    if let Some(process) = TCBS[usize::from(thread.0)].process.lock().as_ref() {
        process.ran_on(core_of(slot));
    }
}

/// Charges the time `thread` ran since the core's last switch to its process, if it has one.
fn charge(cell: &Core, thread: ThreadId) {
    if let Some(process) = TCBS[usize::from(thread.0)].process.lock().as_ref() {
        let since = cell.busy_since.load(Ordering::Relaxed);
        process.charge(time::now().wrapping_sub(since));
    }
}

fn account_switch(cell: &Core, next_runs: bool) {
    let now = time::now();
    if cell.running.load(Ordering::Relaxed) {
        let since = cell.busy_since.load(Ordering::Relaxed);
        cell.busy_ticks
            .fetch_add(now.wrapping_sub(since), Ordering::Relaxed);
    }
    cell.busy_since.store(now, Ordering::Relaxed);
    cell.running.store(next_runs, Ordering::Relaxed);
}

/// Stops the running thread (what happens to it is `after`) and runs the next one, or the idle
/// loop. Interrupts must be off. Returns when the thread runs again, possibly on another core.
fn schedule(after: After) {
    let slot = current_slot();
    let cell = &CORES[slot];
    if matches!(after, After::Requeue)
        && slot_state(slot) == SlotState::Draining
        && cell.idle_top.load(Ordering::Relaxed) != 0
    {
        leave_running(slot);
        return;
    }
    let Some(me) = cell.local.lock().current else {
        return;
    };
    let next = pick_next(slot);
    if next.is_none() && matches!(after, After::Requeue) && slot_state(slot) == SlotState::Online {
        // It runs on: its time so far is charged now, so the CPU time of a thread that has a
        // core to itself grows with every tick, not only when it switches out.
        charge(cell, me);
        account_switch(cell, true);
        return;
    }
    {
        let mut local = cell.local.lock();
        local.after = Some((me, after));
        local.current = next;
    }
    charge(cell, me);
    account_switch(cell, next.is_some());
    if let Some(next) = next {
        note_ran_on(slot, next);
    }
    enter_space(slot, next);
    let to = next.map_or(&cell.idle, |thread| &TCBS[usize::from(thread.0)].context);
    context::switch(&TCBS[usize::from(me.0)].context, to);
    finish_switch();
}

/// The leaving core in `slot` stops the thread it runs and leaves straight from here: the
/// thread's context is saved as in any switch, and the core goes on at the top of its idle
/// stack (which the caller checked it has: the boot core's is not known) into
/// [`left_thread`], which leaves the thread in the core's closed queue with the rest and
/// releases the core. The idle loop, which it would otherwise switch to only to leave from
/// there, never runs again on this core: its next start begins a new one. Returns when the
/// thread runs again, on another core (or at once if it runs none).
fn leave_running(slot: usize) {
    let cell = &CORES[slot];
    let Some(me) = cell.local.lock().current.take() else {
        return;
    };
    // The thread's time and the core's busy time are settled by a core that stays, when it
    // hands the thread off ([`settle_left`]): every instruction here delays the release.
    cell.stopped_at.store(time::now(), Ordering::Relaxed);
    enter_space(slot, None);
    // The overflow check of `finish_switch` is skipped here: the thread's canary is checked
    // at its next switch, on the core that runs it.
    let top = cell.idle_top.load(Ordering::Relaxed);
    context::leave(&TCBS[usize::from(me.0)].context, top, slot, me.0);
    finish_switch();
}

/// The way out of [`leave_running`], on the leaving core's idle stack: the context of
/// `thread` is saved, so it may be handed off now.
pub fn left_thread(slot: usize, thread: u16) -> ! {
    smp::leave(slot, Some(ThreadId(thread)))
}

/// Makes the address space and kernel-entry stack of `next` (or of the idle loop) current on
/// this core, just before switching to it.
fn enter_space(slot: usize, next: Option<ThreadId>) {
    let user = next
        .map(|thread| &TCBS[usize::from(thread.0)])
        .filter(|tcb| tcb.space.load(Ordering::Relaxed) != 0);
    match user {
        Some(tcb) => {
            address_space::switch_to(tcb.space.load(Ordering::Relaxed));
            user::set_kernel_stack(slot, tcb.kernel_top.load(Ordering::Relaxed));
        }
        None => address_space::switch_to_kernel(),
    }
}

/// Deals with the thread that ran before the switch that just landed here.
fn finish_switch() {
    let slot = current_slot();
    let Some((thread, after)) = CORES[slot].local.lock().after.take() else {
        return;
    };
    let overflowed = TCBS[usize::from(thread.0)]
        .body
        .lock()
        .as_ref()
        .is_some_and(|(stack, _)| !stack.intact());
    assert!(
        !overflowed,
        "kernel thread {} overflowed its stack",
        thread.0
    );
    match after {
        // A leaving core keeps the thread it stopped for a moment: it leaves all its threads
        // in its closed queue as it leaves (`close_for_leave`).
        After::Requeue if slot_state(slot) == SlotState::Draining && push(slot, thread) => {}
        After::Requeue => enqueue(thread, slot),
        After::Block(latch) => latch.park(thread, slot),
        After::Sleep(deadline, None) => SLEEPERS.lock().push((deadline, thread, None)),
        After::Sleep(deadline, Some((doorbell, seen))) => {
            // Checked under the lock `Doorbell::ring` wakes sleepers under, so a ring is
            // either seen here or finds the thread asleep.
            let mut sleepers = SLEEPERS.lock();
            if doorbell.generation() == seen {
                sleepers.push((deadline, thread, Some(doorbell)));
            } else {
                drop(sleepers);
                enqueue(thread, slot);
            }
        }
        After::Exit => retire(thread),
    }
}

/// Frees the stack of `thread`, which has exited and switched out. A kernel thread's control
/// block is free again at once; a user thread's goes through its process (`process`), which
/// keeps a joinable one as a zombie.
fn retire(thread: ThreadId) {
    let tcb = &TCBS[usize::from(thread.0)];
    drop(tcb.body.lock().take());
    EXITED.fetch_add(1, Ordering::Relaxed);
    let owner = tcb.process.lock().clone();
    match owner {
        None => tcb.in_use.store(false, Ordering::Release),
        Some(owner) => {
            let joinable = tcb.joinable.load(Ordering::Relaxed);
            if joinable {
                tcb.finished.count_down();
            }
            // May release this thread's block itself, if it was the process's last thread.
            process::thread_retired(&owner, thread, joinable);
            if !joinable {
                release(thread);
            }
        }
    }
}

/// Frees the control block of an exited user thread (joined, not joinable, or its process
/// ended), dropping its reference to the process: the last reference frees the process's
/// memory, which is safe here because no core has its address space loaded any more.
pub fn release(thread: ThreadId) {
    let tcb = &TCBS[usize::from(thread.0)];
    let owner = tcb.process.lock().take();
    tcb.space.store(0, Ordering::Relaxed);
    tcb.in_use.store(false, Ordering::Release);
    drop(owner);
}

/// Runs `next` from the idle loop of `slot`; returns when the core is idle again.
fn run_from_idle(slot: usize, next: ThreadId) {
    let cell = &CORES[slot];
    cell.local.lock().current = Some(next);
    account_switch(cell, true);
    note_ran_on(slot, next);
    enter_space(slot, Some(next));
    context::switch(&cell.idle, &TCBS[usize::from(next.0)].context);
    finish_switch();
}

/// The first code of every thread (`arch::context` calls it on the new stack).
pub fn thread_main() -> ! {
    finish_switch();
    let slot = current_slot();
    let me = CORES[slot]
        .local
        .lock()
        .current
        .expect("a thread is running");
    let entry = TCBS[usize::from(me.0)]
        .body
        .lock()
        .as_mut()
        .and_then(|(_, entry)| entry.take());
    interrupts::enable();
    if let Some(entry) = entry {
        entry();
    }
    exit()
}

/// Ends the running thread.
pub fn exit() -> ! {
    interrupts::disable();
    schedule(After::Exit);
    unreachable!("an exited thread was resumed")
}

/// Where a new user thread starts: RIP, RSP and its first two arguments (RDI, RSI).
#[derive(Clone, Copy, Debug)]
pub struct UserStart {
    pub rip: u64,
    pub rsp: u64,
    pub arguments: [u64; 2],
}

/// Creates a thread of `owner` that enters user mode at `start`, and queues it. Returns its
/// id as user mode sees it. `joinable`: it stays a zombie after exiting until joined.
pub fn spawn_user(owner: Arc<Process>, start: UserStart, joinable: bool) -> Option<u64> {
    let enter = move || {
        // A scope of its own: `enter` never returns, so the process's reference must go first.
        if let Some(process) = current_process() {
            process.note_first_user();
        }
        user::enter(start.rip, start.rsp, start.arguments[0], start.arguments[1]);
    };
    let thread = spawn_in(Some(owner), joinable, Box::new(enter))?;
    // More runnable work may cross this guest's core count: tell the hypervisor now rather
    // than at the next timer tick.
    crate::kernel::control::load_changed();
    Some(user_thread_id(thread))
}

fn user_thread_id(thread: ThreadId) -> u64 {
    let generation = TCBS[usize::from(thread.0)]
        .generation
        .load(Ordering::Relaxed);
    u64::from(generation) << 16 | u64::from(thread.0)
}

fn spawn_in(owner: Option<Arc<Process>>, joinable: bool, body: Entry) -> Option<ThreadId> {
    let index = TCBS.iter().position(|tcb| {
        tcb.in_use
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    let tcb = &TCBS[index];
    let mut stack = Stack::new(THREAD_STACK_BYTES);
    tcb.context.prepare(&mut stack);
    tcb.kernel_top.store(stack.top(), Ordering::Relaxed);
    tcb.space.store(
        owner.as_ref().map_or(0, |owner| owner.root()),
        Ordering::Relaxed,
    );
    *tcb.process.lock() = owner;
    tcb.generation.fetch_add(1, Ordering::Relaxed);
    tcb.joinable.store(joinable, Ordering::Relaxed);
    tcb.join_claimed.store(false, Ordering::Relaxed);
    tcb.exit_value.store(0, Ordering::Relaxed);
    tcb.finished.reset(1);
    *tcb.body.lock() = Some((stack, Some(body)));
    CREATED.fetch_add(1, Ordering::Relaxed);
    let thread = ThreadId(index as u16);
    interrupts::without_interrupts(|| enqueue(thread, current_slot()));
    Some(thread)
}

/// The process of the thread running on this core, if it is a user thread.
pub fn current_process() -> Option<Arc<Process>> {
    let me = interrupts::without_interrupts(|| CORES[current_slot()].local.lock().current)?;
    TCBS[usize::from(me.0)].process.lock().clone()
}

/// Ends the running user thread with `value` for its joiner.
pub fn exit_with(value: u64) -> ! {
    interrupts::disable();
    if let Some(me) = CORES[current_slot()].local.lock().current {
        TCBS[usize::from(me.0)]
            .exit_value
            .store(value, Ordering::Relaxed);
    }
    exit()
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinError {
    /// No joinable thread of `owner` has this id, or another thread joins it already.
    NoSuchThread,
}

/// Waits until user thread `id` of `owner` exits; returns its value and frees its control
/// block.
pub fn join_thread(owner: &Arc<Process>, id: u64) -> Result<u64, JoinError> {
    let index = (id & 0xffff) as usize;
    let tcb = TCBS.get(index).ok_or(JoinError::NoSuchThread)?;
    let ours = tcb.in_use.load(Ordering::Acquire)
        && u64::from(tcb.generation.load(Ordering::Relaxed)) == id >> 16
        && tcb.joinable.load(Ordering::Relaxed)
        && tcb
            .process
            .lock()
            .as_ref()
            .is_some_and(|process| Arc::ptr_eq(process, owner));
    // The thread cannot be released (and its block reused) while it is live or a zombie of a
    // live process, which `owner` is: its caller is one of its threads.
    if !ours || tcb.join_claimed.swap(true, Ordering::AcqRel) {
        return Err(JoinError::NoSuchThread);
    }
    tcb.finished.wait();
    let value = tcb.exit_value.load(Ordering::Relaxed);
    let thread = ThreadId(index as u16);
    process::thread_joined(owner, thread);
    interrupts::without_interrupts(|| release(thread));
    Ok(value)
}

/// Blocks the running thread until the TSC reaches `deadline` (woken by a timer tick).
pub fn sleep_until(deadline: u64) {
    interrupts::without_interrupts(|| {
        if time::now() < deadline {
            schedule(After::Sleep(deadline, None));
        }
    });
}

/// Queues every sleeper whose time has come. Called on each core's timer tick.
pub fn wake_sleepers() {
    let now = time::now();
    let mut woken: [Option<ThreadId>; 8] = [None; 8];
    loop {
        let mut count = 0;
        {
            let mut sleepers = SLEEPERS.lock();
            let mut index = 0;
            while index < sleepers.len() && count < woken.len() {
                if sleepers[index].0 <= now {
                    woken[count] = Some(sleepers.swap_remove(index).1);
                    count += 1;
                } else {
                    index += 1;
                }
            }
        }
        let slot = current_slot();
        for thread in woken.iter_mut().take(count).filter_map(Option::take) {
            enqueue(thread, slot);
        }
        if count < woken.len() {
            return;
        }
    }
}

/// The hypervisor's index of the core running this code.
pub fn current_core() -> u32 {
    core_of(current_slot())
}

/// Preemption point for interrupt handlers (interrupts are off there): lets another thread run
/// if one is waiting, and takes a leaving core's thread off it.
pub fn preempt() {
    schedule(After::Requeue);
}

/// The idle loop of the core in `slot`: runs threads while there are any, else sleeps until an
/// interrupt. A leaving core leaves from here, where no thread of its own is on the stack.
pub fn idle_loop(slot: usize, mut on_first_pass: impl FnMut(bool)) -> ! {
    let mut first = true;
    loop {
        interrupts::disable();
        // A leaving core leaves first: the revoke was read already, and polling the channel
        // again would only delay the release.
        if slot_state(slot) == SlotState::Draining {
            smp::leave(slot, None);
        }
        // Work first: the channel is polled when there is none, so a started core runs its
        // first thread without first looking at the ring (events also come by interrupt).
        let next = pick_next(slot).or_else(|| {
            crate::kernel::control::poll();
            crate::kernel::control::flush_events();
            crate::kernel::delegation::poll_control();
            pick_next(slot)
        });
        if first {
            first = false;
            on_first_pass(next.is_some());
        }
        if let Some(thread) = next {
            run_from_idle(slot, thread);
            continue;
        }
        // Nothing to run: send the console from idle time (with interrupts on, stopping as
        // soon as work arrives or the core must leave), then sleep if there was nothing to send.
        interrupts::enable();
        // A core going idle is a load change the hypervisor hears of at once.
        crate::kernel::control::load_changed();
        crate::kernel::control::print_markers();
        let idle = || {
            slot_state(slot) == SlotState::Online && CORES[slot].queued.load(Ordering::Relaxed) == 0
        };
        let sent = console::flush(idle);
        interrupts::disable();
        // A thread queued for this core while interrupts were on had its wake-up IPI taken
        // here, where there is no thread to preempt: look again rather than halt until the
        // next timer tick (5 ms). An IPI for a thread queued after this look stays pending
        // until the STI, whose one-instruction shadow delays it past the HLT, which it ends.
        if !sent && idle() && HANDED_OFF_COUNT.load(Ordering::Acquire) == 0 {
            interrupts::enable_and_hlt();
        }
    }
}

/// Reserves what the scheduler must never allocate later: room in the hand-off queue for every
/// thread. Called once at boot.
pub fn init() {
    HANDED_OFF.lock().reserve(MAX_THREADS);
}

/// The leaving core in `slot` closes its run queue, with `running` (the thread it stopped to
/// leave, if any) put back at its front, and takes the slot offline. Its threads stay in that
/// closed queue until a core that stays hands them off ([`hand_off`], run when the release is
/// noted), so the way out takes one lock. Returns how many threads it left and the core to
/// wake for them and for the release: an idle online core if there is one, else a busy one.
/// The leaving core does not send that IPI itself (each IPI a guest sends is a VM exit): its
/// release hypercall asks the hypervisor to.
pub fn close_for_leave(slot: usize, running: Option<ThreadId>) -> (usize, Option<u32>) {
    let count = {
        let mut queue = CORES[slot].queue.lock();
        queue.open = false;
        if let Some(thread) = running {
            queue.threads.push_front(thread);
        }
        queue.threads.len()
    };
    set_state(slot, SlotState::Offline);
    let others = ACTIVE_SLOTS.load(Ordering::Acquire) & !(1 << slot);
    let wake = idle_core(slot).or_else(|| (others != 0).then(|| others.trailing_zeros() as usize));
    (count, wake.map(core_of))
}

/// Charges the thread a core that left `slot` stopped to leave ([`leave_running`]), and the
/// slot's busy time, up to when it stopped: the slot is offline and still counts as running
/// only then. That thread is at the front of the slot's closed queue ([`close_for_leave`]).
fn settle_left(slot: usize) {
    let cell = &CORES[slot];
    if slot_state(slot) != SlotState::Offline || !cell.running.load(Ordering::Relaxed) {
        return;
    }
    let stopped_at = cell.stopped_at.load(Ordering::Relaxed);
    let since = cell.busy_since.load(Ordering::Relaxed);
    let ran = stopped_at.wrapping_sub(since);
    let front = cell.queue.lock().threads.front().copied();
    if let Some(thread) = front {
        if let Some(process) = TCBS[usize::from(thread.0)].process.lock().as_ref() {
            process.charge(ran);
        }
    }
    cell.busy_ticks.fetch_add(ran, Ordering::Relaxed);
    cell.busy_since.store(stopped_at, Ordering::Relaxed);
    cell.running.store(false, Ordering::Relaxed);
}

/// Moves the threads a core left in the closed queue of `slot` ([`close_for_leave`]) to the
/// hand-off queue, which every online core takes from first, at its next scheduling point;
/// each core that takes one wakes the next idle core while some are left ([`pick_next`]).
/// Called by a core that stays, before the slot can be prepared for another core. The queue
/// keeps its buffer for the slot's next core, and this move never allocates. The time of the
/// thread the core stopped to leave is settled first ([`settle_left`]). Returns how many
/// threads it moved.
pub fn hand_off(slot: usize) -> usize {
    settle_left(slot);
    let mut queue = CORES[slot].queue.lock();
    CORES[slot].queued.store(0, Ordering::Relaxed);
    let count = queue.threads.len();
    if count > 0 {
        let mut handed_off = HANDED_OFF.lock();
        while let Some(thread) = queue.threads.pop_front() {
            handed_off.push_back(thread);
        }
        HANDED_OFF_COUNT.store(handed_off.len(), Ordering::Release);
        MIGRATED.fetch_add(count as u64, Ordering::Relaxed);
    }
    count
}

/// What became of the thread that was running on a core taken by force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedThread {
    /// None was running there (the core idled, or had left the scheduler already).
    None,
    /// It runs on from the forced core's registers, on another core (`to_user`: in user mode).
    Resumed { to_user: bool, rip: u64 },
    /// It cannot run on ([`forced_thread::Lost`]); it stays out of every queue.
    Lost(forced_thread::Lost),
}

/// Words the switch frame of [`Context::prepare_resume`] puts below the interrupt frame.
const RESUME_SWITCH_BYTES: u64 = 8 * 7;

/// The core in `slot` was taken by the hypervisor without releasing itself, with the registers
/// `forced` it had then (if the hypervisor kept them): closes its run queue if it is still
/// open, takes the slot offline and hands its queued threads off ([`hand_off`]), with the
/// thread that was running there first when it can run on ([`forced_thread::judge`]). Returns
/// how many threads were handed off and what became of the running one.
pub fn take_over(slot: usize, forced: Option<ForcedState>) -> (usize, ForcedThread) {
    settle_left(slot);
    let cell = &CORES[slot];
    let was_running =
        slot_state(slot) != SlotState::Offline && cell.running.load(Ordering::Relaxed);
    let running = cell.local.lock().current.take().filter(|_| was_running);
    cell.running.store(false, Ordering::Relaxed);
    let outcome = running.map_or(ForcedThread::None, |thread| {
        let resumed = forced
            .ok_or(forced_thread::Lost::NoRegisters)
            .and_then(|state| resume_forced(thread, &state));
        match resumed {
            Ok(resume) => ForcedThread::Resumed {
                to_user: resume.to_user,
                rip: resume.rip(),
            },
            Err(lost) => ForcedThread::Lost(lost),
        }
    });
    {
        let mut queue = cell.queue.lock();
        queue.open = false;
        if let (Some(thread), ForcedThread::Resumed { .. }) = (running, outcome) {
            queue.threads.push_front(thread);
        }
    }
    set_state(slot, SlotState::Offline);
    let handed_off = hand_off(slot);
    if handed_off > 0 {
        wake_an_idle_core(slot);
    }
    (handed_off, outcome)
}

/// Rebuilds `thread`, which was running on a forced core with registers `state`, so that the
/// next switch to it resumes it there.
fn resume_forced(
    thread: ThreadId,
    state: &ForcedState,
) -> Result<forced_thread::Resume, forced_thread::Lost> {
    let tcb = &TCBS[usize::from(thread.0)];
    let mut body = tcb.body.lock();
    let (stack, _) = body.as_mut().ok_or(forced_thread::Lost::StackOutside)?;
    let shape = forced_thread::Thread {
        stack_bottom: stack.bottom(),
        stack_top: stack.top(),
        user: tcb.space.load(Ordering::Relaxed) != 0,
    };
    let resume = forced_thread::judge(state, shape, RESUME_SWITCH_BYTES)?;
    if !tcb.context.prepare_resume(stack, &resume) {
        return Err(forced_thread::Lost::StackOutside);
    }
    Ok(resume)
}

/// The first code of a thread resumed from a forced core's registers, on its new core, before
/// it returns to them (`arch::context`): the switch's bookkeeping, and for user mode the
/// checks of every return there.
pub fn resumed(to_user: bool) {
    finish_switch();
    if to_user {
        process::before_user_return();
    }
}

/// Sends a reschedule IPI to one idle online core other than `slot`'s, if there is one.
fn wake_an_idle_core(slot: usize) {
    if let Some(other) = idle_core(slot) {
        apic::send_fixed(core_of(other), RESCHEDULE_VECTOR);
    }
}

/// The slot of an idle online core other than `slot`, if there is one.
fn idle_core(slot: usize) -> Option<usize> {
    let mut active = ACTIVE_SLOTS.load(Ordering::Acquire) & !(1 << slot);
    while active != 0 {
        let other = active.trailing_zeros() as usize;
        active &= active - 1;
        let idle = !CORES[other].running.load(Ordering::Relaxed);
        if idle && slot_state(other) == SlotState::Online {
            return Some(other);
        }
    }
    None
}

/// Threads queued on the core in `slot`.
pub fn queued(slot: usize) -> usize {
    CORES[slot].queued.load(Ordering::Relaxed)
}

/// The threads runnable now (queued and running on every slot, and handed off by cores that
/// left) that can run at once, each with the sibling waiting to join it if it has one: a
/// process limited to fewer cores (`vmctl exec --cores`) counts for no more than its limit
/// (`guest_lavender::load::UsableThreads`). A thread whose process cannot be read without
/// waiting (its core is switching) counts whole.
pub fn usable_runnable() -> u32 {
    let mut usable = UsableThreads::new();
    let owner = |thread: ThreadId| {
        TCBS[usize::from(thread.0)]
            .process
            .try_lock()
            .map_or(Some((0, 0)), |process| {
                process
                    .as_ref()
                    .map(|p| (p.pid(), u32::from(p.options().cores)))
            })
    };
    // A sibling waiting to join a runnable thread runs the moment that thread ends: it is
    // counted with it (see `UsableThreads::add_awaited`).
    let count = |usable: &mut UsableThreads, thread: ThreadId| {
        let joiner = TCBS[usize::from(thread.0)]
            .join_claimed
            .load(Ordering::Relaxed);
        if joiner {
            usable.add_awaited(owner(thread));
        } else {
            usable.add(owner(thread));
        }
    };
    let mut active = ACTIVE_SLOTS.load(Ordering::Acquire);
    while active != 0 {
        let slot = active.trailing_zeros() as usize;
        active &= active - 1;
        if !matches!(slot_state(slot), SlotState::Online | SlotState::Draining) {
            continue;
        }
        let cell = &CORES[slot];
        if cell.running.load(Ordering::Relaxed) {
            match cell.local.try_lock().and_then(|local| local.current) {
                Some(thread) => count(&mut usable, thread),
                None => usable.add(None),
            }
        }
        for &thread in cell.queue.lock().threads.iter() {
            count(&mut usable, thread);
        }
    }
    for &thread in HANDED_OFF.lock().iter() {
        count(&mut usable, thread);
    }
    usable.total()
}

/// Threads handed off by leaving cores and not taken yet (they count as runnable).
pub fn handed_off() -> u32 {
    HANDED_OFF_COUNT.load(Ordering::Relaxed) as u32
}

/// Something an interrupt rings to wake the threads sleeping on it at once, rather than at
/// their deadline (a peer's reply, a command from Linux). No ring is lost: a sleeper names
/// the generation it last saw, and does not sleep if the doorbell has rung since.
pub struct Doorbell {
    generation: AtomicU64,
}

impl Doorbell {
    pub const fn new() -> Self {
        Self {
            generation: AtomicU64::new(0),
        }
    }

    /// Read before looking for what the doorbell announces; pass it to [`Doorbell::sleep_until`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sleeps the calling thread until `deadline` (TSC) or a ring after generation `seen`.
    pub fn sleep_until(&'static self, deadline: u64, seen: u64) {
        interrupts::without_interrupts(|| {
            if time::now() < deadline {
                schedule(After::Sleep(deadline, Some((self, seen))));
            }
        });
    }

    /// Wakes every thread sleeping on this doorbell, onto this core (interrupts off).
    pub fn ring(&'static self) {
        let slot = current_slot();
        let mut woken: [Option<ThreadId>; 8] = [None; 8];
        loop {
            let mut count = 0;
            {
                let mut sleepers = SLEEPERS.lock();
                self.generation.fetch_add(1, Ordering::AcqRel);
                let mut index = 0;
                while index < sleepers.len() && count < woken.len() {
                    if sleepers[index].2.is_some_and(|d| core::ptr::eq(d, self)) {
                        woken[count] = Some(sleepers.swap_remove(index).1);
                        count += 1;
                    } else {
                        index += 1;
                    }
                }
            }
            for thread in woken.iter_mut().take(count).filter_map(Option::take) {
                enqueue(thread, slot);
            }
            if count < woken.len() {
                return;
            }
        }
    }
}

/// A count-down latch threads can block on.
pub struct Latch {
    remaining: AtomicUsize,
    waiters: IrqMutex<Vec<ThreadId>>,
}

impl Latch {
    pub const fn new() -> Self {
        Self {
            remaining: AtomicUsize::new(0),
            waiters: IrqMutex::new(Vec::new()),
        }
    }

    /// Closes the latch until `count` calls of [`Latch::count_down`].
    pub fn reset(&self, count: usize) {
        self.remaining.store(count, Ordering::Release);
    }

    pub fn count_down(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waiters = core::mem::take(&mut *self.waiters.lock());
            interrupts::without_interrupts(|| {
                let slot = current_slot();
                for thread in waiters {
                    enqueue(thread, slot);
                }
            });
        }
    }

    /// Blocks the calling thread until the latch opens.
    pub fn wait(&'static self) {
        while self.remaining.load(Ordering::Acquire) != 0 {
            interrupts::without_interrupts(|| schedule(After::Block(self)));
        }
    }

    /// Parks `thread` (already switched out) unless the latch opened meanwhile. The check and
    /// the push happen under the lock `count_down` takes after opening it, so no wake-up is
    /// lost.
    fn park(&self, thread: ThreadId, slot: usize) {
        let mut waiters = self.waiters.lock();
        if self.remaining.load(Ordering::Acquire) == 0 {
            drop(waiters);
            enqueue(thread, slot);
        } else {
            waiters.push(thread);
        }
    }
}

/// Scheduler counters for reports and markers.
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub created: u64,
    pub exited: u64,
    pub migrated: u64,
    pub stolen: u64,
}

pub fn counters() -> Counters {
    Counters {
        created: CREATED.load(Ordering::Relaxed),
        exited: EXITED.load(Ordering::Relaxed),
        migrated: MIGRATED.load(Ordering::Relaxed),
        stolen: STOLEN.load(Ordering::Relaxed),
    }
}

/// Load of one slot: whether it is online, the TSC ticks it spent running threads so far, and
/// its runnable threads (queued plus running).
pub fn slot_load(slot: usize, now: u64) -> Option<(u32, u64, u32)> {
    let cell = &CORES[slot];
    if !matches!(slot_state(slot), SlotState::Online | SlotState::Draining) {
        return None;
    }
    let running = cell.running.load(Ordering::Relaxed);
    let mut busy = cell.busy_ticks.load(Ordering::Relaxed);
    if running {
        busy += now.wrapping_sub(cell.busy_since.load(Ordering::Relaxed));
    }
    let runnable = cell.queued.load(Ordering::Relaxed) as u32 + u32::from(running);
    Some((core_of(slot), busy, runnable))
}
