//! A host-side **model** of the core-allocation policies, for the policy benchmark
//! ([`crate::bench_policies`]): it replays a real run's recorded load (each guest's
//! runnable threads over time, from the hypervisor's load history as the agent's
//! `policy_bench_load` markers give it) through the hypervisor's own
//! decision functions (`hypervisor::policy`, the code the engine runs) on the default
//! partition, with a sampling period and a move cost of our choosing, to see how they would
//! change moves, reaction and starved core time without a Bochs boot per setting.
//!
//! It is a model, not a measurement: the load is replayed open loop (a guest's threads do
//! not finish sooner when it gets a core, so it predicts no makespan); the hypervisor's
//! measured busy time is derived from the load (busy = runnable threads up to the cores
//! held); a guest reports when its load or its cores change and every 100 ms, its offers
//! final when the recorded report in force said so; a move takes
//! the giver's core at once and reaches the taker `move_cost` later, and nothing else is
//! decided meanwhile.

use hypervisor::policy::{
    autonomous::Autonomous, cooperative::Cooperative, Bounds, GuestView, Hint, Measured,
    MoveOutcome, Observation, Policy, Report, RELEASE_AFTER_LAVENDER_US, RELEASE_AFTER_LINUX_US,
};

use crate::bench_policies::Load;

/// Busy per-mille an idle core still shows (interrupts, timer ticks).
const IDLE_NOISE: u32 = 20;
const HEARTBEAT_US: u64 = 100_000;
/// The engine's look at a cooperative move waiting out its hold (its sampling period).
const COOPERATIVE_TICK_US: u64 = 1_000;
const MAX_CORES: u32 = 2;

/// One setting the model runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    /// The autonomous policy's sampling period.
    pub period_us: u64,
    /// Revoke to the core running in its new guest.
    pub move_cost_us: u64,
}

/// What the model predicts for one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prediction {
    pub moves: u64,
    /// Lavender's job start (its first report of 2+ runnable) -> first move towards it.
    pub lavender_first_move_ms: Option<f64>,
    /// Core time demanded (runnable threads, at most 2) but not held.
    pub starved_ms: f64,
}

/// The default partition (`config/default.toml`): Lavender (0) boots on core 2 and may hold
/// 2 and 3; Linux (1) boots on core 1 and holds 1 and 3.
fn machine() -> [GuestView; 2] {
    let guest = |id, boot_core, allowed, held, release_after_us| GuestView {
        id,
        bounds: Bounds {
            boot_core,
            allowed,
            min: 1,
            max: MAX_CORES as u8,
        },
        held,
        measured: Measured::default(),
        report: None,
        release_after_us,
    };
    [
        guest(0, 2, 0b1100, 0b0100, RELEASE_AFTER_LAVENDER_US),
        guest(1, 1, 0b1010, 0b1010, RELEASE_AFTER_LINUX_US),
    ]
}

/// The report of `loads` in force at `t`: the last at or before it.
fn in_force(loads: &[Load], t: u64) -> Option<&Load> {
    loads.iter().take_while(|l| l.at_us <= t).last()
}

/// The runnable threads of `loads` at `t`.
fn demand(loads: &[Load], t: u64) -> u32 {
    in_force(loads, t).map_or(0, |l| l.runnable as u32)
}

/// Whether the report of `loads` in force at `t` said its offer is final.
fn final_offer(loads: &[Load], t: u64) -> bool {
    in_force(loads, t).is_some_and(|l| l.final_offer)
}

/// Replays `loads` (per guest: Lavender, Linux) over `since_us..end_us` under `policy`.
pub fn replay(
    policy: &str,
    loads: &[Vec<Load>; 2],
    since_us: u64,
    end_us: u64,
    setting: Setting,
) -> Prediction {
    let mut active: Box<dyn Policy> = match policy {
        "autonomous" => Box::new(Autonomous::default()),
        "cooperative" => Box::new(Cooperative::default()),
        _ => return static_prediction(loads, since_us, end_us),
    };
    let tick = match policy {
        "autonomous" => setting.period_us.max(1),
        _ => COOPERATIVE_TICK_US,
    };
    let mut guests = machine();
    let mut prediction = Prediction::default();
    let lavender_step = loads[0]
        .iter()
        .find(|l| l.at_us > since_us && l.runnable >= 2)
        .map(|l| l.at_us);
    // The move in flight: (decision, when the core reaches the taker or the pool).
    let mut in_flight = None;
    // Cores in the hypervisor's pool.
    let mut free = 0u64;
    let mut last_report: [Option<(u32, u64, u64)>; 2] = [None; 2];
    let mut starved_us = 0.0;
    let mut now = since_us;
    while now < end_us {
        if let Some((decision, arrives)) = in_flight {
            if now >= arrives {
                let d: hypervisor::policy::Decision = decision;
                match d.to {
                    Some(to) => guests[usize::from(to)].held |= 1 << d.core,
                    None => free |= 1 << d.core,
                }
                active.outcome(&d, MoveOutcome::Done, now);
                in_flight = None;
            }
        }
        for (i, guest) in guests.iter_mut().enumerate() {
            let want = demand(&loads[i], now);
            let held = guest.held_count() as u32;
            let busy = want.min(held);
            guest.measured = Measured {
                busy_sum: busy * 1000 + (held - busy) * IDLE_NOISE,
                cores: held as u8,
                exits_per_ms: 10,
                recent_busy_permille: 0,
            };
            guest.measured.recent_busy_permille = guest.measured.busy_mean();
            starved_us += f64::from(want.min(MAX_CORES).saturating_sub(held)) * tick as f64;
        }
        let mut asked = policy == "autonomous";
        if policy == "cooperative" {
            for (i, last) in last_report.iter_mut().enumerate() {
                let want = demand(&loads[i], now);
                let held = guests[i].held;
                let due = last
                    .is_none_or(|(d, h, at)| d != want || h != held || now - at >= HEARTBEAT_US);
                if due {
                    *last = Some((want, held, now));
                    let g = &mut guests[i];
                    let count = g.held_count();
                    let request = want.clamp(1, MAX_CORES) as i16 - i16::from(count);
                    // As the guests do: a request keeps the time it began while it stands.
                    let request_since_us = match &g.report {
                        Some(last) if last.request == request => last.request_since_us,
                        _ => now,
                    };
                    g.report = Some(Report {
                        at_us: now,
                        runnable: want,
                        busy_sum: g.measured.busy_sum,
                        cores: count,
                        request,
                        request_since_us,
                        hint: Hint::Compute,
                        final_offer: request < 0 && final_offer(&loads[i], now),
                    });
                    asked = true;
                }
            }
            asked |= active.pending();
        }
        if asked && in_flight.is_none() {
            let seen = Observation {
                now_us: now,
                free,
                guests: &guests,
            };
            if let Some(d) = active.decide(&seen) {
                match d.from {
                    Some(from) => guests[usize::from(from)].held &= !(1 << d.core),
                    None => free &= !(1 << d.core),
                }
                prediction.moves += 1;
                if d.to == Some(0) && prediction.lavender_first_move_ms.is_none() {
                    if let Some(step) = lavender_step.filter(|&s| now >= s) {
                        prediction.lavender_first_move_ms = Some((now - step) as f64 / 1000.0);
                    }
                }
                in_flight = Some((d, now + setting.move_cost_us));
            }
        }
        now += tick;
    }
    prediction.starved_ms = starved_us / 1000.0;
    prediction
}

/// `static` moves nothing: only the starved core time of the boot partition.
fn static_prediction(loads: &[Vec<Load>; 2], since_us: u64, end_us: u64) -> Prediction {
    let held = [1u32, 2];
    let mut starved_us = 0.0;
    let mut now = since_us;
    while now < end_us {
        for (i, h) in held.iter().enumerate() {
            starved_us +=
                f64::from(demand(&loads[i], now).min(MAX_CORES).saturating_sub(*h)) * 1000.0;
        }
        now += 1000;
    }
    Prediction {
        starved_ms: starved_us / 1000.0,
        ..Prediction::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(at_us: u64, runnable: u64) -> Load {
        Load {
            at_us,
            from_us: at_us,
            runnable,
            busy_cores: 0.0,
            final_offer: false,
        }
    }

    /// Lavender's two threads run from 10 ms to 600 ms; Linux idles.
    fn lavender_busy() -> [Vec<Load>; 2] {
        [
            vec![load(0, 0), load(10_000, 2), load(600_000, 0)],
            vec![load(0, 0)],
        ]
    }

    #[test]
    fn autonomous_gives_the_busy_guest_a_core_after_its_confirmation() {
        let setting = Setting {
            period_us: 1_000,
            move_cost_us: 5_000,
        };
        let p = replay("autonomous", &lavender_busy(), 0, 500_000, setting);
        assert_eq!(p.moves, 1, "{p:?}");
        let first = p.lavender_first_move_ms.unwrap();
        assert!((1.0..=5.0).contains(&first), "{p:?}");
        // Starved: 1 core from the step to the move's arrival.
        assert!(
            p.starved_ms >= first && p.starved_ms <= first + 6.0,
            "{p:?}"
        );
    }

    #[test]
    fn a_longer_period_reacts_later() {
        let at = |period_us| {
            replay(
                "autonomous",
                &lavender_busy(),
                0,
                500_000,
                Setting {
                    period_us,
                    move_cost_us: 5_000,
                },
            )
            .lavender_first_move_ms
            .unwrap()
        };
        assert!(at(20_000) > at(1_000));
    }

    #[test]
    fn static_never_moves_and_starves_the_busy_guest() {
        let p = replay(
            "static",
            &lavender_busy(),
            0,
            500_000,
            Setting {
                period_us: 1_000,
                move_cost_us: 1_000,
            },
        );
        assert_eq!(p.moves, 0);
        assert!((p.starved_ms - 490.0).abs() <= 1.0, "{p:?}");
    }

    #[test]
    fn a_final_offer_in_the_trace_sends_the_core_to_the_pool_without_the_wait() {
        // Lavender's job ends at 300 ms and the replay at 305 ms: the core's release to the
        // pool is among the moves only when the trace's offer is final (no 10 ms wait).
        let mut loads = lavender_busy();
        loads[0] = vec![load(0, 0), load(10_000, 2), load(300_000, 0)];
        let setting = Setting {
            period_us: 1_000,
            move_cost_us: 100,
        };
        let waited = replay("cooperative", &loads, 0, 305_000, setting);
        loads[0][2].final_offer = true;
        let at_once = replay("cooperative", &loads, 0, 305_000, setting);
        assert_eq!(
            (waited.moves, at_once.moves),
            (1, 2),
            "{waited:?} {at_once:?}"
        );
    }

    #[test]
    fn cooperative_moves_on_the_first_report_that_asks() {
        let p = replay(
            "cooperative",
            &lavender_busy(),
            0,
            500_000,
            Setting {
                period_us: 1_000,
                move_cost_us: 5_000,
            },
        );
        assert_eq!(p.moves, 1, "{p:?}");
        // The policy acts on the first report that calls for a move: within a tick or two.
        let first = p.lavender_first_move_ms.unwrap();
        assert!(first <= 2.0, "{p:?}");
    }
}
