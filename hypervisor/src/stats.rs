//! The figures behind `vmctl stats` that need no machine (host-tested): the time of each
//! stage of recent core moves, kept per direction, with their medians; and the baseline a
//! reset leaves, which readings are taken against. The publisher on the BSP
//! (`stats_page`) owns one of each and is their only writer.

use heapless::{HistoryBuf, Vec};

use crate::partition::MAX_GUESTS;
use crate::platform::MAX_CPUS;
use crate::vmx::exit::{ExitTimesSnapshot, COUNTED_REASONS};

/// Samples kept per direction and stage: the medians are over the last this many moves.
pub const SAMPLES: usize = 64;
/// Directions and stages tracked at most (a move has at most 8 stages, plus its total).
const ENTRIES: usize = 32;

/// One direction's stage: from and to a guest id, or `None` for the hypervisor's pool.
pub struct StageEntry {
    pub from: Option<u8>,
    pub to: Option<u8>,
    pub stage: &'static str,
    /// Samples recorded since the last reset (the median covers the last [`SAMPLES`]).
    pub count: u64,
    samples: HistoryBuf<u64, SAMPLES>,
}

impl StageEntry {
    /// The median of the kept samples (the upper one of an even count), in µs.
    pub fn median(&self) -> u64 {
        let mut sorted: Vec<u64, SAMPLES> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or(0)
    }
}

/// Stage times of completed moves, per direction, in the order stages were first seen.
pub struct StageSamples {
    entries: Vec<StageEntry, ENTRIES>,
}

impl StageSamples {
    pub const fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Adds `us` for `stage` of a move from `from` to `to`. When the table is full a new
    /// stage is not tracked (stage names are a fixed few, so it never is in practice).
    pub fn record(&mut self, from: Option<u8>, to: Option<u8>, stage: &'static str, us: u64) {
        let found = self
            .entries
            .iter()
            .position(|e| e.from == from && e.to == to && e.stage == stage);
        let index = match found {
            Some(index) => index,
            None => {
                let entry = StageEntry {
                    from,
                    to,
                    stage,
                    count: 0,
                    samples: HistoryBuf::new(),
                };
                if self.entries.push(entry).is_err() {
                    return;
                }
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[index];
        entry.count += 1;
        entry.samples.write(us);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn entries(&self) -> &[StageEntry] {
        &self.entries
    }
}

impl Default for StageSamples {
    fn default() -> Self {
        Self::new()
    }
}

/// Exit accounts per core and guest (see `vmx::exit::ExitTimes`), as read at a reset.
pub struct ExitBaseline([[ExitTimesSnapshot; MAX_GUESTS]; MAX_CPUS]);

impl ExitBaseline {
    pub const fn new() -> Self {
        Self([[[(0, 0); COUNTED_REASONS]; MAX_GUESTS]; MAX_CPUS])
    }

    /// Remembers `now` as core `core`'s accounts for guest `guest` at the reset.
    pub fn set(&mut self, core: usize, guest: u8, now: ExitTimesSnapshot) {
        if let Some(slot) = self
            .0
            .get_mut(core)
            .and_then(|row| row.get_mut(usize::from(guest)))
        {
            *slot = now;
        }
    }

    /// `now` less the accounts at the reset (counts and cycles since it).
    pub fn since(&self, core: usize, guest: u8, now: ExitTimesSnapshot) -> ExitTimesSnapshot {
        let base = self
            .0
            .get(core)
            .and_then(|row| row.get(usize::from(guest)))
            .copied()
            .unwrap_or([(0, 0); COUNTED_REASONS]);
        core::array::from_fn(|slot| {
            (
                now[slot].0.saturating_sub(base[slot].0),
                now[slot].1.saturating_sub(base[slot].1),
            )
        })
    }
}

impl Default for ExitBaseline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_direction_and_stage() {
        let mut s = StageSamples::new();
        for us in [30, 10, 20] {
            s.record(Some(1), Some(0), "parked", us);
        }
        s.record(Some(0), Some(1), "parked", 5);
        s.record(Some(1), Some(0), "entered", 4);
        fn find(
            s: &StageSamples,
            from: Option<u8>,
            to: Option<u8>,
            stage: &str,
        ) -> Option<(u64, u64)> {
            s.entries()
                .iter()
                .find(|e| e.from == from && e.to == to && e.stage == stage)
                .map(|e| (e.count, e.median()))
        }
        assert_eq!(find(&s, Some(1), Some(0), "parked"), Some((3, 20)));
        assert_eq!(find(&s, Some(0), Some(1), "parked"), Some((1, 5)));
        assert_eq!(find(&s, Some(1), Some(0), "entered"), Some((1, 4)));
        // The upper median of an even count.
        s.record(Some(1), Some(0), "parked", 40);
        assert_eq!(find(&s, Some(1), Some(0), "parked"), Some((4, 30)));
        s.clear();
        assert!(s.entries().is_empty());
    }

    #[test]
    fn the_median_covers_the_last_samples_only() {
        let mut s = StageSamples::new();
        for _ in 0..SAMPLES {
            s.record(None, Some(1), "entered", 1_000);
        }
        for _ in 0..SAMPLES {
            s.record(None, Some(1), "entered", 7);
        }
        let e = &s.entries()[0];
        assert_eq!((e.count, e.median()), (2 * SAMPLES as u64, 7));
    }

    #[test]
    fn readings_are_taken_against_the_reset() {
        let mut base = ExitBaseline::new();
        let mut now = [(0, 0); COUNTED_REASONS];
        now[5] = (10, 1_000);
        base.set(1, 1, now);
        now[5] = (12, 1_300);
        assert_eq!(base.since(1, 1, now)[5], (2, 300));
        // Another core or guest has its own baseline; out-of-range ones read as zero.
        assert_eq!(base.since(2, 1, now)[5], (12, 1_300));
        assert_eq!(base.since(MAX_CPUS, 9, now)[5], (12, 1_300));
    }
}
