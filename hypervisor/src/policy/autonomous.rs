//! `autonomous`: the hypervisor watches the guests from outside (each core's idle time, from
//! its HLT exit to its next wake, and its VM exits, sampled every period) and moves a core
//! from the idlest guest to the busiest; the guests learn only the outcome.
//!
//! A guest wants one core more while its cores are saturated (mean busy at least
//! [`GROW_PERMILLE`]), one fewer once its busy time would fit in one core less at no more
//! than [`SHRINK_PERMILLE`] each, and what it holds in between: the band between the two
//! is the hysteresis that keeps a steady load from moving cores back and forth. A move
//! must be proposed [`CONFIRM_PERIODS`] periods in a row, and a core that reached a guest
//! stays there for [`super::CORE_HOLD_US`]. A core a guest no longer needs by this measure
//! and no guest wants goes back to the hypervisor's pool, as under `cooperative` (the rule
//! is shared, so the two policies differ by what they know, not by what they may do).

use super::{
    decision, targets, usable_cores, Damper, Decision, GuestView, MoveOutcome, Observation, Policy,
    PolicyName, Side, Why,
};
use heapless::Vec;

use crate::partition::MAX_GUESTS;

/// Mean busy per-mille at which a guest's cores count as saturated.
pub const GROW_PERMILLE: u16 = 850;
/// A guest gives a core up when its busy time fits in one core less at this per-mille each.
pub const SHRINK_PERMILLE: u32 = 500;
/// Periods in a row a move must be proposed before it is made.
pub const CONFIRM_PERIODS: u8 = 3;
/// After a move, how long its two guests wait before the next (µs).
pub const COOLDOWN_US: u64 = 20_000;
/// How long a core whose owner declined a revoke is left alone (µs).
pub const DECLINE_US: u64 = 200_000;

/// The autonomous policy's state: its damping.
#[derive(Clone, Debug)]
pub struct Autonomous {
    damper: Damper,
}

impl Default for Autonomous {
    fn default() -> Self {
        Self {
            damper: Damper::new(CONFIRM_PERIODS, COOLDOWN_US, DECLINE_US),
        }
    }
}

/// How many cores `guest` wants by its measured load.
pub fn wants(guest: &GuestView) -> u8 {
    let held = guest.held_count();
    let m = &guest.measured;
    if m.cores == 0 {
        return held;
    }
    if m.busy_mean() >= GROW_PERMILLE {
        held.saturating_add(1)
    } else if held > 1 && m.busy_sum <= u32::from(held - 1) * SHRINK_PERMILLE {
        held - 1
    } else {
        held
    }
}

fn side(guest: &GuestView, wants: u8, target: u8) -> Side {
    Side {
        held: guest.held_count(),
        busy_permille: guest.measured.busy_mean(),
        runnable: 0,
        exits_per_ms: guest.measured.exits_per_ms,
        wants,
        target,
        // Not read by this policy; recorded so a decision can be timed from the load step
        // the guest reported.
        report_at_us: 0,
        request_since_us: guest.report.map_or(0, |r| r.request_since_us),
        final_offer: false,
    }
}

impl Policy for Autonomous {
    fn name(&self) -> PolicyName {
        PolicyName::Autonomous
    }

    fn decide(&mut self, seen: &Observation) -> Option<Decision> {
        let wanted: Vec<u8, MAX_GUESTS> = seen.guests.iter().map(wants).collect();
        let targets = targets(seen.guests, &wanted, usable_cores(seen));
        let found = self.damper.first_move(seen, &targets, &wanted);
        if !self.damper.confirmed(seen, found) {
            return None;
        }
        let found = found?;
        let why = match found.2.map(|t| &seen.guests[t]) {
            None => Why::Unwanted,
            Some(taker) if taker.held_count() < taker.bounds.min => Why::BelowMinimum,
            Some(_) => Why::BusiestFromIdlest,
        };
        Some(decision(PolicyName::Autonomous, seen, found, why, |i| {
            side(&seen.guests[i], wanted[i], targets[i])
        }))
    }

    fn outcome(&mut self, decision: &Decision, outcome: MoveOutcome, now_us: u64) {
        self.damper.outcome(decision, outcome, now_us);
    }
}
