//! A guest's request for cores, steadied before it goes into a load report.
//!
//! Both guests count their runnable threads at an instant, and that count is noisy: a
//! management command or a thread back from a delegated call runs for a moment, and a
//! compute thread waits a moment for its output to be written. Asked and offered as it is,
//! such a count moves a core and back within a few milliseconds (seen with Linux asking for
//! a core while a `vmctl` process ran, as Lavender's threads waited on a delegated write).
//! [`SteadyRequest`] passes a request on only once it has lasted: a step up after
//! `grow_after_us`, a step down after `shrink_after_us`. A report's time is when the request
//! passed, so the policy's reaction is measured from there.

/// Passes a guest's request (cores wanted beyond those held, or offered when negative) on
/// once it has kept its sign for long enough; until then the request reported is 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteadyRequest {
    grow_after_us: u64,
    shrink_after_us: u64,
    /// Since when the request has had its current sign (non-zero only).
    since: Option<(u64, bool)>,
}

impl SteadyRequest {
    pub const fn new(grow_after_us: u64, shrink_after_us: u64) -> Self {
        Self {
            grow_after_us,
            shrink_after_us,
            since: None,
        }
    }

    /// The request to report at `now_us` for the request `raw` measured now. Call it on
    /// every sample, not only when a report is due: the time a sign has lasted is measured
    /// from the samples.
    pub fn steady(&mut self, raw: i16, now_us: u64) -> i16 {
        if raw == 0 {
            self.since = None;
            return 0;
        }
        let grow = raw > 0;
        let at = match self.since {
            Some((at, sign)) if sign == grow => at,
            _ => {
                self.since = Some((now_us, grow));
                now_us
            }
        };
        let wait = if grow {
            self.grow_after_us
        } else {
            self.shrink_after_us
        };
        if now_us.saturating_sub(at) >= wait {
            raw
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_passes_once_it_lasted() {
        let mut s = SteadyRequest::new(5, 50);
        assert_eq!(s.steady(1, 100), 0);
        assert_eq!(s.steady(1, 104), 0);
        assert_eq!(s.steady(2, 105), 2);
        assert_eq!(s.steady(1, 106), 1);
        // Down: only after 50.
        assert_eq!(s.steady(-1, 110), 0);
        assert_eq!(s.steady(-1, 159), 0);
        assert_eq!(s.steady(-1, 160), -1);
    }

    #[test]
    fn a_blip_asks_for_nothing() {
        let mut s = SteadyRequest::new(5, 50);
        for t in 0..100 {
            // Up for 3 of every 10 µs, balanced otherwise.
            let raw = if t % 10 < 3 { 1 } else { 0 };
            assert_eq!(s.steady(raw, t), 0, "at {t}");
        }
        // A dip shorter than the shrink time offers nothing, and a sign change starts over.
        assert_eq!(s.steady(-1, 200), 0);
        assert_eq!(s.steady(1, 240), 0);
        assert_eq!(s.steady(-1, 245), 0);
        assert_eq!(s.steady(-1, 290), 0);
        assert_eq!(s.steady(-1, 295), -1);
    }

    #[test]
    fn zero_waits_pass_at_once() {
        let mut s = SteadyRequest::new(0, 0);
        assert_eq!(s.steady(3, 7), 3);
        assert_eq!(s.steady(-2, 8), -2);
        assert_eq!(s.steady(0, 9), 0);
    }
}
