//! The control channel with the hypervisor: the shared region whose peer is the hypervisor.
//!
//! Ring 0 carries core events to Lavender (`Grant`, `Revoke`, `Taken`) and guest events (another
//! guest is down: `kernel::delegation` fails the calls it served), ring 1 Lavender's load reports,
//! ring 2 Lavender's own core events (`Online`, `Offline`, `Released`, `Declined`). A
//! negotiable revoke (a policy's) is declined when the cores Lavender's steadied load needs
//! would exceed its cores without the core and some thread can run; any other revoke is
//! honoured. The hypervisor rings
//! the region's interrupt vector after pushing on ring 0; every core also polls ring 0 from its
//! timer tick and idle loop, so a lost interrupt only delays an event. Lavender consumes ring 0
//! interrupt-driven: after draining it raises `consumer_waiting` (the doorbell rule in
//! `vmcall-proto`'s ABI), so a hypervisor that follows the rule knows to interrupt it.

use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use guest_lavender::core_events::{Action, CoreTable};
use guest_lavender::descriptors::MAX_CORE_SLOTS;
use guest_lavender::load::{self, Summary};
use log::{debug, info, warn};
use vmcall_proto::bootinfo::{BootInfo, PEER_HYPERVISOR};
use vmcall_proto::cores::CoreId;
use vmcall_proto::demand::SteadyRequest;
use vmcall_proto::message::{
    CoreEvent, DeclineReason, GuestEvent, HypervisorEvent, LoadReport, Permille, WorkloadHint,
};
use vmcall_proto::ring::{Consumer, Producer, Record64, SleepCheck};

use crate::kernel::arch::{self, hypercall};
use crate::kernel::sched::ForcedThread;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, delegation, faults, jobs, sched, smp, time};

/// Ring indices in the control region (the contract with the hypervisor).
const EVENTS_IN_RING: u32 = 0;
const LOAD_RING: u32 = 1;
const EVENTS_OUT_RING: u32 = 2;
/// A load report at least this often.
const REPORT_PERIOD_US: u64 = 100_000;
/// A report on a change of the thread count, request or core set comes at most this often
/// (the cooperative policy arbitrates on each report; the scheduler asks for one when it
/// creates a thread or a core goes idle, the timer tick otherwise), except one that asks for
/// more cores than the last.
const CHANGE_REPORT_SPACING_US: u64 = 1_000;
/// A request for more cores is passed on after this long (µs): none. Lavender's threads are
/// its own work, so a step up is real at once; a thread back from a delegated call may ask
/// for a core it will not keep busy, but it is given one only from a guest that offers it,
/// and the core then stays for the policies' hold time at most.
const GROW_AFTER_US: u64 = 0;
/// The time constant of the mean of the cores wanted that offers cores (µs): threads that
/// wait a moment on a delegated call (a line of output), or at a barrier for a straggler
/// (other than a join: a thread waiting to join a runnable one counts as runnable,
/// `sched::usable_runnable`), keep their cores for some 35 ms; a job in a phase of
/// delegated I/O with its workers joined, and a job that ended, offer them at once (see
/// `Reporter::steady_request`).
const SHRINK_MEAN_US: u64 = 50_000;
/// Between two `lavender_load` markers: console lines are slow (a serial line under Bochs
/// takes milliseconds of virtual time), so the marker is rate-limited; the ring report is not.
const MARKER_PERIOD_US: u64 = 250_000;
/// A started core that has not checked in after this long gets a second STARTUP.
const STARTUP_RETRY_US: u64 = 200;
/// At boot, how often an initial core that has not checked in gets its STARTUP again, and
/// how long it is waited for in all.
const INITIAL_STARTUP_RESEND_US: u64 = 5_000;
const INITIAL_STARTUP_WAIT_US: u64 = 1_000_000;
/// Ring 2 events queued at most before they are pushed on the spot (see `owe_event`): room
/// for the moves of several timer ticks, since a core test moves a core every ~100 µs and a
/// busy Lavender flushes only from its 5 ms ticks.
const OWED_EVENTS: usize = 256;
/// Bytes of the largest load report: 64 cores.
const REPORT_BYTES: usize = 32 + 2 * 64;

struct Inbox {
    consumer: Consumer<'static>,
    /// A grant that waits for the bring-up in flight to finish.
    stash: Option<CoreEvent>,
}

struct Outbox {
    events: Producer<'static>,
    /// Events not on the ring yet, oldest first (see [`flush_events`]).
    owed: VecDeque<CoreEvent>,
}

struct Reporter {
    producer: Producer<'static>,
    allowed: u32,
    last_at: u64,
    last_busy: [u64; MAX_CORE_SLOTS],
    last_sent: Option<Summary>,
    last_marker: Option<(u64, Summary)>,
    /// A `lavender_load` marker due (when, what, reports dropped so far), for
    /// [`print_markers`] to print.
    pending_marker: Option<(u64, Summary, u64)>,
    dropped: u64,
    /// The request, steadied ([`GROW_AFTER_US`], [`SHRINK_MEAN_US`]).
    steady: SteadyRequest,
}

impl Reporter {
    /// Samples the cores wanted for `usable` threads that can run into the steadied request,
    /// and returns the request to report at `now` (TSC). The mean is held to what the live
    /// processes may run at once (`jobs::ThreadCounts::usable`): a job's threads that wait a moment
    /// keep its cores, while a job that joined its workers for a phase of delegated I/O, or
    /// that ended, offers them at once (a core nobody else wants goes back to the pool, and
    /// the next phase of work gets it from there within a sampling period).
    ///
    /// Also says whether an offer is final (`load::final_offer`, from the most threads the
    /// live processes have run at once, `jobs::ThreadCounts::peak`).
    fn steady_request(&mut self, usable: u32, now: u64) -> (i16, bool) {
        let scheduling = with_table(|table| table.scheduling().len()).unwrap_or(1);
        let counts = jobs::thread_counts(now);
        if let Some(all) = counts {
            self.steady
                .bound(load::wanted(all.usable.max(usable), self.allowed));
        }
        let request = self.steady.steady(
            load::wanted(usable, self.allowed),
            scheduling,
            time::ticks_to_us(now),
        );
        let final_offer = counts.is_some_and(|all| {
            load::final_offer(request, scheduling, all.peak, usable, self.allowed)
        });
        (request, final_offer)
    }
}

static INBOX: IrqMutex<Option<Inbox>> = IrqMutex::new(None);
static OUTBOX: IrqMutex<Option<Outbox>> = IrqMutex::new(None);
static REPORTER: IrqMutex<Option<Reporter>> = IrqMutex::new(None);
static TABLE: IrqMutex<Option<CoreTable>> = IrqMutex::new(None);
/// Set by a core that wanted to read ring 0 while another one was reading it (see [`poll`]).
static POLL_AGAIN: AtomicBool = AtomicBool::new(false);
/// Bit `slot` set by a core that left `slot` and whose release is not noted yet.
static RELEASED_SLOTS: AtomicU32 = AtomicU32::new(0);
const _: () = assert!(MAX_CORE_SLOTS <= 32);
/// Whether load reports are also printed as `lavender_load` markers (`load_markers=on`).
/// Off by default: the reports are for the hypervisor, and a marker line every 250 ms
/// would fill the interactive console of an idle system.
static LOAD_MARKERS: AtomicBool = AtomicBool::new(false);
/// The notification vector; 0 before `init` or without a control region.
static VECTOR: AtomicU8 = AtomicU8::new(0);

/// Whether `vector` is the control region's notification interrupt.
pub fn is_notification(vector: u8) -> bool {
    vector != 0 && VECTOR.load(Ordering::Relaxed) == vector
}

/// Also print load reports as `lavender_load` markers (the `load_markers=on` command-line word).
pub fn print_load_markers(on: bool) {
    LOAD_MARKERS.store(on, Ordering::Relaxed);
}

/// Sets up the core table and attaches to the control region, if the boot info names one.
pub fn init(boot_info: &BootInfo, reserved_vectors: &[u8]) {
    *TABLE.lock() = Some(CoreTable::new(
        boot_info.boot_core(),
        boot_info.cores_allowed(),
    ));
    attach(boot_info, reserved_vectors);
}

/// Starts the cores the configuration gives Lavender from boot besides its boot core. The
/// hypervisor granted them before Lavender ran, so no grant event comes for them: each is
/// taken up as a grant is, one bring-up at a time (they share the trampoline page). A core
/// the hypervisor is still setting up (it turns VMX on core by core while Lavender boots)
/// takes its STARTUP only then, so the wait is long and the STARTUP is sent again.
pub fn start_initial_cores(boot_info: &BootInfo) {
    let boot_core = boot_info.boot_core();
    let mut starting = None;
    for core in boot_info.cores_initial().iter().filter(|&c| c != boot_core) {
        if let Some(previous) = starting {
            let mut waited_us = 0;
            while !smp::wait_for_bring_up(INITIAL_STARTUP_RESEND_US) {
                waited_us += INITIAL_STARTUP_RESEND_US;
                if waited_us >= INITIAL_STARTUP_WAIT_US {
                    warn!("control: {previous} never checked in; the initial cores after it are not started");
                    return;
                }
                smp::resend_startup(previous);
            }
        }
        handle(CoreEvent::Grant { core });
        starting = Some(core);
    }
}

fn attach(boot_info: &BootInfo, reserved_vectors: &[u8]) {
    let Some(info) = boot_info
        .shared_regions()
        .iter()
        .find(|region| region.peer == PEER_HYPERVISOR && region.vector != 0)
    else {
        info!("control: no control region; Lavender keeps its boot cores");
        console::marker("lavender_control", |o| {
            o.bool("attached", false);
        });
        return;
    };
    let attached = arch::shared::region(info)
        .and_then(|region| region.attach())
        .and_then(|view| {
            let ring = |index| view.ring(index);
            Ok((
                ring(EVENTS_IN_RING)?,
                ring(LOAD_RING)?,
                ring(EVENTS_OUT_RING)?,
                view,
            ))
        });
    let (events_in, loads, events_out, view) = match attached {
        Ok(rings) => rings,
        Err(problem) => {
            warn!(
                "control: region at {:#x} refused: {problem}",
                info.guest_physical
            );
            console::marker("lavender_control", |o| {
                o.bool("attached", false).display("error", &problem);
            });
            return;
        }
    };
    let region = view.region();
    let endpoints = Consumer::attach(&region, &events_in).and_then(|consumer| {
        Ok((
            consumer,
            Producer::attach(&region, &loads)?,
            Producer::attach(&region, &events_out)?,
        ))
    });
    let (consumer, load_producer, event_producer) = match endpoints {
        Ok(endpoints) => endpoints,
        Err(problem) => {
            warn!("control: rings refused: {problem}");
            console::marker("lavender_control", |o| {
                o.bool("attached", false).display("error", &problem);
            });
            return;
        }
    };
    if reserved_vectors.contains(&info.vector) {
        warn!(
            "control: notification vector {:#x} collides with Lavender's own; relying on polling",
            info.vector
        );
    } else {
        VECTOR.store(info.vector, Ordering::Relaxed);
    }
    *INBOX.lock() = Some(Inbox {
        consumer,
        stash: None,
    });
    *OUTBOX.lock() = Some(Outbox {
        events: event_producer,
        owed: VecDeque::with_capacity(OWED_EVENTS),
    });
    *REPORTER.lock() = Some(Reporter {
        producer: load_producer,
        allowed: boot_info.cores_allowed().len(),
        last_at: time::now(),
        last_busy: [0; MAX_CORE_SLOTS],
        last_sent: None,
        last_marker: None,
        pending_marker: None,
        dropped: 0,
        steady: SteadyRequest::new(GROW_AFTER_US, SHRINK_MEAN_US),
    });
    info!(
        "control: attached region at {:#x} ({} KiB), vector {:#x}",
        info.guest_physical,
        info.size / 1024,
        info.vector
    );
    console::marker("lavender_control", |o| {
        o.bool("attached", true)
            .hex("region", info.guest_physical)
            .u64("vector", u64::from(info.vector));
    });
}

/// Drains ring 0 and acts on every event. Any core may call it. One core reads the ring at a
/// time; a core that finds another one reading leaves it a note (`POLL_AGAIN`) instead of
/// waiting, and the reader looks at the ring again after letting go of it, so an event whose
/// interrupt reached the wrong moment is never left for the next timer tick.
pub fn poll() {
    loop {
        let Some(mut guard) = INBOX.try_lock() else {
            POLL_AGAIN.store(true, Ordering::Release);
            if INBOX.is_locked() {
                // The reader checks the note after it lets go.
                return;
            }
            continue;
        };
        POLL_AGAIN.store(false, Ordering::Release);
        let Some(inbox) = guard.as_mut() else {
            return;
        };
        if !drain_inbox(inbox) {
            *guard = None;
        }
        drop(guard);
        if !POLL_AGAIN.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Acts on the events in ring 0 until it is empty (or this core must leave). `false` when the
/// ring is broken and must no longer be read.
fn drain_inbox(inbox: &mut Inbox) -> bool {
    loop {
        let event = match inbox.stash.take() {
            Some(event) => event,
            None => match next_event(&mut inbox.consumer) {
                Ok(Some(HypervisorEvent::Core(event))) => event,
                Ok(Some(HypervisorEvent::Guest(event))) => {
                    guest_event(event);
                    continue;
                }
                Ok(None) => match inbox.consumer.prepare_to_sleep() {
                    Ok(SleepCheck::MessagesReady) => continue,
                    Ok(SleepCheck::MaySleep) => return true,
                    Err(problem) => {
                        warn!("control: ring 0 broken: {problem}; events are no longer read");
                        return false;
                    }
                },
                Err(()) => return false,
            },
        };
        // One bring-up at a time (they share the trampoline page). The one in flight ends
        // within microseconds, once its core reaches its Rust entry: wait for it rather than
        // leave this grant for a later poll, which could be a timer tick away.
        if matches!(event, CoreEvent::Grant { .. }) && !smp::wait_for_bring_up(STARTUP_RETRY_US) {
            inbox.stash = Some(event);
            return true;
        }
        handle(event);
        // A core just told to leave stops reading: what else is queued is for the cores that
        // stay, which read the ring from their ticks and idle loops (and one of which the
        // hypervisor interrupts with each event), while every microsecond here delays the
        // release. It leaves `consumer_waiting` as it is; a core that stays raises it when it
        // finds the ring empty.
        if sched::slot_state(sched::current_slot()) == sched::SlotState::Draining {
            return true;
        }
    }
}

/// The next decodable event; `Err` when the ring itself is broken.
/// Rings 0 and 2 are record rings of 64-byte slots (the format is in their descriptors): a
/// whole slot is one zero-padded event.
fn next_event(consumer: &mut Consumer<'static>) -> Result<Option<HypervisorEvent>, ()> {
    let mut record = Record64::ZERO;
    loop {
        match consumer.try_pop_record(&mut record) {
            Ok(false) => return Ok(None),
            Ok(true) => match HypervisorEvent::decode(&record.0) {
                Ok(event) => return Ok(Some(event)),
                Err(problem) => warn!("control: undecodable event skipped: {problem}"),
            },
            Err(problem) => {
                warn!("control: ring 0 broken: {problem}; events are no longer read");
                return Err(());
            }
        }
    }
}

fn with_table<R>(f: impl FnOnce(&mut CoreTable) -> R) -> Option<R> {
    TABLE.lock().as_mut().map(f)
}

fn handle(event: CoreEvent) {
    let now = time::now();
    // Only a negotiable revoke is judged by the load. Counting it takes every run queue's and
    // many processes' locks, which a grant or a plain revoke must not wait for: both are on
    // the path a core move is timed by.
    let judged = matches!(
        event,
        CoreEvent::Revoke {
            negotiable: true,
            ..
        }
    )
    .then(|| negotiable_revoke_load(now));
    let mut declined = None;
    let action = with_table(|table| {
        // Releases not noted yet are noted first for a grant, which must find a core that
        // left `Absent`, and for a core taken by force, which must not be noted twice. A
        // revoke needs neither: a core that left is not `Online`, so it counts for nothing in
        // the revoke's check, and the core told to leave should not spend its way out on
        // other cores' books.
        if !matches!(event, CoreEvent::Revoke { .. }) {
            note_releases_in(table);
        }
        match event {
            CoreEvent::Grant { core } => Some(table.grant(core, now)),
            CoreEvent::Revoke {
                core,
                negotiable: true,
                ..
            } if table.scheduling().contains(core)
                && judged.is_some_and(|load| {
                    load::declines_revoke(load.needs, table.scheduling().len())
                }) =>
            {
                declined = Some((core, table.scheduling().len()));
                None
            }
            CoreEvent::Revoke { core, .. } => Some(table.revoke(core, now)),
            CoreEvent::Taken { core } => {
                taken(table, core);
                None
            }
            other => {
                warn!("control: unexpected event {other:?} from the hypervisor, ignored");
                None
            }
        }
    })
    .flatten();
    if let Some(action) = action {
        act(action, now);
    }
    if let (Some((core, cores)), Some(load)) = (declined, judged) {
        // The hypervisor waits for the answer: it goes on ring 2 now, not at the next tick.
        owe_event(CoreEvent::Declined {
            core,
            reason: DeclineReason::Busy,
        });
        flush_events();
        console::marker("lavender_declined", |o| {
            o.u64("core", core.index() as u64)
                .str("reason", DeclineReason::Busy.name())
                .u64("runnable", load.runnable.into())
                .u64("needs", load.needs.into())
                .u64("cores", cores.into());
        });
    }
}

/// What a negotiable revoke is judged by.
#[derive(Clone, Copy)]
struct RevokeLoad {
    /// Threads runnable now, for the decline's marker.
    runnable: u32,
    /// The cores the load needs by its steadied mean (not by a thread that woke or waits just
    /// now), or 0 when nothing can run (an idle Lavender, or one whose jobs sleep or wait on
    /// Linux, needs no core now; its next phase of work asks for one again).
    needs: u32,
}

fn negotiable_revoke_load(now: u64) -> RevokeLoad {
    let runnable = runnable_threads(now);
    let usable = sched::usable_runnable();
    let steadied = steady_needs(usable, now);
    RevokeLoad {
        runnable,
        needs: if usable == 0 { 0 } else { steadied },
    }
}

/// Another guest changed as a whole. A guest that is down and served Lavender's delegated
/// calls will never answer them: they fail now (`EIO`), and so does every call after.
fn guest_event(event: GuestEvent) {
    let GuestEvent::Down { guest, state } = event;
    let calls_waiting = delegation::guest_down(guest);
    warn!(
        "control: guest {guest} is down ({}){}",
        state.name(),
        if calls_waiting.is_some() {
            "; it served delegation, whose calls now fail with EIO"
        } else {
            ""
        }
    );
    console::marker("lavender_peer_down", |o| {
        o.u64("guest", guest.into())
            .str("state", state.name())
            .bool("delegation", calls_waiting.is_some())
            .u64("calls_waiting", calls_waiting.unwrap_or(0) as u64);
    });
}

/// The cores Lavender's load needs by its steadied mean (`SteadyRequest::needs`), with the
/// threads that can run now (`usable`, `sched::usable_runnable`) sampled in: what a
/// negotiable revoke is judged by. An idle Lavender reports nothing (its cores halt), so
/// the mean is brought up to date here; without a reporter, the threads that can run now.
fn steady_needs(usable: u32, now: u64) -> u32 {
    let mut guard = REPORTER.lock();
    let Some(reporter) = guard.as_mut() else {
        return usable;
    };
    reporter.steady_request(usable, now);
    reporter.steady.needs()
}

/// Threads runnable now (queued and running on every slot, and handed off by cores that
/// left).
fn runnable_threads(now: u64) -> u32 {
    (0..MAX_CORE_SLOTS)
        .filter_map(|slot| sched::slot_load(slot, now))
        .map(|(_, _, threads)| threads)
        .sum::<u32>()
        + sched::handed_off()
}

/// The hypervisor took `core` by force: it missed its release deadline (a core that left the
/// scheduler but never made its release call, or one that never acted on the revoke). The
/// thread that was running there, if any, is rebuilt from the registers the hypervisor kept
/// (`FORCED_STATE`) when it can run on (`guest_lavender::forced_thread`); it and the threads
/// queued on the core's slot go to the cores that stay, and the slot is free again.
fn taken(table: &mut CoreTable, core: CoreId) {
    let Some(slot) = table.taken(core) else {
        // Its release was noted first: nothing was left behind.
        return;
    };
    let forced = hypercall::forced_state(core);
    let (handed_off, thread) = sched::take_over(slot, forced.ok());
    faults::core_taken(core);
    if let ForcedThread::Lost(why) = thread {
        warn!("control: {core} was taken while running a thread that cannot run on ({why}); it is lost");
    }
    console::marker("lavender_core_taken", |o| {
        o.u64("core", core.index() as u64)
            .u64("slot", slot as u64)
            .u64("threads_handed_off", handed_off as u64)
            .bool("thread_lost", matches!(thread, ForcedThread::Lost(_)));
        match (thread, forced) {
            (ForcedThread::None, _) => {}
            (ForcedThread::Resumed { to_user, rip }, _) => {
                o.str("thread_resumed", if to_user { "user" } else { "kernel" })
                    .hex("rip", rip);
            }
            (ForcedThread::Lost(why), state) => {
                o.str("lost_because", why.name());
                if let Ok(state) = state {
                    o.hex("rip", state.rip).hex("rflags", state.rflags);
                }
            }
        }
    });
}

fn act(action: Action, now: u64) {
    match action {
        Action::BringUp { core, slot } => {
            debug!("control: grant of {core}, starting it in slot {slot}");
            if !smp::bring_up(core, slot, now) {
                with_table(|table| table.abandon(core));
            }
        }
        Action::ResendStartup { core } => smp::resend_startup(core),
        Action::Drain { core, slot } => {
            debug!("control: {core} in slot {slot} leaves");
            smp::revoke_received(slot, now);
            sched::drain(slot);
        }
        Action::Ignore { core, why } => {
            debug!("control: event for {core} ignored: {}", why.as_str());
            console::marker("lavender_core_event_ignored", |o| {
                o.u64("core", core.index() as u64).str("why", why.as_str());
            });
        }
    }
}

/// The timer tick's share of the channel: events, start-up retries and load reports (their
/// markers are printed later, by [`print_markers`]).
pub fn tick() {
    poll();
    flush_events();
    let now = time::now();
    if let Some(action) =
        with_table(|table| table.tick(now, time::us_to_ticks(STARTUP_RETRY_US))).flatten()
    {
        act(action, now);
    }
    report(now);
}

/// The scheduler's load may have changed (a thread was created, a core went idle): a report
/// goes out now if the runnable threads or the request changed (at most every
/// [`CHANGE_REPORT_SPACING_US`]), so a load step reaches the cooperative policy without
/// waiting for a timer tick.
pub fn load_changed() {
    report(time::now());
}

/// The started `core` reached its Rust entry.
pub fn checked_in(core: CoreId) {
    let now = time::now();
    if let Some(action) = with_table(|table| table.checked_in(core, now)).flatten() {
        act(action, now);
    }
}

/// The started `core` is scheduling: tell the hypervisor.
pub fn online(core: CoreId) {
    owe_event(CoreEvent::Online { core });
}

/// The core leaving `slot` is about to hand itself back: the cores that stay free its slot in
/// the table and tell the hypervisor ([`note_releases`]). The leaving core only sets a bit: at
/// Bochs's 50 instructions per microsecond, the table's lock and the event queue cost it
/// microseconds of its release.
pub fn released(slot: usize) {
    RELEASED_SLOTS.fetch_or(1 << slot, Ordering::Release);
}

/// Notes the releases of cores that left ([`released`]): hands off the threads each left
/// behind, frees their slots in the table and queues their `Released` events and markers.
/// Runs on the core the leaving one had the hypervisor wake, before any event is acted on (a
/// grant of the same core must find it `Absent`), and from ticks and idle loops.
pub fn note_releases() {
    if RELEASED_SLOTS.load(Ordering::Acquire) != 0 {
        with_table(note_releases_in);
    }
}

fn note_releases_in(table: &mut CoreTable) {
    if RELEASED_SLOTS.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut slots = RELEASED_SLOTS.swap(0, Ordering::AcqRel);
    while slots != 0 {
        let slot = slots.trailing_zeros() as usize;
        slots &= slots - 1;
        let Some(core) = CoreId::new(u64::from(sched::core_of(slot))) else {
            continue;
        };
        sched::hand_off(slot);
        table.released(core);
        owe_event(CoreEvent::Released { core });
        smp::note_released(slot, core);
    }
}

/// Queues `event` for ring 2, for [`flush_events`] to push later. Ring 2's events are news the
/// hypervisor has already: it saw a started core enter, and a leaving core's CoreRelease
/// hypercall is what hands the core back. Encoding and pushing them on the way (or ringing a
/// doorbell, an exit) would only delay bring-up and release, so they wait for a core with
/// time to spare: a timer tick or an idle loop with nothing to run.
fn owe_event(event: CoreEvent) {
    let mut guard = OUTBOX.lock();
    let Some(outbox) = guard.as_mut() else {
        return;
    };
    if outbox.owed.len() == OWED_EVENTS {
        // Pushing now keeps the queue from allocating.
        push_owed(outbox);
    }
    outbox.owed.push_back(event);
}

/// Pushes the events [`owe_event`] queued, in order, on ring 2.
pub fn flush_events() {
    note_releases();
    if let Some(outbox) = OUTBOX.lock().as_mut() {
        push_owed(outbox);
    }
}

fn push_owed(outbox: &mut Outbox) {
    while let Some(event) = outbox.owed.pop_front() {
        let mut record = Record64::ZERO;
        let pushed = event
            .encode(&mut record.0)
            .map_err(|_| ())
            .and_then(|_| outbox.events.try_push_record(&record).map_err(|_| ()));
        if pushed.is_err() {
            warn!("control: ring 2 full or broken, {event:?} not sent");
        }
    }
}

/// The scheduler's load over the window since the last report, and each slot's busy ticks now.
fn measure(reporter: &Reporter, now: u64) -> (Summary, [u64; MAX_CORE_SLOTS]) {
    let window = now.wrapping_sub(reporter.last_at);
    let mut busy_now = reporter.last_busy;
    let mut runnable = sched::handed_off();
    let mut per_core = [(CoreId::ZERO, 0u16); MAX_CORE_SLOTS];
    let mut count = 0;
    for (slot, busy_slot) in busy_now.iter_mut().enumerate() {
        if let Some((index, busy, threads)) = sched::slot_load(slot, now) {
            let core = CoreId::new(u64::from(index)).unwrap_or(CoreId::ZERO);
            let permille = load::permille(busy.wrapping_sub(reporter.last_busy[slot]), window);
            *busy_slot = busy;
            runnable += threads;
            per_core[count] = (core, permille);
            count += 1;
        }
    }
    // The request is filled in by `report`, which steadies it.
    let mut summary = Summary::new(runnable, 0);
    for (core, permille) in &per_core[..count] {
        summary.set_busy(*core, *permille);
    }
    (summary, busy_now)
}

/// Publishes a load report when one is due or the load changed; with `load_markers=on`, prints
/// `lavender_load` when it changed significantly, at most every [`MARKER_PERIOD_US`].
fn report(now: u64) {
    let Some(mut guard) = REPORTER.try_lock() else {
        return;
    };
    let Some(reporter) = guard.as_mut() else {
        return;
    };
    let (mut summary, busy) = measure(reporter, now);
    // Cores are asked for the threads that can run at once, not for a process's threads
    // beyond its core limit; the report's runnable count stays the whole count.
    (summary.delta, summary.final_offer) = reporter.steady_request(sched::usable_runnable(), now);
    let window = now.wrapping_sub(reporter.last_at);
    let changed = reporter.last_sent.is_none_or(|last| {
        last.runnable != summary.runnable
            || last.delta != summary.delta
            || last.final_offer != summary.final_offer
            || last.cores != summary.cores
    });
    // A request for more cores than the last report asked for goes at once: a job that
    // starts its threads within the spacing of its first thread's report (every job does)
    // would otherwise wait for the next timer tick, 5 ms, before the hypervisor heard. At most
    // one such report follows each spaced one, so the spacing still bounds the rate.
    let asks_more = summary.delta > 0
        && reporter
            .last_sent
            .is_none_or(|last| summary.delta > last.delta);
    let due = window >= time::us_to_ticks(REPORT_PERIOD_US)
        || (changed && window >= time::us_to_ticks(CHANGE_REPORT_SPACING_US))
        || asks_more;
    if !due {
        return;
    }
    let mut report = LoadReport::new(
        time::ticks_to_us(now).saturating_mul(1000),
        time::ticks_to_us(window).min(u64::from(u32::MAX)) as u32,
        summary.runnable,
        summary.delta,
    )
    // Lavender's workloads compute; threads waiting on delegated calls are not runnable.
    .with_hint(WorkloadHint::Compute)
    .with_final_offer(summary.final_offer);
    // A report takes 32 + 2n bytes (ABI.md, "Messages"): as many cores as the ring's slots
    // hold (all 64 in 256-byte slots).
    let capacity = reporter.producer.payload_capacity().min(REPORT_BYTES);
    for core in summary.cores.iter().take(capacity.saturating_sub(32) / 2) {
        report.set_busy(
            core,
            Permille::new(summary.busy(core)).unwrap_or(Permille::FULL),
        );
    }
    let mut bytes = [0u8; REPORT_BYTES];
    let pushed = report
        .encode(&mut bytes)
        .map_err(|_| ())
        .and_then(|len| reporter.producer.try_push(&bytes[..len]).map_err(|_| ()));
    if pushed.is_err() {
        reporter.dropped += 1;
    } else if changed {
        // The hypervisor reads the ring at its next look; a changed request asks it to look
        // now (it sleeps on no ring, so there is no doorbell to ring).
        let _ = hypercall::load_report_kick();
    }
    reporter.last_at = now;
    reporter.last_busy = busy;
    reporter.last_sent = Some(summary);
    let marker_due = LOAD_MARKERS.load(Ordering::Relaxed)
        && match reporter.last_marker {
            None => true,
            Some((at, last)) => {
                summary.significant_since(Some(&last))
                    && now.wrapping_sub(at) >= time::us_to_ticks(MARKER_PERIOD_US)
            }
        };
    if marker_due {
        reporter.last_marker = Some((now, summary));
        reporter.pending_marker = Some((now, summary, reporter.dropped));
    }
}

/// Prints the markers the channel and the cores left for later: the due `lavender_load` and
/// those of cores that came and went. Called from an idle loop with interrupts on: formatting
/// a marker takes thousands of instructions (tens of microseconds under Bochs), which the
/// timer tick that notes them cannot spend with interrupts off, where it would hold up a core
/// grant or revoke aimed at that core.
pub fn print_markers() {
    let pending = REPORTER
        .try_lock()
        .and_then(|mut guard| guard.as_mut()?.pending_marker.take());
    if let Some((now, summary, dropped)) = pending {
        console::marker("lavender_load", |o| {
            o.u64("runnable", u64::from(summary.runnable))
                .array("cores", |a| {
                    for core in summary.cores.iter() {
                        a.u64(core.index() as u64);
                    }
                })
                .array("busy_permille", |a| {
                    for core in summary.cores.iter() {
                        a.u64(u64::from(summary.busy(core)));
                    }
                })
                .i64("delta", i64::from(summary.delta))
                .u64("timestamp_us", time::ticks_to_us(now))
                .u64("dropped", dropped);
        });
    }
    smp::print_deferred_markers();
}
