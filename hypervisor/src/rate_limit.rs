//! A limit on how often something a guest triggers is reported: at most `burst` reports
//! per window, the rest counted and the count given with the next report allowed. A guest
//! that repeats a refused action must not flood the console (each line costs every core
//! the console's lock and milliseconds of serial time).

/// Reports allowed per window, and the window's length (in any clock's ticks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    window_start: u64,
    used: u32,
    suppressed: u64,
}

/// What the caller may do with one more report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Report it, noting that `suppressed` reports were dropped since the last one.
    Report { suppressed: u64 },
    /// Drop it (counted).
    Suppress,
}

impl RateLimit {
    pub const fn new() -> Self {
        Self {
            window_start: 0,
            used: 0,
            suppressed: 0,
        }
    }

    /// One more report at time `now`: allowed while fewer than `burst` were made in the
    /// current window of `window` ticks.
    pub fn check(&mut self, now: u64, window: u64, burst: u32) -> Verdict {
        if now.wrapping_sub(self.window_start) >= window || self.used == 0 {
            self.window_start = now;
            self.used = 0;
        }
        if self.used >= burst {
            self.suppressed += 1;
            return Verdict::Suppress;
        }
        self.used += 1;
        let suppressed = core::mem::take(&mut self.suppressed);
        Verdict::Report { suppressed }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_dropped_count_with_the_next_report() {
        let mut limit = RateLimit::new();
        for t in 0..3 {
            assert_eq!(
                limit.check(100 + t, 1000, 3),
                Verdict::Report { suppressed: 0 }
            );
        }
        for t in 0..5 {
            assert_eq!(limit.check(200 + t, 1000, 3), Verdict::Suppress);
        }
        // The window started at 100: by 1100 a new one begins.
        assert_eq!(limit.check(1099, 1000, 3), Verdict::Suppress);
        assert_eq!(
            limit.check(1100, 1000, 3),
            Verdict::Report { suppressed: 6 }
        );
        assert_eq!(
            limit.check(1101, 1000, 3),
            Verdict::Report { suppressed: 0 }
        );
    }

    #[test]
    fn a_flood_is_bounded_by_the_burst_per_window() {
        let mut limit = RateLimit::new();
        let reports = (0..100_000u64)
            .filter(|t| matches!(limit.check(*t, 10_000, 4), Verdict::Report { .. }))
            .count();
        assert_eq!(reports, 10 * 4);
    }
}
