//! `cooperative`: each guest reports its load on its control channel (runnable threads,
//! per-core busy time, a request of +n or -n cores, a workload hint), when its runnable work
//! crosses its core count or a core goes idle and on a slow heartbeat; the hypervisor
//! arbitrates when a report arrives, not on a tick, and acts on the first report that calls
//! for a move: a load step that crosses a guest's core count moves a core at once.
//!
//! A guest wants what it holds plus its request; an I/O-bound guest's request to grow counts
//! for one core at most; a guest with no report, or whose last report is older than
//! [`STALE_US`], wants what it holds. The arbitration ([`super::targets`]) grants spare cores
//! and splits contested ones in proportion to unmet demand (a tie keeps the holder), so a
//! guest that asks for more than it uses gets no more than its maximum and its share; and a
//! request to grow counts only while the hypervisor measures the guest's cores busy
//! ([`VERIFY_PERMILLE`]), so a guest that reports full load while idle gains nothing by it;
//! and a claim to keep every core held counts only while they were busy of late
//! ([`KEEP_VERIFY_PERMILLE`]), so it keeps no contested core by it either.
//!
//! Flapping is kept off by holds rather than by waiting for reports to agree: a core that
//! reached a guest stays with it for [`super::CORE_HOLD_US`] (it leaves a guest at most once
//! per hold, whatever the reports say), and the two guests of a move wait [`COOLDOWN_US`]
//! before their next. A core a guest offers itself and nobody asks for goes back to the
//! hypervisor's pool once its hold is over and the offer has stood a while (Lavender's
//! 10 ms, Linux's a second, see [`super::RELEASE_AFTER_LINUX_US`]), or at once when the
//! report says the offer is final (none of the guest's live work can use the core: Lavender's
//! job that ran on it ended), and comes back from there
//! at the guest's next request with no hold or cool-down in the way: a Lavender job that
//! ends leaves no core granted and idle, and the next job has the core back within a
//! sampling period. A core a guest offered and another took, from the pool or at its
//! request, is lent: the hold does not keep it from the guest that offered it, which has
//! it back at its next request (a Lavender job's compute phase after its delegated I/O,
//! during which Linux took the core). A claim the keep check discounts loses a contested
//! core but sends none to the pool: the guest would ask for it back at its next report.
//!
//! A guest may decline a revoke (with a reason: Lavender when the threads it has runnable
//! would exceed its cores without the core): the core is then left alone for [`DECLINE_US`]
//! and the next arbitration tries another core or guest.

use heapless::Vec;

use super::{
    decision, targets, usable_cores, Damper, Decision, GuestView, Hint, MoveOutcome, Observation,
    Policy, PolicyName, Report, Side, Why,
};
use crate::partition::MAX_GUESTS;

/// A report older than this no longer counts (µs; the guests' heartbeat is 100 ms).
pub const STALE_US: u64 = 1_000_000;
/// Reports in a row that must agree on a move: one, the first report that calls for it.
pub const CONFIRM_REPORTS: u8 = 1;
/// After a move, how long its two guests wait before the next (µs).
pub const COOLDOWN_US: u64 = 10_000;
/// How long a core whose owner declined a revoke is left alone (µs).
pub const DECLINE_US: u64 = 200_000;

#[derive(Clone, Debug)]
pub struct Cooperative {
    damper: Damper,
    /// The last arbitration set a request to grow aside because the guest's cores were not
    /// yet measured busy: a report that a load step starts arrives before a sampling period
    /// has seen the new load, so the engine looks again each period until the measurement
    /// confirms the request or the guest withdraws it.
    unverified: bool,
}

impl Default for Cooperative {
    fn default() -> Self {
        Self {
            damper: Damper::new(CONFIRM_REPORTS, COOLDOWN_US, DECLINE_US),
            unverified: false,
        }
    }
}

/// A request to grow counts only while the hypervisor measures the guest's cores at least
/// this busy (mean per-mille), when it measured them at all: a guest that reports full load
/// while its cores idle gets no core for it.
pub const VERIFY_PERMILLE: u16 = 500;

/// A claim to keep every core held counts only while the hypervisor measured the guest's
/// cores at least this busy over the recent past (`Measured::recent_busy_permille`, mean
/// per-mille): lower than [`VERIFY_PERMILLE`], so a busy guest whose threads wait a while
/// for a straggler (one core of two busy: 500) keeps its cores, while a guest whose cores
/// run only its background work (an idle Linux's agent: 150-250 under Bochs) does not.
pub const KEEP_VERIFY_PERMILLE: u16 = 400;

/// How many cores `guest` wants by its last report (what it holds when it has none), checked
/// against what the hypervisor measured.
pub fn wants(guest: &GuestView, now_us: u64) -> u8 {
    let held = guest.held_count();
    if unverified(guest, now_us) {
        return super::autonomous::wants(guest).min(held);
    }
    let reported = reported_wants(guest, now_us);
    let m = &guest.measured;
    if reported == held
        && fresh_report(guest, now_us).is_some()
        && m.cores > 0
        && m.recent_busy_permille < KEEP_VERIFY_PERMILLE
    {
        // It claims every core it holds while they idled of late: one fewer, so a guest
        // that reports more load than it has keeps no contested core on a tie.
        return held.saturating_sub(1).max(1);
    }
    reported
}

/// Whether `guest` asks to grow while the hypervisor measures its cores less busy than
/// [`VERIFY_PERMILLE`].
fn unverified(guest: &GuestView, now_us: u64) -> bool {
    let measured = &guest.measured;
    reported_wants(guest, now_us) > guest.held_count()
        && measured.cores > 0
        && measured.busy_mean() < VERIFY_PERMILLE
}

/// `guest`'s last report, unless it is older than [`STALE_US`].
fn fresh_report(guest: &GuestView, now_us: u64) -> Option<Report> {
    guest
        .report
        .filter(|r| now_us.saturating_sub(r.at_us) <= STALE_US)
}

fn reported_wants(guest: &GuestView, now_us: u64) -> u8 {
    let held = guest.held_count();
    let Some(report) = fresh_report(guest, now_us) else {
        return held;
    };
    let request = match report.hint {
        Hint::IoBound => report.request.min(1),
        _ => report.request,
    };
    (i32::from(held) + i32::from(request)).clamp(1, i32::from(u8::MAX)) as u8
}

/// How many cores `guest` keeps off the pool by its own account: what its last report asks
/// for, or as many as the threads it reported runnable (at most what it holds), whichever
/// is more. A guest whose steadied offer stands while its threads still use every core it
/// holds (a job that sleeps a few milliseconds between short rounds) keeps them; its offer
/// lets a guest that asks have a core, but sends none to the pool only for the guest's next
/// round to ask it back.
fn keeps(guest: &GuestView, now_us: u64) -> u8 {
    let running = fresh_report(guest, now_us).map_or(0, |r| r.runnable);
    let running = u8::try_from(running)
        .unwrap_or(u8::MAX)
        .min(guest.held_count());
    reported_wants(guest, now_us).max(running)
}

/// The guests as `seen`, except that one whose last report makes a final offer (none of its
/// live work can use the cores it offers: the job that ran on them ended) gives them back to
/// the pool without the wait of its [`GuestView::release_after_us`], which is there for a job
/// between two phases, that will ask for the core again. The hypervisor cannot tell the two
/// apart; the guest can. A guest that marks an offer final when it is not only gives its own
/// core up sooner, and has it back from the pool at its next request.
fn final_offers_go_at_once(seen: &Observation) -> Vec<GuestView, MAX_GUESTS> {
    seen.guests
        .iter()
        .map(|g| GuestView {
            release_after_us: if fresh_report(g, seen.now_us).is_some_and(|r| r.final_offer) {
                0
            } else {
                g.release_after_us
            },
            ..*g
        })
        .collect()
}

fn side(guest: &GuestView, wants: u8, target: u8) -> Side {
    let report = guest.report.unwrap_or_default();
    Side {
        held: guest.held_count(),
        busy_permille: (report.busy_sum / u32::from(report.cores.max(1))).min(1000) as u16,
        runnable: report.runnable,
        exits_per_ms: guest.measured.exits_per_ms,
        wants,
        target,
        report_at_us: report.at_us,
        request_since_us: report.request_since_us,
        final_offer: report.final_offer,
    }
}

impl Policy for Cooperative {
    fn name(&self) -> PolicyName {
        PolicyName::Cooperative
    }

    fn decide(&mut self, seen: &Observation) -> Option<Decision> {
        let views = final_offers_go_at_once(seen);
        let seen = &Observation {
            guests: &views,
            ..*seen
        };
        self.unverified = seen.guests.iter().any(|g| unverified(g, seen.now_us));
        let wanted: Vec<u8, MAX_GUESTS> =
            seen.guests.iter().map(|g| wants(g, seen.now_us)).collect();
        let targets = targets(seen.guests, &wanted, usable_cores(seen));
        // What each asks for itself, and the threads it runs now, keep its cores off the
        // pool (see `Damper::first_move`).
        let keeps: Vec<u8, MAX_GUESTS> =
            seen.guests.iter().map(|g| keeps(g, seen.now_us)).collect();
        let found = self.damper.first_move(seen, &targets, &keeps);
        if !self.damper.confirmed(seen, found) {
            return None;
        }
        let found = found?;
        let contested = wanted
            .iter()
            .zip(seen.guests)
            .map(|(&w, g)| u32::from(w.clamp(g.bounds.min, g.bounds.max)))
            .sum::<u32>()
            > u32::from(usable_cores(seen));
        let why = match found.2.map(|t| &seen.guests[t]) {
            None => Why::Unwanted,
            Some(taker) if taker.held_count() < taker.bounds.min => Why::BelowMinimum,
            Some(_) if contested => Why::FairShare,
            Some(_) => Why::Requested,
        };
        Some(decision(PolicyName::Cooperative, seen, found, why, |i| {
            side(&seen.guests[i], wanted[i], targets[i])
        }))
    }

    fn outcome(&mut self, decision: &Decision, outcome: MoveOutcome, now_us: u64) {
        self.damper.outcome(decision, outcome, now_us);
    }

    fn pending(&self) -> bool {
        self.damper.pending() || self.unverified
    }
}
