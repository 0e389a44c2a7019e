//! The policy engine, run by the monitor's passes: it samples what the hypervisor sees of each core (idle time
//! from `core_idle`, VM exits) every period, keeps each guest's last load report, asks the
//! policy in force (`policy`) for a move when a period ends (autonomous) or a report arrives
//! (cooperative), and has `moves` carry the move out like any other, recording the
//! decision with its inputs and reason (a `policy_decision` marker and the status page's
//! `policy` object, which `vmctl status` and `vmctl trace` show).
//!
//! `SET_POLICY` (`vmctl rebalance`) only leaves a request here; the next pass switches, with a fresh policy (no history), so the new policy's first decision follows.

use core::sync::atomic::{AtomicU32, Ordering};

use heapless::Deque;
use spin::Mutex;
use vmcall_proto::hypercall::{CoreState, Status};
use vmcall_proto::marker::JsonObject;
use vmcall_proto::message::{DeclineReason, LoadReport, WorkloadHint};

use crate::arch::cpu;
use crate::arch::percpu::CPUS;
use crate::core_idle::IDLE;
use crate::cores::CORES;
use crate::guest::{self, GuestState};
use crate::partition::{GuestKind, PolicySettings, MAX_GUESTS, MAX_POLICY_PERIOD_MS};
use crate::platform::MAX_CPUS;
use crate::policy::{
    Active, Bounds, Decision, GuestView, Hint, Measured, MoveOutcome, Observation, Policy,
    PolicyName, Report, Side, RELEASE_AFTER_LAVENDER_US, RELEASE_AFTER_LINUX_US,
};
use crate::{console, moves, time};

/// How often the cooperative policy arbitrates without a new report (its heartbeat), and
/// how often `static` samples the cores (only to show their load).
const HEARTBEAT_US: u64 = 100_000;
/// A policy move's time limit (virtual time under Bochs).
const MOVE_TIMEOUT_MS: u64 = 3_000;
/// Decisions kept for the status page.
const HISTORY: usize = 4;

/// The preemption-timer value each vCPU loads on entry (`u32::MAX`: as late as it goes).
static PREEMPTION_TIMER: AtomicU32 = AtomicU32::new(u32::MAX);

/// The value every vCPU loads into its VMX-preemption timer before entering its guest.
pub fn preemption_timer_value() -> u32 {
    PREEMPTION_TIMER.load(Ordering::Relaxed)
}

/// A switch asked for by `SET_POLICY`: (policy, period in ms, 0 to keep it).
static REQUESTED: Mutex<Option<(PolicyName, u32)>> = Mutex::new(None);

/// What the engine read of one core at the last sample.
#[derive(Clone, Copy, Default)]
struct CoreSample {
    idle: u64,
    /// The hypervisor's own work on the core while its vCPU ran (`core_idle`).
    hypervisor: u64,
    exits: u64,
}

/// A core's time held by a guest since boot, and how much of it the guest left idle (TSC
/// ticks, summed over the samples): what a policy's grants cost when unused.
#[derive(Clone, Copy, Default)]
struct CoreUse {
    owned: u64,
    idle: u64,
}

struct Record {
    decision: Decision,
    move_id: u32,
    outcome: &'static str,
    /// Why the owner declined the revoke, when it did.
    declined: Option<DeclineReason>,
}

struct Engine {
    active: Active,
    period_ms: u32,
    /// The preemption timer's rate: it counts down every 2^rate TSC ticks.
    timer_rate: u8,
    /// When the policy came into force (µs since boot).
    since_us: u64,
    switches: u32,
    next_sample: u64,
    last_sample_tsc: u64,
    cores: [CoreSample; MAX_CPUS],
    use_: [CoreUse; MAX_CPUS],
    measured: [Measured; MAX_GUESTS],
    reports: [Option<Report>; MAX_GUESTS],
    /// A report arrived since the cooperative policy last arbitrated.
    report_arrived: bool,
    last_arbitration_us: u64,
    decisions: Deque<Record, HISTORY>,
    /// The move started for the last decision, until it ends: (decision, move id).
    started: Option<(Decision, u32)>,
    moves: u32,
    declined: u32,
}

static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);

/// At boot: the configuration's policy comes into force.
pub fn init(settings: PolicySettings, timer_rate: u8) {
    let now = cpu::read_tsc();
    let engine = Engine {
        active: Active::new(settings.name),
        period_ms: settings.period_ms,
        timer_rate,
        since_us: time::now_us(),
        switches: 0,
        next_sample: now,
        last_sample_tsc: now,
        cores: [CoreSample::default(); MAX_CPUS],
        use_: [CoreUse::default(); MAX_CPUS],
        measured: [Measured::default(); MAX_GUESTS],
        reports: [None; MAX_GUESTS],
        report_arrived: false,
        last_arbitration_us: 0,
        decisions: Deque::new(),
        started: None,
        moves: 0,
        declined: 0,
    };
    engine.set_timer();
    log::info!(
        "policy: {} (period {} ms)",
        settings.name.name(),
        settings.period_ms
    );
    console::marker("policy", |o| {
        o.str("name", settings.name.name())
            .u64("period_ms", settings.period_ms.into())
            .str("by", "config");
    });
    *ENGINE.lock() = Some(engine);
}

/// `SET_POLICY` (any core): checks the arguments and leaves the switch for the monitor's next pass.
pub fn request(policy: u64, period_ms: u64) -> Status {
    let Some(name) = PolicyName::from_number(policy) else {
        return Status::InvalidArgument;
    };
    let Some(period_ms) = u32::try_from(period_ms)
        .ok()
        .filter(|&ms| ms <= MAX_POLICY_PERIOD_MS)
    else {
        return Status::InvalidArgument;
    };
    *REQUESTED.lock() = Some((name, period_ms));
    crate::monitor::wake();
    Status::Ok
}

/// A load report guest `guest` sent (the monitor's pass drains the control channels).
pub fn report(guest: u8, report: &LoadReport) {
    let cores = report.reported_cores();
    let busy_sum = cores
        .iter()
        .filter_map(|c| report.busy(c))
        .map(|b| u32::from(b.get()))
        .sum();
    let now_us = time::now_us();
    let mut seen = Report {
        at_us: now_us,
        runnable: report.runnable_threads,
        busy_sum,
        cores: cores.len() as u8,
        request: report.requested_core_delta,
        request_since_us: now_us,
        hint: match report.hint {
            WorkloadHint::Unknown => Hint::Unknown,
            WorkloadHint::Compute => Hint::Compute,
            WorkloadHint::IoBound => Hint::IoBound,
        },
        final_offer: report.final_offer,
    };
    if let Some(engine) = ENGINE.lock().as_mut() {
        if let Some(slot) = engine.reports.get_mut(usize::from(guest)) {
            if let Some(last) = slot.filter(|r| r.request == seen.request) {
                seen.request_since_us = last.request_since_us;
            }
            *slot = Some(seen);
            engine.report_arrived = true;
        }
    }
}

/// The TSC by which the monitor must look again (the next sample), if a policy runs.
pub fn next_deadline() -> Option<u64> {
    ENGINE.lock().as_ref().map(|e| e.next_sample)
}

/// From the monitor's pass: switches policy if asked, samples the cores when a period
/// ended, notes how the move it started last ended, and starts the move the policy decides,
/// if any. Nothing here waits for a move: [`moves`] carries it on over the next passes.
pub fn tick() {
    let switch = REQUESTED.lock().take();
    let mut guard = ENGINE.lock();
    let Some(engine) = guard.as_mut() else {
        return;
    };
    if let Some((name, period_ms)) = switch {
        engine.switch(name, period_ms);
    }
    let now = cpu::read_tsc();
    let sampled = now >= engine.next_sample;
    if sampled {
        engine.sample(now);
    }
    if let Some((decision, id)) = engine.started {
        let Some((outcome, declined)) = moves::result_of(id) else {
            return;
        };
        engine.started = None;
        engine.ended(decision, id, outcome.name(), Some(outcome), declined);
    }
    if moves::in_flight() {
        return;
    }
    let now_us = time::now_us();
    let due = match engine.active {
        Active::Static(_) => false,
        Active::Autonomous(_) => sampled,
        Active::Cooperative(ref p) => {
            engine.report_arrived
                || (sampled && p.pending())
                || now_us.saturating_sub(engine.last_arbitration_us) >= HEARTBEAT_US
        }
    };
    if !due {
        return;
    }
    if matches!(engine.active, Active::Cooperative(_)) {
        engine.report_arrived = false;
        engine.last_arbitration_us = now_us;
    }
    let Some(decision) = engine.decide(now_us) else {
        return;
    };
    console::marker("policy_decision", |o| decision_fields(o, &decision));
    match moves::start_for_policy(
        decision.core,
        decision.to,
        decision.why.name(),
        MOVE_TIMEOUT_MS,
    ) {
        Some(id) => engine.started = Some((decision, id)),
        // A holder's move came first.
        None => engine.ended(decision, 0, "busy", None, None),
    }
}

impl Engine {
    /// The move for `decision` ended (`outcome` `None`: it never started): the policy that
    /// decided it learns how, and the decision is kept with its outcome.
    fn ended(
        &mut self,
        decision: Decision,
        move_id: u32,
        outcome_name: &'static str,
        outcome: Option<moves::Outcome>,
        declined: Option<DeclineReason>,
    ) {
        let outcome = match outcome {
            Some(moves::Outcome::Done) => MoveOutcome::Done,
            Some(moves::Outcome::Refused | moves::Outcome::Cancelled) => MoveOutcome::Declined,
            _ => MoveOutcome::Failed,
        };
        if let Some(why) = declined {
            console::marker("policy_declined", |o| {
                o.str("policy", decision.policy.name())
                    .u64("core", decision.core as u64)
                    .str("owner", guest_name(decision.from))
                    .str("to", guest_name(decision.to))
                    .str("reason", why.name())
                    .u64("move_id", move_id.into());
            });
        }
        // A switch while the move ran left a fresh policy: it did not decide this move.
        if self.active.policy().name() == decision.policy {
            self.active
                .policy()
                .outcome(&decision, outcome, time::now_us());
        }
        match outcome {
            MoveOutcome::Done => self.moves += 1,
            MoveOutcome::Declined => self.declined += 1,
            MoveOutcome::Failed => {}
        }
        if self.decisions.is_full() {
            self.decisions.pop_front();
        }
        let _ = self.decisions.push_back(Record {
            decision,
            move_id,
            outcome: outcome_name,
            declined,
        });
    }

    fn switch(&mut self, name: PolicyName, period_ms: u32) {
        if period_ms != 0 {
            self.period_ms = period_ms;
        }
        self.active = Active::new(name);
        self.since_us = time::now_us();
        self.switches += 1;
        self.report_arrived = true;
        self.next_sample = cpu::read_tsc();
        self.set_timer();
        // `vmctl rebalance` waits for the status page to name the new policy.
        moves::publish_soon();
        log::info!("policy: {} (period {} ms)", name.name(), self.period_ms);
        console::marker("policy", |o| {
            o.str("name", name.name())
                .u64("period_ms", self.period_ms.into())
                .str("by", "holder");
        });
    }

    fn sample_us(&self) -> u64 {
        match self.active {
            Active::Static(_) => HEARTBEAT_US,
            _ => u64::from(self.period_ms) * 1000,
        }
    }

    /// Every vCPU exits at least once a sampling period, halted or not, so the idle time
    /// the engine reads is at most a period old.
    fn set_timer(&self) {
        let ticks = time::ticks_for_us(self.sample_us()) >> self.timer_rate;
        let value = match self.active {
            Active::Static(_) => u32::MAX,
            _ => u32::try_from(ticks.max(1)).unwrap_or(u32::MAX),
        };
        PREEMPTION_TIMER.store(value, Ordering::Relaxed);
    }

    /// Reads each core's idle time and exits since the last sample and sums them per guest.
    fn sample(&mut self, now: u64) {
        let window = now.saturating_sub(self.last_sample_tsc).max(1);
        let window_ms = (window / time::ticks_for_us(1000).max(1)).max(1);
        let mut measured = [Measured::default(); MAX_GUESTS];
        for core in 0..moves::core_count() {
            let idle = IDLE[core].idle_ticks(now);
            let hypervisor = IDLE[core].hypervisor_ticks();
            let exits = CPUS[core].exits.snapshot();
            // The exits the hypervisor makes for itself (its timer, a halted vCPU's wake-up)
            // are not the guest's doing.
            let own_exits: u64 = exits
                .nonzero()
                .filter(|(name, _)| matches!(*name, "preemption_timer" | "external_interrupt"))
                .map(|(_, n)| n)
                .sum();
            let exits = exits.total() - own_exits;
            let last = core::mem::replace(
                &mut self.cores[core],
                CoreSample {
                    idle,
                    hypervisor,
                    exits,
                },
            );
            let word = CORES.word(core);
            let Some(owner) = word.owner.filter(|_| word.state == CoreState::Owned) else {
                continue;
            };
            let Some(m) = measured.get_mut(usize::from(owner)) else {
                continue;
            };
            let idle_ticks = idle.saturating_sub(last.idle).min(window);
            self.use_[core].owned += window;
            self.use_[core].idle += idle_ticks;
            // Without a monitor core, passes of the monitor run on the guests' cores: that
            // time is the hypervisor's, neither the guest's work nor its idleness.
            let guest_window = window
                .saturating_sub(hypervisor.saturating_sub(last.hypervisor))
                .max(idle_ticks)
                .max(1);
            let idle_permille = (idle_ticks * 1000 / guest_window) as u32;
            m.busy_sum += 1000 - idle_permille;
            m.cores += 1;
            m.exits_per_ms += (exits.saturating_sub(last.exits) / window_ms) as u32;
        }
        let window_us = window * 1000 / time::ticks_for_us(1000).max(1);
        for (m, before) in measured.iter_mut().zip(&self.measured) {
            if m.cores > 0 {
                *m = m.after(before, window_us);
            }
        }
        self.measured = measured;
        self.last_sample_tsc = now;
        self.next_sample = now + time::ticks_for_us(self.sample_us());
    }

    fn decide(&mut self, now_us: u64) -> Option<Decision> {
        let mut views: heapless::Vec<GuestView, MAX_GUESTS> = heapless::Vec::new();
        let mut settled = true;
        let mut free = 0u64;
        for core in 0..moves::core_count() {
            match CORES.state(core) {
                CoreState::Parked => free |= 1 << core,
                CoreState::Owned => {}
                // A core between owners: decide once it has settled.
                CoreState::Releasing | CoreState::Granted => settled = false,
            }
        }
        for g in guest::all() {
            if g.state() != GuestState::Running {
                continue;
            }
            let id = usize::from(g.id);
            let _ = views.push(GuestView {
                id: g.id,
                bounds: Bounds {
                    boot_core: g.config.boot_core.index(),
                    allowed: g.config.allowed_cores.0,
                    min: g.config.min_cores,
                    max: g.config.max_cores,
                },
                held: CORES.running_cores(g.id),
                measured: self.measured.get(id).copied().unwrap_or_default(),
                report: self.reports.get(id).copied().flatten(),
                release_after_us: match g.config.kind {
                    GuestKind::Lavender => RELEASE_AFTER_LAVENDER_US,
                    GuestKind::Linux => RELEASE_AFTER_LINUX_US,
                },
            });
        }
        if !settled {
            return None;
        }
        let seen = Observation {
            now_us,
            free,
            guests: &views,
        };
        self.active.policy().decide(&seen)
    }
}

fn guest_name(id: Option<u8>) -> &'static str {
    id.and_then(guest::by_id).map_or("hypervisor", |g| g.name())
}

fn side_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>, s: &Side) {
    o.u64("held", s.held.into())
        .u64("busy_permille", s.busy_permille.into())
        .u64("runnable", s.runnable.into())
        .u64("exits_per_ms", s.exits_per_ms.into())
        .u64("wants", s.wants.into())
        .u64("target", s.target.into())
        .u64("report_at_us", s.report_at_us)
        .u64("request_since_us", s.request_since_us)
        .bool("final_offer", s.final_offer);
}

fn decision_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>, d: &Decision) {
    o.str("policy", d.policy.name())
        .u64("at_us", d.at_us)
        .u64("core", d.core as u64)
        .str("from", guest_name(d.from))
        .str("to", guest_name(d.to))
        .str("reason", d.why.name());
    o.object("giver", |s| side_fields(s, &d.giver));
    o.object("taker", |s| side_fields(s, &d.taker));
}

/// The status page's `policy` object: the policy in force, what it measured and read of each
/// guest, and its last decisions with their inputs and outcomes.
pub fn status_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>) {
    let guard = ENGINE.lock();
    let Some(engine) = guard.as_ref() else {
        o.str("name", PolicyName::Static.name());
        return;
    };
    let name = match engine.active {
        Active::Static(_) => PolicyName::Static,
        Active::Autonomous(_) => PolicyName::Autonomous,
        Active::Cooperative(_) => PolicyName::Cooperative,
    };
    o.str("name", name.name())
        .u64("period_ms", engine.period_ms.into())
        .u64("since_us", engine.since_us)
        .u64("switches", engine.switches.into())
        .u64("moves", engine.moves.into())
        .u64("declined", engine.declined.into());
    if let Some(last) = engine.decisions.back() {
        o.str("last_reason", last.decision.why.name());
    }
    if let Some(last) = engine.decisions.iter().rev().find(|r| r.declined.is_some()) {
        o.object("last_decline", |d| {
            d.u64("core", last.decision.core as u64)
                .str("owner", guest_name(last.decision.from))
                .str("reason", last.declined.map_or("", DeclineReason::name))
                .u64("at_us", last.decision.at_us);
        });
    }
    o.array("guests", |a| {
        for g in guest::all() {
            let id = usize::from(g.id);
            let m = engine.measured.get(id).copied().unwrap_or_default();
            a.object(|j| {
                j.str("name", g.name())
                    .u64("min_cores", g.config.min_cores.into())
                    .u64("max_cores", g.config.max_cores.into())
                    .u64("measured_busy_permille", m.busy_mean().into())
                    .u64("exits_per_ms", m.exits_per_ms.into());
                if let Some(r) = engine.reports.get(id).copied().flatten() {
                    j.object("report", |r2| {
                        r2.u64("at_us", r.at_us)
                            .u64("runnable", r.runnable.into())
                            .i64("request", r.request.into())
                            .u64("request_since_us", r.request_since_us)
                            .str("hint", r.hint.name())
                            .bool("final_offer", r.final_offer);
                    });
                }
            });
        }
    });
    let us = |ticks: u64| ticks / time::ticks_for_us(1).max(1);
    o.array("cores", |a| {
        for (core, u) in engine.use_.iter().enumerate().take(moves::core_count()) {
            a.object(|c| {
                c.u64("core", core as u64)
                    .u64("owned_us", us(u.owned))
                    .u64("idle_us", us(u.idle));
            });
        }
    });
    o.array("decisions", |a| {
        for r in engine.decisions.iter() {
            a.object(|d| {
                decision_fields(d, &r.decision);
                d.u64("move_id", r.move_id.into())
                    .str("outcome", r.outcome)
                    .str("decline_reason", r.declined.map_or("", DeclineReason::name));
            });
        }
    });
}
