//! The seeded random sequence of core grants and revokes the core-move test makes (a test
//! input, not a scheduling policy), and the statistics it reports. Pure and deterministic:
//! the same seed gives the same moves.

/// xorshift64* (Vigna, 2016): small, fast, and good enough to pick cores.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A random set bit of `mask` (which must not be empty).
    fn pick(&mut self, mask: u64) -> usize {
        let n = mask.count_ones() as u64;
        let mut k = self.next_u64() % n;
        for bit in 0..64 {
            if mask & (1 << bit) != 0 {
                if k == 0 {
                    return bit;
                }
                k -= 1;
            }
        }
        unreachable!("mask has {n} bits")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Grant(usize),
    Revoke(usize),
}

/// The next move: grant one of `grantable` or revoke one of `revocable` (bit masks of
/// cores), choosing at random when both are possible.
pub fn next_action(rng: &mut Rng, grantable: u64, revocable: u64) -> Option<Action> {
    match (grantable != 0, revocable != 0) {
        (false, false) => None,
        (true, false) => Some(Action::Grant(rng.pick(grantable))),
        (false, true) => Some(Action::Revoke(rng.pick(revocable))),
        (true, true) if rng.next_u64().is_multiple_of(2) => {
            Some(Action::Grant(rng.pick(grantable)))
        }
        (true, true) => Some(Action::Revoke(rng.pick(revocable))),
    }
}

/// Median and worst of a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub median: u64,
    pub worst: u64,
}

pub fn summarize(samples: &mut [u64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    Summary {
        count: samples.len(),
        median: samples[samples.len() / 2],
        worst: samples[samples.len() - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_moves_and_moves_respect_the_masks() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..100)
                .map(|_| next_action(&mut rng, 0b1100, 0b0110))
                .collect::<std::vec::Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        for action in run(7) {
            match action.unwrap() {
                Action::Grant(c) => assert!(c == 2 || c == 3),
                Action::Revoke(c) => assert!(c == 1 || c == 2),
            }
        }
        let mut rng = Rng::new(1);
        assert_eq!(next_action(&mut rng, 0, 0), None);
        assert_eq!(next_action(&mut rng, 0b1000, 0), Some(Action::Grant(3)));
    }

    #[test]
    fn both_actions_happen() {
        let mut rng = Rng::new(9);
        let actions: std::vec::Vec<_> = (0..50)
            .map(|_| next_action(&mut rng, 0b10, 0b100).unwrap())
            .collect();
        assert!(actions.iter().any(|a| matches!(a, Action::Grant(_))));
        assert!(actions.iter().any(|a| matches!(a, Action::Revoke(_))));
    }

    #[test]
    fn summary_gives_median_and_worst() {
        assert_eq!(
            summarize(&mut [5, 1, 9, 3, 7]),
            Summary {
                count: 5,
                median: 5,
                worst: 9
            }
        );
        assert_eq!(summarize(&mut []), Summary::default());
    }
}
