//! Cross-guest core moves asked for by a guest's holder (`CORE_MOVE`; in Linux, `vmctl
//! move-core` through the PV agent) or by the policy engine, and the status page each
//! guest's holder reads.
//!
//! One move at a time, through the core manager: revoke (the owner is told on its control
//! channel) -> parked -> grant (the target is told) -> the target's vCPU enters -> (Linux)
//! the agent confirms the CPU is online, or (from Linux) that the CPU's offline ended. A
//! Linux CPU parks when it is dead (it halts with interrupts off at the end of its offline);
//! Linux's own bookkeeping for it (the sysfs write returns some 10 ms later under Bochs) does
//! not hold the core from its next guest, but the move ends only once the agent confirms. A move never waits in place: each pass of the
//! monitor (`monitor.rs`) looks at it once and takes the steps it can, so passes may run on
//! the guests' own cores, also on a core of the guest that is asked to let one go.
//! Linux is never forced: a revoke it declines (`Declined` with a reason) or cannot honour by
//! the deadline is cancelled and the core stays Linux's. Lavender cooperates and, like in the
//! core test, is forced past the deadline; it may decline a *negotiable* revoke (a policy's,
//! or a holder's move asked with `negotiable`) before the deadline, and keeps the core then.
//! Linux has no handler for the control vector, so it is never interrupted: the agent polls
//! its ring.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use core::fmt::Write as _;

use heapless::{Deque, String, Vec};
use spin::Mutex;
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{CoreState, Status};
use vmcall_proto::marker::{write_object, JsonObject};
use vmcall_proto::message::{CoreEvent, DeclineReason};

use crate::arch::cpu;
use crate::arch::percpu::{CpuState, CPUS};
use crate::cores::{Reason, Requester, Stage, CORES};
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
    /// `None`: the core goes back to the pool (a policy's release).
    to: Option<u8>,
    timeout_us: u64,
    /// The holder (`CORE_MOVE`) or the hypervisor's policy.
    by: Requester,
    /// Why: `vmctl` for a holder's move, the policy's reason for its own.
    reason: &'static str,
    /// The owner may decline the revoke.
    negotiable: bool,
}

/// A holder's move, until the monitor's next pass starts it.
static PENDING: Mutex<Option<Request>> = Mutex::new(None);
/// The move in flight: the monitor's pass (one at a time) advances it, and so does the core
/// it waits for as it parks ([`core_parked`]).
static CURRENT: Mutex<Option<InFlight>> = Mutex::new(None);
/// Set from the request until the move's result is published: one move at a time.
static IN_FLIGHT: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
/// Core events the guests sent on their control channels, for the move in flight.
static EVENTS: Mutex<Deque<(u8, CoreEvent), 32>> = Mutex::new(Deque::new());
static RESULTS: Mutex<Deque<MoveResult, HISTORY>> = Mutex::new(Deque::new());
static COUNTS: Mutex<Counts> = Mutex::new(Counts::ZERO);
/// When the status pages were last published (µs since boot).
static LAST_PUBLISH_US: AtomicU64 = AtomicU64::new(0);
/// The status pages are published at least this often while something (a guest's load, the
/// policy's samples) may have changed, and at the next pass when a move starts or ends or the
/// policy changes ([`publish_soon`]): building one takes about a millisecond of a core under
/// Bochs, too much for every pass of the monitor, which may run on a guest's core.
const PUBLISH_EVERY_US: u64 = 100_000;

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
    /// `None`: the pool.
    to: Option<u8>,
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

/// `CORE_MOVE` from guest `by`: checks the request and leaves it for the monitor's next pass; the move's id.
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
        to: Some(to),
        timeout_us: timeout_ms * 1000,
        by: Requester::Holder,
        reason: "vmctl",
        negotiable: flags & MOVE_NEGOTIABLE != 0,
    });
    crate::monitor::wake();
    Ok(id)
}

/// A core event a guest sent on its control channel (the monitor drains the channels).
pub fn guest_event(guest: u8, event: CoreEvent) {
    log::debug!("guest {guest} reports {event:?}");
    let mut events = EVENTS.lock();
    if events.is_full() {
        events.pop_front();
    }
    let _ = events.push_back((guest, event));
}

/// From the monitor's pass: starts the move a holder asked for when none is in flight, and
/// takes the steps of the one in flight that need no waiting (ending it, if it can).
pub fn advance() {
    let mut current = CURRENT.lock();
    if current.is_none() {
        if let Some(request) = PENDING.lock().take() {
            *current = Some(InFlight::new(request));
            publish_soon();
        }
    }
    take_steps(&mut current);
}

/// From core `core` as it parks (`vcpu::leave`): when the move in flight waits for that
/// core to leave its owner, takes its next step at once (the grant to the target, which
/// tells the target), rather than leaving it to the monitor's next pass; the steps after it
/// are the monitor's, which `leave` wakes, so that this core goes on to its clean-up (the
/// target's STARTUP waits for it). A pass that holds the move meanwhile is waited for: it
/// holds it for one look (no step waits), and one that looked just before the park would
/// have left the grant to the next pass.
pub fn core_parked(core: usize) {
    let mut current = CURRENT.lock();
    let Some(m) = current
        .as_mut()
        .filter(|m| m.request.core == core && m.awaits_park())
    else {
        return;
    };
    match m.step() {
        Progress::Waiting => {}
        Progress::Next(wait) => m.wait = wait,
        Progress::End(outcome) => end(&mut current, outcome),
    }
}

/// Advances the move in flight; ends it if it can.
fn take_steps(current: &mut Option<InFlight>) {
    if let Some(outcome) = current.as_mut().and_then(InFlight::advance) {
        end(current, outcome);
    }
}

/// Ends the move in flight with `outcome`.
fn end(current: &mut Option<InFlight>, outcome: Outcome) {
    if let Some(mut ended) = current.take() {
        finish(&mut ended, outcome);
    }
    IN_FLIGHT.store(false, Ordering::Release);
    publish_soon();
}

/// From the monitor's pass, after the policy engine looked: publishes every guest's status
/// page when it changed, at most every [`PUBLISH_EVERY_US`] unless [`publish_soon`] asked.
/// While a move is in flight the page keeps showing its start: a reader that sees a core's
/// new owner sees the move's end with it (and the policy's decision that made it).
pub fn publish_if_due() {
    let now = time::now_us();
    let last = LAST_PUBLISH_US.load(Ordering::Relaxed);
    let due = now.saturating_sub(last) >= PUBLISH_EVERY_US && !in_flight();
    if (last == 0 || due) && !page_would_hold_up_move() {
        LAST_PUBLISH_US.store(now.max(1), Ordering::Relaxed);
        publish();
    }
}

/// For the policy engine (from the monitor's pass): starts moving `core` to guest `to` (from
/// its owner, or from the pool), or back to the pool from its owner (`to` `None`), for
/// `reason`; the owner may decline. `None` when another move is in flight; else the move's
/// id, whose end [`result_of`] tells.
pub fn start_for_policy(
    core: usize,
    to: Option<u8>,
    reason: &'static str,
    timeout_ms: u64,
) -> Option<u32> {
    if IN_FLIGHT
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return None;
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let request = Request {
        id,
        core,
        to,
        timeout_us: timeout_ms.min(MAX_TIMEOUT_MS) * 1000,
        by: Requester::Hypervisor,
        reason,
        negotiable: true,
    };
    *CURRENT.lock() = Some(InFlight::new(request));
    publish_soon();
    Some(id)
}

/// How move `id` ended (its outcome and, if the owner declined, why), once it has; `None`
/// while it runs (or when it is too old to be remembered).
pub fn result_of(id: u32) -> Option<(Outcome, Option<DeclineReason>)> {
    RESULTS
        .lock()
        .iter()
        .find(|r| r.id == id)
        .map(|r| (r.outcome, r.declined))
}

/// Has the next pass publish the status pages (something a reader waits for changed).
pub fn publish_soon() {
    LAST_PUBLISH_US.store(0, Ordering::Relaxed);
}

/// Whether a status page built now would hold the move in flight up. Building one takes 1-2
/// ms of a core under Bochs, and it is built on whichever core runs the pass: one asked for
/// as a move starts waits while the move waits for a step Lavender takes in microseconds (its
/// release, or its vCPU's first entry), or takes its own next step at once (it held a move
/// to Linux 1.5 to 2.5 ms between Lavender's release and the grant); and while Linux takes
/// the core offline or online, up to [`LINUX_PAGE_WAIT_US`]: built in the pass of the
/// agent's own `CORE_MOVE` call, it held the call and so the revoke's take 3 ms, and built on
/// one of Linux's CPUs during its hotplug, it held that 1.5 to 2.5 ms.
fn page_would_hold_up_move() -> bool {
    CURRENT
        .try_lock()
        .is_some_and(|current| current.as_ref().is_some_and(InFlight::page_would_hold_up))
}

/// How long a move that waits for Linux's hotplug goes without its status page: Linux takes
/// a CPU offline or online in 10-20 ms under Bochs, so a page shows a move that waits longer
/// (an agent that does not answer) in flight.
const LINUX_PAGE_WAIT_US: u64 = 50_000;

/// Whether a move is in flight.
pub fn in_flight() -> bool {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Records the end of a move (marker, counts, history).
fn finish(m: &mut InFlight, outcome: Outcome) {
    let result = &mut m.result;
    result.outcome = outcome;
    result.stages = stages(result.start_tsc, &mut m.stamps);
    result.total_us = time::us_for_ticks(cpu::read_tsc() - result.start_tsc);
    result.at_us = time::now_us();
    console::marker("core_move", |o| result_fields(o, result));
    let mut counts = COUNTS.lock();
    match outcome {
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
        outcome == Outcome::Done,
        &result.stages,
        result.total_us,
    );
    let mut results = RESULTS.lock();
    if results.is_full() {
        results.pop_front();
    }
    let _ = results.push_back(result.clone());
}

pub(crate) fn core_count() -> usize {
    (0..MAX_CPUS)
        .take_while(|&c| c == 0 || CPUS[c].state() != CpuState::Absent)
        .count()
}

/// Tells `guest` of `event` and wakes it (Lavender on core `at`).
fn notify(guest: &Guest, event: CoreEvent, at: Option<usize>) {
    let Some(control) = &guest.control else {
        return;
    };
    if let Err(e) = control.send(event) {
        log::warn!("moves: cannot queue {event:?} for '{}': {e}", guest.name());
    }
    vcpu::doorbell::wake_for_control(guest, at);
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
            let took = time::us_for_ticks(tsc.saturating_sub(previous));
            previous = previous.max(tsc);
            (name, took)
        })
        .collect()
}

/// The move in flight: what was asked, what it found so far, and what it waits for. The
/// monitor's passes advance it ([`poll`]); nothing here waits, so a pass may run on any
/// core, also on a core of the guest that is asked to give a core back.
struct InFlight {
    request: Request,
    result: MoveResult,
    stamps: Stamps,
    /// The move's deadline (TSC).
    deadline: u64,
    wait: Wait,
    /// The Linux guest the core left once its CPU parked, while the agent has not yet said
    /// that the offline ended (`Released`).
    offline_pending: Option<u8>,
    /// The owner the core left, once it is granted to the target: what the owner said on its
    /// way out is noted at the next step ([`InFlight::note_left`]), after the grant.
    left: Option<Left>,
}

/// The owner a core left and what it had said by then, with when the core left it.
#[derive(Clone, Copy)]
struct Left {
    owner: u8,
    linux: bool,
    may_decline: bool,
    offline_at: Option<u64>,
    at: LeftAt,
}

/// When a core left its owner (TSC), from the core's record: read before the grant that
/// follows, which begins the core's next tenure.
#[derive(Clone, Copy)]
struct LeftAt {
    /// The owner's `CORE_RELEASE`, when it called one for this revoke.
    release_call: Option<u64>,
    parked: u64,
}

/// What a move waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// Nothing asked yet.
    Start,
    /// The owner was told to give the core back (`Revoke` with `deadline_us` left).
    Release {
        owner: u8,
        linux: bool,
        may_decline: bool,
        /// When the agent reported Linux's CPU offline.
        offline_at: Option<u64>,
        deadline_us: u32,
    },
    /// The revoke was forced, or called off after the core had already left: it must
    /// park by `until` (TSC).
    Parked {
        owner: u8,
        until: u64,
        deadline_us: u32,
    },
    /// The core is in the pool: grant it to the target.
    Grant,
    /// Granted to guest `to`: its vCPU must enter (it starts the core itself).
    Entered { generation: u32, to: u8 },
    /// (Linux, guest `to`) the agent confirms that Linux schedules on the CPU.
    Online { to: u8 },
    /// (From Linux) the agent confirms that the CPU's offline ended (`Released`).
    Offline { owner: u8 },
}

/// What one look at a move found.
enum Progress {
    Waiting,
    Next(Wait),
    End(Outcome),
}

impl InFlight {
    fn new(request: Request) -> Self {
        EVENTS.lock().clear();
        let start = cpu::read_tsc();
        let result = MoveResult {
            id: request.id,
            core: request.core,
            from: CORES.word(request.core).owner,
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
        Self {
            deadline: start + time::ticks_for_us(request.timeout_us),
            request,
            result,
            stamps: Stamps::new(),
            wait: Wait::Start,
            offline_pending: None,
            left: None,
        }
    }

    fn page_would_hold_up(&self) -> bool {
        match self.wait {
            Wait::Start | Wait::Grant => true,
            Wait::Parked { .. } => false,
            _ if self.waits_on_linux() => {
                time::us_for_ticks(cpu::read_tsc() - self.result.start_tsc) < LINUX_PAGE_WAIT_US
            }
            // Lavender's release or its vCPU's entry.
            _ => true,
        }
    }

    /// Whether the move waits for Linux's hotplug: its agent's answer to a revoke or a grant,
    /// or the entry of the CPU Linux starts.
    fn waits_on_linux(&self) -> bool {
        let is_linux = |id: u8| guest::by_id(id).is_some_and(|g| g.config.kind == GuestKind::Linux);
        match self.wait {
            Wait::Release { linux, .. } => linux,
            Wait::Entered { to, .. } => is_linux(to),
            Wait::Online { .. } | Wait::Offline { .. } => true,
            Wait::Start | Wait::Grant | Wait::Parked { .. } => false,
        }
    }

    /// Whether the move waits for its core to leave the owner (and then grants it).
    fn awaits_park(&self) -> bool {
        matches!(self.wait, Wait::Release { .. } | Wait::Parked { .. })
    }

    /// Takes every step that needs no waiting; the outcome once the move ended.
    fn advance(&mut self) -> Option<Outcome> {
        loop {
            match self.step() {
                Progress::Waiting => return None,
                Progress::Next(wait) => self.wait = wait,
                Progress::End(outcome) => return Some(outcome),
            }
        }
    }

    fn record(&self) -> crate::cores::MoveRecord {
        CORES
            .record(self.request.core)
            .expect("a core of the machine")
    }

    fn step(&mut self) -> Progress {
        let core = self.request.core;
        let by = self.request.by;
        match self.wait {
            Wait::Start => self.start(),
            // The core left its owner (for Linux: its CPU died, the end of its offline). The
            // grant comes first, so that the target hears of it at once; what the owner said
            // on its way out (the agent's `Released`, a decline that came too late to count)
            // is noted at the next step: the move goes on whatever it was.
            Wait::Release {
                owner,
                linux,
                may_decline,
                offline_at,
                ..
            } if CORES.state(core) == CoreState::Parked => {
                self.left = Some(Left {
                    owner,
                    linux,
                    may_decline,
                    offline_at,
                    at: self.left_at(),
                });
                self.grant()
            }
            Wait::Release {
                owner,
                linux,
                may_decline,
                offline_at,
                deadline_us,
            } => {
                // Linux: the vCPU parks when the dead CPU halts, which ends the revoke (the
                // agent reports `Released` once sysfs returns, usually later: the move waits
                // for it at its end), or the agent reports `Declined` when Linux keeps the
                // CPU. Lavender may decline only a negotiable revoke; a decline of another is
                // ignored and the deadline holds.
                let mut offline_at = offline_at;
                if linux
                    && offline_at.is_none()
                    && event_from(owner, |e| matches!(e, CoreEvent::Released { .. }), core)
                {
                    offline_at = Some(cpu::read_tsc());
                }
                let answer = if let Some(reason) = declined_by(owner, core).filter(|_| may_decline)
                {
                    self.result.declined = Some(reason);
                    Some(false)
                } else if cpu::read_tsc() <= self.deadline {
                    self.wait = Wait::Release {
                        owner,
                        linux,
                        may_decline,
                        offline_at,
                        deadline_us,
                    };
                    return Progress::Waiting;
                } else {
                    None
                };
                if let Some(at) = offline_at {
                    let _ = self.stamps.push(("linux_offline", at));
                }
                let parked_now = CORES.state(core) == CoreState::Parked;
                let until = cpu::read_tsc() + time::ticks_for_us(self.request.timeout_us);
                let park = Wait::Parked {
                    owner,
                    until,
                    deadline_us,
                };
                match move_rules::revoke_end(linux, answer, parked_now) {
                    RevokeEnd::Proceed => {
                        if linux && offline_at.is_none() {
                            self.offline_pending = Some(owner);
                        }
                        let left = self.left_at();
                        self.stamp_release(&left);
                        Progress::Next(Wait::Grant)
                    }
                    // If the core parked in the meantime the move goes on.
                    RevokeEnd::CallOff { refused } => match CORES.cancel(core, owner, by) {
                        Ok(_) if refused => Progress::End(Outcome::Refused),
                        Ok(_) => Progress::End(Outcome::Cancelled),
                        Err(_) => Progress::Next(park),
                    },
                    RevokeEnd::Force => {
                        if let Some(guest) = guest::by_id(owner) {
                            self.result.forced =
                                crate::faults::force(guest, core, Requester::Hypervisor);
                        }
                        Progress::Next(park)
                    }
                }
            }
            Wait::Parked {
                owner,
                until,
                deadline_us,
            } => {
                if CORES.state(core) != CoreState::Parked {
                    return if cpu::read_tsc() > until {
                        Progress::End(Outcome::Failed)
                    } else {
                        Progress::Waiting
                    };
                }
                // The report of a forced release reads the revoke's stamps, which the grant
                // clears (it begins the core's next tenure).
                if self.result.forced {
                    if let Some(guest) = guest::by_id(owner) {
                        crate::faults::taken(guest, core, deadline_us);
                    }
                }
                let left = self.left_at();
                let next = self.grant();
                self.stamp_release(&left);
                next
            }
            Wait::Grant => self.grant(),
            Wait::Entered { generation, to } => {
                if let Some(left) = self.left.take() {
                    self.note_left(left);
                }
                let r = self.record();
                if r.generation != generation || r.at(Stage::Entered) == 0 {
                    if cpu::read_tsc() <= self.deadline {
                        return Progress::Waiting;
                    }
                    let _ = CORES.withdraw(core, to, by, Reason::Withdrawn, cpu::read_tsc());
                    return Progress::End(Outcome::Timeout);
                }
                let _ = self.stamps.push(("startup_ipi", r.at(Stage::Startup)));
                let _ = self.stamps.push(("entered", r.at(Stage::Entered)));
                let linux = guest::by_id(to).is_some_and(|g| g.config.kind == GuestKind::Linux);
                if linux {
                    Progress::Next(Wait::Online { to })
                } else if let Some(owner) = self.offline_pending.take() {
                    Progress::Next(Wait::Offline { owner })
                } else {
                    Progress::End(Outcome::Done)
                }
            }
            Wait::Offline { owner } => {
                // The core serves its next guest already; without the confirmation by the
                // deadline the move is still done (the CPU is dead to Linux).
                let offline = event_from(owner, |e| matches!(e, CoreEvent::Released { .. }), core);
                if offline {
                    let _ = self.stamps.push(("linux_offline", cpu::read_tsc()));
                } else if cpu::read_tsc() <= self.deadline {
                    return Progress::Waiting;
                }
                Progress::End(Outcome::Done)
            }
            Wait::Online { to } => {
                // The agent confirms once Linux schedules on the CPU; without it by the
                // deadline the move is still done (the core is Linux's).
                let online = event_from(to, |e| matches!(e, CoreEvent::Online { .. }), core);
                if online {
                    let _ = self.stamps.push(("linux_online", cpu::read_tsc()));
                } else if cpu::read_tsc() <= self.deadline {
                    return Progress::Waiting;
                }
                Progress::End(Outcome::Done)
            }
        }
    }

    /// The first step: the owner's core is revoked (or an unstarted grant withdrawn), or a
    /// core in the pool goes straight to the grant.
    fn start(&mut self) -> Progress {
        let core = self.request.core;
        let by = self.request.by;
        let word = CORES.word(core);
        let Some(owner) = word.owner.and_then(guest::by_id) else {
            return Progress::Next(Wait::Grant);
        };
        match word.state {
            // An offline Linux CPU, or a grant not started: nothing runs there.
            CoreState::Granted => {
                if CORES
                    .withdraw(core, owner.id, by, Reason::Withdrawn, cpu::read_tsc())
                    .is_err()
                {
                    return Progress::End(Outcome::Failed);
                }
                let _ = self
                    .stamps
                    .push(("withdrawn", self.record().at(Stage::Parked)));
                Progress::Next(Wait::Grant)
            }
            CoreState::Owned => {
                if CORES.revoke(core, owner.id, by, cpu::read_tsc()).is_err() {
                    return Progress::End(Outcome::Failed);
                }
                let left_us = time::us_for_ticks(self.deadline.saturating_sub(cpu::read_tsc()));
                let deadline_us = u32::try_from(left_us).unwrap_or(u32::MAX);
                notify(
                    owner,
                    CoreEvent::Revoke {
                        core: core_id(core),
                        deadline_us,
                        negotiable: self.request.negotiable,
                    },
                    Some(core),
                );
                let linux = owner.config.kind == GuestKind::Linux;
                Progress::Next(Wait::Release {
                    owner: owner.id,
                    linux,
                    may_decline: linux || self.request.negotiable,
                    offline_at: None,
                    deadline_us,
                })
            }
            _ => Progress::End(Outcome::Failed),
        }
    }

    /// The core is the hypervisor's: gives it to the target, which is told at once; or, for
    /// a release, leaves it in the pool (once Linux confirms its offline, when it came from
    /// Linux).
    fn grant(&mut self) -> Progress {
        let core = self.request.core;
        let Some(to) = self.request.to else {
            if let Some(left) = self.left.take() {
                self.note_left(left);
            }
            return match self.offline_pending.take() {
                Some(owner) => Progress::Next(Wait::Offline { owner }),
                None => Progress::End(Outcome::Done),
            };
        };
        let Some(target) = guest::by_id(to) else {
            return Progress::End(Outcome::Failed);
        };
        let Ok((generation, _)) = vcpu::grant(core, target.id, self.request.by) else {
            return Progress::End(Outcome::Failed);
        };
        let _ = self.stamps.push(("granted", cpu::read_tsc()));
        // A granted core is not running yet: Lavender hears of it on a core it runs on.
        notify(
            target,
            CoreEvent::Grant {
                core: core_id(core),
            },
            CORES.first_owned(target.id),
        );
        Progress::Next(Wait::Entered {
            generation,
            to: target.id,
        })
    }

    /// Notes what the owner the core left had said on its way out (Linux's agent may have
    /// reported the offline's end, an owner that may decline may have declined too late).
    fn note_left(&mut self, left: Left) {
        let core = self.request.core;
        let offline_at = left.offline_at.or_else(|| {
            (left.linux
                && event_from(
                    left.owner,
                    |e| matches!(e, CoreEvent::Released { .. }),
                    core,
                ))
            .then(cpu::read_tsc)
        });
        if let Some(reason) = declined_by(left.owner, core).filter(|_| left.may_decline) {
            self.result.declined = Some(reason);
        }
        match offline_at {
            Some(at) => {
                let _ = self.stamps.push(("linux_offline", at));
            }
            None if left.linux => self.offline_pending = Some(left.owner),
            None => {}
        }
        self.stamp_release(&left.at);
    }

    /// When the core left its owner, from its record.
    fn left_at(&self) -> LeftAt {
        let at = |stage| CORES.stamp_of(self.request.core, stage);
        let release_call = at(Stage::ReleaseCalled);
        LeftAt {
            release_call: (release_call > at(Stage::Revoked)).then_some(release_call),
            parked: at(Stage::Parked),
        }
    }

    /// The core left its owner: when it called its release (if it did) and when it parked.
    fn stamp_release(&mut self, at: &LeftAt) {
        if let Some(release_call) = at.release_call {
            let _ = self.stamps.push(("release_call", release_call));
        }
        let _ = self.stamps.push(("parked", at.parked));
    }
}

fn core_id(core: usize) -> CoreId {
    CoreId::new(core as u64).expect("core indices are below 64")
}
fn result_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>, r: &MoveResult) {
    let name = |id: Option<u8>| id.and_then(guest::by_id).map_or("hypervisor", |g| g.name());
    o.u64("id", r.id.into())
        .u64("core", r.core as u64)
        .str("from", name(r.from))
        .str("to", name(r.to))
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
    o.bool("monitor_core", monitor::has_own_core());
    let (passes, pass_ticks) = monitor::work();
    o.object("monitor", |m| {
        m.u64("passes", passes)
            .u64("pass_us", time::us_for_ticks(pass_ticks));
    });
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
                    c.u64("since_us", time::us_for_ticks(since))
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
