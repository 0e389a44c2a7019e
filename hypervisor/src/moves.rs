//! Cross-guest core moves asked for by a guest's holder (`CORE_MOVE`; in Linux, `vmctl
//! move-core` through the PV agent), and the status page each guest's holder reads.
//!
//! A move runs on the BSP, one at a time, through the core manager:
//! revoke (the owner is told on its control channel) -> parked -> grant (the target is told)
//! -> the target's vCPU enters -> (Linux) the agent confirms the CPU is online.
//! Linux is never forced: a revoke it declines (`Declined` with a reason) or cannot honour by
//! the deadline is cancelled and the core stays Linux's. Lavender cooperates and, like in the
//! core test, is forced past the deadline; it may decline a *negotiable* revoke (a policy's,
//! or a holder's move asked with `negotiable`) before the deadline, and keeps the core then. Linux has no handler for the control vector, so it is
//! never interrupted: the agent polls its ring.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use core::fmt::Write as _;

use heapless::{Deque, String, Vec};
use spin::Mutex;
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{CoreState, Status};
use vmcall_proto::marker::{write_object, JsonObject};
use vmcall_proto::message::{CoreEvent, DeclineReason};

use crate::arch::cpu;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::{CpuState, CPUS};
use crate::cores::{Reason, Requester, Stage, CORES};
use crate::guest::control::CONTROL_VECTOR;
use crate::guest::{self, Guest, GuestState};
use crate::move_rules::{self, GuestCores, RevokeEnd};
use crate::partition::{GuestKind, MAX_GUESTS};
use crate::platform::MAX_CPUS;
use crate::{console, monitor, time, vcpu};

/// A move's timeout when the caller gives none (virtual time under Bochs).
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// The longest timeout a caller may ask for.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Moves kept for the status page (`vmctl trace`).
const HISTORY: usize = 8;

struct Request {
    id: u32,
    core: usize,
    to: u8,
    timeout_us: u64,
    /// The holder (`CORE_MOVE`) or the hypervisor's policy.
    by: Requester,
    /// Why: `vmctl` for a holder's move, the policy's reason for its own.
    reason: &'static str,
    /// The owner may decline the revoke.
    negotiable: bool,
}

static PENDING: Mutex<Option<Request>> = Mutex::new(None);
/// Set from the request until the move's result is published: one move at a time.
static IN_FLIGHT: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
/// Core events the guests sent on their control channels, for the move in flight.
static EVENTS: Mutex<Deque<(u8, CoreEvent), 32>> = Mutex::new(Deque::new());
static RESULTS: Mutex<Deque<MoveResult, HISTORY>> = Mutex::new(Deque::new());
static COUNTS: Mutex<Counts> = Mutex::new(Counts::ZERO);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The owner declined the revoke: it keeps the core.
    Refused,
    /// The owner did not give the core back by the deadline: the revoke was called off.
    Cancelled,
    /// The target did not start the core by the deadline: the grant was withdrawn and the
    /// core is in the hypervisor's pool.
    Timeout,
    /// The core manager refused a step (the core changed hands meanwhile).
    Failed,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Refused => "refused",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy)]
struct Counts {
    done: u64,
    refused: u64,
    cancelled: u64,
    timeouts: u64,
    failed: u64,
    forced: u64,
}

impl Counts {
    const ZERO: Self = Self {
        done: 0,
        refused: 0,
        cancelled: 0,
        timeouts: 0,
        failed: 0,
        forced: 0,
    };
}

#[derive(Clone)]
struct MoveResult {
    id: u32,
    core: usize,
    from: Option<u8>,
    to: u8,
    by: Requester,
    reason: &'static str,
    outcome: Outcome,
    /// Why the owner declined, when it did.
    declined: Option<DeclineReason>,
    forced: bool,
    /// Each stage's name and duration (µs, TSC time), in order.
    stages: Vec<(&'static str, u64), 8>,
    total_us: u64,
    /// When the move ended (µs since boot).
    at_us: u64,
    /// The TSC when the move began (its revoke), to pair its stages with a guest's own TSC
    /// stamps (`cargo xtask bench --only moves`).
    start_tsc: u64,
}

/// The move counts' names, in the order of [`counts`].
pub const COUNT_NAMES: [&str; 6] = [
    "done",
    "refused",
    "cancelled",
    "timeouts",
    "failed",
    "forced",
];

/// Moves since boot by outcome, and how many were forced, in [`COUNT_NAMES`] order.
pub fn counts() -> [u64; 6] {
    let c = *COUNTS.lock();
    [
        c.done,
        c.refused,
        c.cancelled,
        c.timeouts,
        c.failed,
        c.forced,
    ]
}

/// `CORE_MOVE` flag: the owner may decline the revoke.
pub const MOVE_NEGOTIABLE: u64 = 1;

/// `CORE_MOVE` from guest `by`: checks the request and hands it to the BSP; the move's id.
pub fn request(by: u8, core: u64, to: u64, timeout_ms: u64, flags: u64) -> Result<u32, Status> {
    if flags & !MOVE_NEGOTIABLE != 0 {
        return Err(Status::InvalidArgument);
    }
    let guests: Vec<GuestCores, MAX_GUESTS> = guest::all()
        .iter()
        .map(|g| GuestCores {
            allowed: g.config.allowed_cores.0,
            boot_core: g.config.boot_core.index(),
        })
        .collect();
    let owner = usize::try_from(core).ok().and_then(|c| CORES.owner(c));
    let (core, to) = move_rules::check(core, to, &guests, core_count(), owner)
        .map_err(move_rules::MoveRefused::status)?;
    if guest::by_id(to).is_none_or(|g| g.state() != GuestState::Running) {
        return Err(Status::InvalidArgument);
    }
    let timeout_ms = match timeout_ms {
        0 => DEFAULT_TIMEOUT_MS,
        ms => ms.min(MAX_TIMEOUT_MS),
    };
    if IN_FLIGHT
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(Status::Busy);
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    log::debug!("guest {by} asks to move cpu{core} to guest {to} (move {id})");
    *PENDING.lock() = Some(Request {
        id,
        core,
        to,
        timeout_us: timeout_ms * 1000,
        by: Requester::Holder,
        reason: "vmctl",
        negotiable: flags & MOVE_NEGOTIABLE != 0,
    });
    vcpu::notify_monitor();
    Ok(id)
}

/// A core event a guest sent on its control channel (the BSP drains the channels).
pub fn guest_event(guest: u8, event: CoreEvent) {
    log::debug!("guest {guest} reports {event:?}");
    let mut events = EVENTS.lock();
    if events.is_full() {
        events.pop_front();
    }
    let _ = events.push_back((guest, event));
}

/// On the BSP: runs the move asked for, if any, and publishes every guest's status page.
pub fn poll() {
    let request = PENDING.lock().take();
    if let Some(request) = request {
        // The status pages show the move in flight while it runs (`vmctl status`).
        publish();
        execute(&request);
        IN_FLIGHT.store(false, Ordering::Release);
    }
    publish();
}

/// On the BSP, for the policy engine: moves `core` to guest `to` now (from its owner, or from
/// the pool), for `reason`; the owner may decline. `None` when another move is in flight; else
/// the move's id, outcome and, if the owner declined, why.
pub fn run_for_policy(
    core: usize,
    to: u8,
    reason: &'static str,
    timeout_ms: u64,
) -> Option<(u32, Outcome, Option<DeclineReason>)> {
    if IN_FLIGHT
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return None;
    }
    let request = Request {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        core,
        to,
        timeout_us: timeout_ms.min(MAX_TIMEOUT_MS) * 1000,
        by: Requester::Hypervisor,
        reason,
        negotiable: true,
    };
    let (outcome, declined) = execute(&request);
    IN_FLIGHT.store(false, Ordering::Release);
    publish();
    Some((request.id, outcome, declined))
}

/// Whether a move is in flight.
pub fn in_flight() -> bool {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Runs `request` and records its result (marker, counts, history); its outcome and the
/// owner's reason if it declined.
fn execute(request: &Request) -> (Outcome, Option<DeclineReason>) {
    {
        EVENTS.lock().clear();
        // Shows the move in flight.
        publish();
        let result = run(request);
        let outcome = (result.outcome, result.declined);
        console::marker("core_move", |o| result_fields(o, &result));
        let mut counts = COUNTS.lock();
        match result.outcome {
            Outcome::Done => counts.done += 1,
            Outcome::Refused => counts.refused += 1,
            Outcome::Cancelled => counts.cancelled += 1,
            Outcome::Timeout => counts.timeouts += 1,
            Outcome::Failed => counts.failed += 1,
        }
        counts.forced += u64::from(result.forced);
        drop(counts);
        crate::stats_page::record_move(
            result.from,
            result.to,
            result.outcome == Outcome::Done,
            &result.stages,
            result.total_us,
        );
        let mut results = RESULTS.lock();
        if results.is_full() {
            results.pop_front();
        }
        let _ = results.push_back(result);
        outcome
    }
}

pub(crate) fn core_count() -> usize {
    (0..MAX_CPUS)
        .take_while(|&c| c == 0 || CPUS[c].state() != CpuState::Absent)
        .count()
}

fn us(ticks: u64) -> u64 {
    ticks / (time::tsc_hz() / 1_000_000).max(1)
}

/// Tells `guest` of `event`; Lavender also gets the control interrupt on core `at`.
fn notify(guest: &Guest, event: CoreEvent, at: Option<usize>) {
    let Some(control) = &guest.control else {
        return;
    };
    if let Err(e) = control.send(event) {
        log::warn!("moves: cannot queue {event:?} for '{}': {e}", guest.name());
    }
    if guest.config.kind == GuestKind::Lavender {
        if let Some(core) = at {
            LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), CONTROL_VECTOR);
        }
    }
}

/// Polls `done` (and every guest's control channel) until it gives an answer or `deadline`
/// (TSC) passes.
fn wait_for<T>(deadline: u64, mut done: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(answer) = done() {
            return Some(answer);
        }
        for guest in guest::all() {
            monitor::poll_control(guest);
        }
        console::drain_ready();
        // A long move must not keep `vmctl stats` waiting.
        crate::stats_page::poll();
        if cpu::read_tsc() > deadline {
            return done();
        }
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
    }
}

/// Whether `guest` sent `wanted` for `core` since the move began (consumed when found).
fn event_from(guest: u8, wanted: fn(CoreEvent) -> bool, core: usize) -> bool {
    let mut events = EVENTS.lock();
    let found = events
        .iter()
        .position(|&(g, e)| g == guest && e.core().index() == core && wanted(e));
    if let Some(at) = found {
        // Deque has no remove: rotate the match to the front and drop it.
        for _ in 0..at {
            if let Some(e) = events.pop_front() {
                let _ = events.push_back(e);
            }
        }
        events.pop_front();
    }
    found.is_some()
}

/// The reason of a `Declined` that `guest` sent for `core` since the move began (consumed when
/// found).
fn declined_by(guest: u8, core: usize) -> Option<DeclineReason> {
    let mut events = EVENTS.lock();
    let at = events.iter().position(|&(g, e)| {
        g == guest && e.core().index() == core && matches!(e, CoreEvent::Declined { .. })
    })?;
    let mut reason = None;
    for i in 0..=at {
        let Some(e) = events.pop_front() else { break };
        if i == at {
            if let (_, CoreEvent::Declined { reason: r, .. }) = e {
                reason = Some(r);
            }
        } else {
            let _ = events.push_back(e);
        }
    }
    // The events before it went to the back: put them in front again.
    for _ in 0..at {
        if let Some(e) = events.pop_back() {
            let _ = events.push_front(e);
        }
    }
    reason
}

/// Stages of a move as (name, TSC), in any order.
type Stamps = Vec<(&'static str, u64), 8>;

/// Sorts `stamps` and makes each a duration from the one before (the first from `start`).
fn stages(start: u64, stamps: &mut Stamps) -> Vec<(&'static str, u64), 8> {
    stamps.sort_unstable_by_key(|&(_, tsc)| tsc);
    let mut previous = start;
    stamps
        .iter()
        .map(|&(name, tsc)| {
            let took = us(tsc.saturating_sub(previous));
            previous = previous.max(tsc);
            (name, took)
        })
        .collect()
}

fn run(request: &Request) -> MoveResult {
    let start = cpu::read_tsc();
    let deadline = start + time::ticks_for_us(request.timeout_us);
    let core = request.core;
    let word = CORES.word(core);
    let mut result = MoveResult {
        id: request.id,
        core,
        from: word.owner,
        to: request.to,
        by: request.by,
        reason: request.reason,
        outcome: Outcome::Done,
        declined: None,
        forced: false,
        stages: Vec::new(),
        total_us: 0,
        at_us: 0,
        start_tsc: start,
    };
    let mut stamps = Stamps::new();
    let outcome = run_stages(request, deadline, &mut result, &mut stamps);
    result.outcome = outcome;
    result.stages = stages(start, &mut stamps);
    result.total_us = us(cpu::read_tsc() - start);
    result.at_us = time::now_us();
    result
}

/// The stages of a move, stamped into `stamps`; its outcome.
fn run_stages(
    request: &Request,
    deadline: u64,
    result: &mut MoveResult,
    stamps: &mut Stamps,
) -> Outcome {
    let core = request.core;
    let by = request.by;
    let Some(target) = guest::by_id(request.to) else {
        return Outcome::Failed;
    };
    let core_id = CoreId::new(core as u64).expect("core indices are below 64");
    let record = || CORES.record(core).expect("a core of the machine");
    let word = CORES.word(core);
    if let Some(owner) = word.owner.and_then(guest::by_id) {
        let linux = owner.config.kind == GuestKind::Linux;
        match word.state {
            // An offline Linux CPU, or a grant not started: nothing runs there.
            CoreState::Granted => {
                if CORES
                    .withdraw(core, owner.id, by, Reason::Withdrawn, cpu::read_tsc())
                    .is_err()
                {
                    return Outcome::Failed;
                }
                let _ = stamps.push(("withdrawn", record().at(Stage::Parked)));
            }
            CoreState::Owned => {
                if CORES.revoke(core, owner.id, by, cpu::read_tsc()).is_err() {
                    return Outcome::Failed;
                }
                let left_us = us(deadline.saturating_sub(cpu::read_tsc()));
                let deadline_us = u32::try_from(left_us).unwrap_or(u32::MAX);
                notify(
                    owner,
                    CoreEvent::Revoke {
                        core: core_id,
                        deadline_us,
                        negotiable: request.negotiable,
                    },
                    Some(core),
                );
                // Linux: the agent reports `Released` once the CPU is offline, or `Declined`
                // when it keeps it; the vCPU parks when the dead CPU halts (before or after
                // the agent hears back from sysfs). Lavender may decline only a negotiable
                // revoke; a decline of another is ignored and the deadline holds.
                let may_decline = linux || request.negotiable;
                let mut offline_at = None;
                let answer = wait_for(deadline, || {
                    if linux
                        && offline_at.is_none()
                        && event_from(owner.id, |e| matches!(e, CoreEvent::Released { .. }), core)
                    {
                        offline_at = Some(cpu::read_tsc());
                    }
                    if let Some(reason) = declined_by(owner.id, core).filter(|_| may_decline) {
                        result.declined = Some(reason);
                        return Some(false);
                    }
                    let parked = CORES.state(core) == CoreState::Parked;
                    (parked && (!linux || offline_at.is_some())).then_some(true)
                });
                if let Some(at) = offline_at {
                    let _ = stamps.push(("linux_offline", at));
                }
                let parked_now = CORES.state(core) == CoreState::Parked;
                let end = move_rules::revoke_end(linux, answer, parked_now);
                if end != RevokeEnd::Proceed {
                    if let RevokeEnd::CallOff { refused } = end {
                        // If the core parked in the meantime the move goes on.
                        if CORES.cancel(core, owner.id, by).is_ok() {
                            return if refused {
                                Outcome::Refused
                            } else {
                                Outcome::Cancelled
                            };
                        }
                    } else if crate::faults::force(owner, core, Requester::Hypervisor) {
                        result.forced = true;
                    }
                    let far = cpu::read_tsc() + time::ticks_for_us(request.timeout_us);
                    let parked = || (CORES.state(core) == CoreState::Parked).then_some(());
                    if wait_for(far, parked).is_none() {
                        return Outcome::Failed;
                    }
                    if result.forced {
                        crate::faults::taken(owner, core, deadline_us);
                    }
                }
                let r = record();
                if r.at(Stage::ReleaseCalled) > r.at(Stage::Revoked) {
                    let _ = stamps.push(("release_call", r.at(Stage::ReleaseCalled)));
                }
                let _ = stamps.push(("parked", r.at(Stage::Parked)));
            }
            _ => return Outcome::Failed,
        }
    }

    // The core is the hypervisor's: give it to the target.
    if vcpu::grant(core, target.id, by).is_err() {
        return Outcome::Failed;
    }
    let generation = record().generation;
    // A granted core is not running yet: Lavender hears of it on a core it runs on.
    notify(
        target,
        CoreEvent::Grant { core: core_id },
        CORES.first_owned(target.id),
    );
    let entered = || {
        let r = record();
        (r.generation == generation && r.at(Stage::Entered) != 0).then_some(())
    };
    if wait_for(deadline, entered).is_none() {
        let _ = CORES.withdraw(core, target.id, by, Reason::Withdrawn, cpu::read_tsc());
        return Outcome::Timeout;
    }
    let r = record();
    let _ = stamps.push(("startup_ipi", r.at(Stage::Startup)));
    let _ = stamps.push(("entered", r.at(Stage::Entered)));
    if target.config.kind == GuestKind::Linux {
        // The agent confirms once Linux schedules on the CPU.
        let online = || {
            event_from(target.id, |e| matches!(e, CoreEvent::Online { .. }), core)
                .then(cpu::read_tsc)
        };
        if let Some(at) = wait_for(deadline, online) {
            let _ = stamps.push(("linux_online", at));
        }
    }
    Outcome::Done
}

fn result_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>, r: &MoveResult) {
    let name = |id: Option<u8>| id.and_then(guest::by_id).map_or("hypervisor", |g| g.name());
    o.u64("id", r.id.into())
        .u64("core", r.core as u64)
        .str("from", name(r.from))
        .str("to", name(Some(r.to)))
        .str("outcome", r.outcome.name())
        .str("by", requester_name(r.by))
        .str("reason", r.reason)
        .bool("forced", r.forced)
        .str("decline_reason", r.declined.map_or("", DeclineReason::name))
        .u64("total_us", r.total_us)
        .u64("at_us", r.at_us)
        .u64("start_tsc", r.start_tsc);
    // An array, so the stages keep their order.
    o.array("stages", |a| {
        for &(stage, us) in &r.stages {
            a.object(|s| {
                s.str("stage", stage).u64("us", us);
            });
        }
    });
}

fn state_name(state: CoreState) -> &'static str {
    match state {
        CoreState::Owned => "owned",
        CoreState::Releasing => "releasing",
        CoreState::Parked => "parked",
        CoreState::Granted => "granted",
    }
}

fn reason_name(why: Reason) -> &'static str {
    match why {
        Reason::Boot => "boot",
        Reason::Grant => "grant",
        Reason::Revoke => "revoke",
        Reason::Released => "released",
        Reason::Deadline => "deadline",
        Reason::Withdrawn => "withdrawn",
        Reason::Halted => "halted",
        Reason::Stopped => "stopped",
        Reason::Cancelled => "cancelled",
    }
}

fn requester_name(by: Requester) -> &'static str {
    match by {
        Requester::Config => "config",
        Requester::Hypervisor => "hypervisor",
        Requester::Guest => "guest",
        Requester::Holder => "holder",
    }
}

/// The last status document published, without its time stamp: a page that did not change
/// is not written again (readers retry while the page is being written, so a page rewritten on
/// every wake-up of the BSP would keep them waiting).
static LAST_PAGE: Mutex<String<12288>> = Mutex::new(String::new());

/// The status page (see ABI.md, "Status page"), written for every guest with a control
/// channel when it changed.
fn publish() {
    let mut body: String<12288> = String::new();
    if write_object(&mut body, status_fields).is_err() {
        log::warn!("status page larger than its buffer; not published");
        return;
    }
    let mut last = LAST_PAGE.lock();
    if *last == body {
        return;
    }
    let mut page: String<12352> = String::new();
    // `body` is a JSON object: the time stamp goes in front of its first member.
    let stamped = write!(page, "{{\"published_us\":{},", time::now_us()).and_then(|()| {
        page.push_str(body.get(1..).unwrap_or("}"))
            .map_err(|_| core::fmt::Error)
    });
    if stamped.is_err() {
        log::warn!("status page larger than its buffer; not published");
        return;
    }
    *last = body;
    drop(last);
    for guest in guest::all() {
        if let Some(control) = &guest.control {
            control.publish_status(page.as_bytes());
        }
    }
}

fn status_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>) {
    let results = RESULTS.lock();
    let name = |id: Option<u8>| id.and_then(guest::by_id).map_or("hypervisor", |g| g.name());
    o.str("clock", "tsc");
    o.bool("move_in_flight", IN_FLIGHT.load(Ordering::Acquire));
    o.array("cores", |a| {
        for core in 0..core_count() {
            let word = CORES.word(core);
            let record = CORES.record(core);
            a.object(|c| {
                c.u64("core", core as u64)
                    .str("owner", name(word.owner))
                    .str("state", state_name(word.state));
                if let Some(r) = record {
                    let since = r.at.iter().copied().max().unwrap_or(0);
                    c.u64("since_us", us(since))
                        .str("last_reason", reason_name(r.why))
                        .str("last_by", requester_name(r.by));
                }
                if let Some(last) = results.iter().rev().find(|m| m.core == core) {
                    c.u64("last_move_id", last.id.into())
                        .u64("last_move_us", last.total_us)
                        .str("last_move_outcome", last.outcome.name());
                }
            });
        }
    });
    o.array("guests", |a| {
        for g in guest::all() {
            a.object(|j| {
                let state = match g.state() {
                    GuestState::Running => "running",
                    GuestState::Halted => "halted",
                    GuestState::Stopped => "stopped",
                };
                j.u64("id", g.id.into())
                    .str("name", g.name())
                    .str(
                        "kind",
                        match g.config.kind {
                            GuestKind::Lavender => "lavender",
                            GuestKind::Linux => "linux",
                        },
                    )
                    .str("state", state)
                    .u64("boot_core", g.config.boot_core.index() as u64);
                let cores = |j: &mut JsonObject<'_, W>, key, mask: u64| {
                    j.array(key, |a| {
                        for c in (0..64).filter(|c| mask & (1 << c) != 0) {
                            a.u64(c);
                        }
                    });
                };
                cores(j, "allowed", g.config.allowed_cores.0);
                cores(j, "held", CORES.running_cores(g.id));
                if let Some((runnable, busy)) = monitor::last_load(g.id) {
                    j.object("load", |l| {
                        l.u64("runnable", runnable.into())
                            .u64("busy_permille", busy.into());
                    });
                }
            });
        }
    });
    o.object("policy", crate::policy_engine::status_fields);
    let counts = *COUNTS.lock();
    o.object("counts", |c| {
        c.u64("done", counts.done)
            .u64("refused", counts.refused)
            .u64("cancelled", counts.cancelled)
            .u64("timeouts", counts.timeouts)
            .u64("failed", counts.failed)
            .u64("forced", counts.forced);
    });
    o.array("moves", |a| {
        for r in results.iter() {
            a.object(|m| result_fields(m, r));
        }
    });
}
