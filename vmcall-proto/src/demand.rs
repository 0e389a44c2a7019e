//! A guest's request for cores, steadied before it goes into a load report.
//!
//! Both guests count their runnable threads at an instant, and that count is noisy: a
//! management command or a thread back from a delegated call runs for a moment, and a
//! compute thread waits a moment for its output to be written. Asked and offered as it is,
//! such a count moves a core and back within a few milliseconds (seen with Linux asking for
//! a core while a `vmctl` process ran, as Lavender's threads waited on a delegated write).
//!
//! [`SteadyRequest`] treats the two directions differently:
//! * **A step up** (more cores wanted than held) passes once it has lasted `grow_after_us`:
//!   a guest whose work grew asks at once, or nearly.
//! * **An offer** follows a mean of the cores wanted (an exponential mean with time constant
//!   `shrink_mean_us`): the guest offers the cores the mean, rounded, no longer needs
//!   ([`SPARE_MILLI`]). A blip of the count (a command that runs for some milliseconds)
//!   moves the mean by a fraction of a core and withdraws nothing, so an idle guest's offer
//!   stands while its count flickers; a guest that was busy on two cores offers one once the
//!   mean has come down, some 0.7 time constants (ln 2) after its load fell.
//!
//! * **A bound** ([`SteadyRequest::bound`]): the mean never needs more cores than the
//!   guest's live work could use (Lavender: the most threads each live process had at once,
//!   the threads it has now for one in a phase of delegated I/O). A job that ended has no
//!   threads left, and one that joined its workers to wait on I/O has one, so the cores they
//!   held are offered at once instead of a mean's decay later.
//!
//! A report's time is when its request passed, so the policy's reaction is measured from
//! there.

/// How far below a whole core the mean of the cores wanted must come before the core is
/// offered (thousandths of a core): half, so the mean is rounded.
pub const SPARE_MILLI: u32 = 500;

/// Passes a guest's request (cores wanted beyond those held, or offered when negative) on:
/// a step up once it has lasted, an offer by the mean of the cores wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteadyRequest {
    grow_after_us: u64,
    shrink_mean_us: u64,
    /// Since when more cores have been wanted than held.
    growing_since: Option<u64>,
    /// The mean of the cores wanted, in thousandths of a core, up to the last sample; that
    /// sample's cores wanted and time.
    mean: Option<(u32, u32, u64)>,
}

impl SteadyRequest {
    /// `grow_after_us`: how long a step up must last; `shrink_mean_us`: the time constant of
    /// the mean that offers cores (at least 1 µs).
    pub const fn new(grow_after_us: u64, shrink_mean_us: u64) -> Self {
        Self {
            grow_after_us,
            shrink_mean_us: if shrink_mean_us == 0 {
                1
            } else {
                shrink_mean_us
            },
            growing_since: None,
            mean: None,
        }
    }

    /// The request to report at `now_us` when the guest wants `wanted` cores now (its
    /// runnable threads within its bounds, at least 1) and holds `held`. Call it on every
    /// sample, not only when a report is due: the step's duration and the mean are measured
    /// from the samples.
    pub fn steady(&mut self, wanted: u32, held: u32, now_us: u64) -> i16 {
        self.sample(wanted, now_us);
        if wanted > held {
            let since = *self.growing_since.get_or_insert(now_us);
            return if now_us.saturating_sub(since) >= self.grow_after_us {
                clamp_request(i64::from(wanted) - i64::from(held))
            } else {
                0
            };
        }
        self.growing_since = None;
        let needs = self.needs().max(1);
        if needs < held {
            clamp_request(i64::from(needs) - i64::from(held))
        } else {
            0
        }
    }

    /// From now on at most `at_most` cores are wanted (what the guest's live work could use
    /// at all): the mean, and the cores wanted at the last sample, come down to it at once.
    pub fn bound(&mut self, at_most: u32) {
        if let Some((mean, before, at)) = self.mean {
            self.mean = Some((
                mean.min(at_most.saturating_mul(1000)),
                before.min(at_most),
                at,
            ));
        }
    }

    /// Cores the mean of the cores wanted needs (0 before the first sample): the mean
    /// rounded up once it exceeds a whole core by more than [`SPARE_MILLI`].
    pub fn needs(&self) -> u32 {
        self.mean.map_or(0, |(mean, _, _)| {
            mean.saturating_sub(SPARE_MILLI).div_ceil(1000)
        })
    }

    fn sample(&mut self, wanted: u32, now_us: u64) {
        let mean = match self.mean {
            None => wanted.saturating_mul(1000),
            Some((mean, before, at)) => {
                // One Euler step of the exponential mean over the time since the last sample,
                // during which the guest wanted what it wanted then; a step longer than the
                // time constant takes the mean all the way there.
                let dt = now_us.saturating_sub(at).min(self.shrink_mean_us) as i64;
                let tau = self.shrink_mean_us as i64;
                let (mean, target) = (i64::from(mean), i64::from(before.saturating_mul(1000)));
                (mean + (target - mean) * dt / tau).clamp(0, i64::from(u32::MAX)) as u32
            }
        };
        self.mean = Some((mean, wanted, now_us));
    }
}

fn clamp_request(delta: i64) -> i16 {
    delta.clamp(-64, 64) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_up_passes_once_it_lasted() {
        let mut s = SteadyRequest::new(5, 50);
        assert_eq!(s.steady(1, 1, 0), 0);
        assert_eq!(s.steady(2, 1, 100), 0);
        assert_eq!(s.steady(2, 1, 104), 0);
        assert_eq!(s.steady(3, 1, 105), 2);
        assert_eq!(s.steady(2, 1, 106), 1);
        // Back to what it holds: the step is over, the next one waits again.
        assert_eq!(s.steady(1, 1, 107), 0);
        assert_eq!(s.steady(2, 1, 108), 0);
    }

    #[test]
    fn zero_grow_time_asks_at_once() {
        let mut s = SteadyRequest::new(0, 50);
        assert_eq!(s.steady(3, 1, 7), 2);
    }

    #[test]
    fn an_idle_guest_offers_and_a_blip_withdraws_nothing() {
        let mut s = SteadyRequest::new(5_000, 20_000);
        // Idle for long on two cores: the mean is one core, one is offered.
        for t in 0..100 {
            assert_eq!(s.steady(1, 2, t * 1_000), -1, "at {t} ms");
        }
        // Two runnable for 2 ms (a command): still offered.
        assert_eq!(s.steady(2, 2, 100_000), -1);
        assert_eq!(s.steady(2, 2, 101_000), -1);
        assert_eq!(s.steady(1, 2, 102_000), -1);
        // Busy on both for good: the offer ends within a few ms and stays ended.
        let withdrawn = (103..140)
            .find(|&t| s.steady(2, 2, t * 1_000) == 0)
            .expect("a lasting load withdraws the offer");
        assert!(withdrawn <= 120, "withdrawn at {withdrawn} ms");
        for t in withdrawn + 1..200 {
            assert_eq!(s.steady(2, 2, t * 1_000), 0, "at {t} ms");
        }
    }

    #[test]
    fn a_guest_whose_load_fell_offers_after_the_mean_came_down() {
        let mut s = SteadyRequest::new(1_000, 20_000);
        for t in 0..50 {
            s.steady(2, 2, t * 1_000);
        }
        assert_eq!(s.needs(), 2);
        let offered = (50..200)
            .find(|&t| s.steady(1, 2, t * 1_000) == -1)
            .expect("an idle guest offers");
        // ln(2) time constants: about 14 ms after the fall.
        assert!((55..=70).contains(&offered), "offered at {offered} ms");
    }

    #[test]
    fn a_bound_offers_at_once_what_no_thread_could_use() {
        let mut s = SteadyRequest::new(0, 50_000);
        for t in 0..100 {
            assert_eq!(s.steady(2, 2, t * 1_000), 0);
        }
        // A thread of two waits a moment: the mean keeps both cores.
        assert_eq!(s.steady(1, 2, 100_000), 0);
        assert_eq!(s.steady(1, 2, 101_000), 0);
        // The job ended: one thread (some other program's) exists; its core is offered now.
        s.bound(1);
        assert_eq!(s.needs(), 1);
        assert_eq!(s.steady(1, 2, 102_000), -1);
        // A bound above the mean changes nothing.
        let mut t = SteadyRequest::new(0, 50_000);
        t.steady(2, 2, 0);
        t.bound(4);
        assert_eq!(t.needs(), 2);
        assert_eq!(t.steady(2, 2, 1_000), 0);
    }

    #[test]
    fn the_mean_survives_odd_sample_times() {
        let mut s = SteadyRequest::new(0, 0);
        assert_eq!(s.steady(4, 1, u64::MAX), 3);
        assert_eq!(s.steady(1, 4, 0), 0, "time going back takes no step");
        assert_eq!(s.needs(), 4);
        assert_eq!(s.steady(u32::MAX, 1, 5), 64);
        // The mean takes in a sample over the time after it.
        assert_eq!(s.needs(), 1);
        assert_eq!(s.steady(u32::MAX, 1, 6), 64);
        assert!(s.needs() > 64);
    }
}
