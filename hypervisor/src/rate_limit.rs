//! A token bucket for what a guest can make the hypervisor do over and over: warnings and
//! `isolation_violation` markers on the console, wake-ups of the monitor. A burst goes
//! through at once, then one per interval; what is dropped is counted, and the count goes
//! out with the next event let through, so nothing is lost silently.

/// Limits events to `burst` at once and one per `interval_us` on average.
pub struct RateLimit {
    burst: u32,
    interval_us: u64,
    bucket: spin::Mutex<Bucket>,
}

struct Bucket {
    tokens: u32,
    /// When the last token was added (µs).
    refilled_at: u64,
    /// Events dropped since the last one let through.
    dropped: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, interval_us: u64) -> Self {
        Self {
            burst,
            interval_us,
            bucket: spin::Mutex::new(Bucket {
                tokens: burst,
                refilled_at: 0,
                dropped: 0,
            }),
        }
    }

    /// Whether an event at `now_us` goes through: `Some(n)` with the `n` events dropped
    /// before it, `None` if it is dropped (and counted).
    pub fn admit(&self, now_us: u64) -> Option<u64> {
        let mut bucket = self.bucket.lock();
        let interval = self.interval_us.max(1);
        let earned = now_us.saturating_sub(bucket.refilled_at) / interval;
        if earned > 0 {
            bucket.tokens = (u64::from(bucket.tokens) + earned).min(u64::from(self.burst)) as u32;
            bucket.refilled_at += earned * interval;
        }
        if bucket.tokens == 0 {
            bucket.dropped += 1;
            return None;
        }
        bucket.tokens -= 1;
        Some(core::mem::take(&mut bucket.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_with_the_dropped_count() {
        let limit = RateLimit::new(3, 100);
        assert_eq!(limit.admit(0), Some(0));
        assert_eq!(limit.admit(1), Some(0));
        assert_eq!(limit.admit(2), Some(0));
        assert_eq!(limit.admit(3), None);
        assert_eq!(limit.admit(50), None);
        assert_eq!(limit.admit(100), Some(2));
        assert_eq!(limit.admit(150), None);
        // A long quiet spell refills the burst, no more.
        assert_eq!(limit.admit(10_000), Some(1));
        assert_eq!(limit.admit(10_000), Some(0));
        assert_eq!(limit.admit(10_000), Some(0));
        assert_eq!(limit.admit(10_000), None);
    }

    #[test]
    fn a_flood_is_bounded() {
        let limit = RateLimit::new(8, 1000);
        let admitted = (0..1_000_000u64)
            .filter(|t| limit.admit(*t).is_some())
            .count();
        // 8 at once, then one per ms over one second.
        assert_eq!(admitted, 8 + 999);
    }
}
