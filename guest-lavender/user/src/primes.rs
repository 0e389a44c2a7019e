//! The parallel primes workload: counting primes below a limit, split into equal ranges, one
//! per worker thread. CPU-bound, no shared state between workers, and a known answer
//! (pi(200 000) = 17 984), so a run that loses or duplicates a thread while cores come and go
//! gets the wrong count.

use core::ops::Range;

/// Whether `n` is prime, by trial division with odd divisors up to sqrt(n). Deliberately plain:
/// the workload is meant to keep cores busy for a predictable time.
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut divisor = 3;
    while divisor * divisor <= n {
        if n % divisor == 0 {
            return false;
        }
        divisor += 2;
    }
    true
}

/// Primes in `range`.
pub fn count_primes(range: Range<u64>) -> u64 {
    range.filter(|n| is_prime(*n)).count() as u64
}

/// Worker `index` of `workers`' share of `0..limit`: contiguous ranges that cover `0..limit`
/// exactly once between them. `workers` must be at least 1.
pub fn share(limit: u64, workers: u64, index: u64) -> Range<u64> {
    let bound = |i: u64| (u128::from(limit) * u128::from(i) / u128::from(workers.max(1))) as u64;
    bound(index)..bound(index + 1)
}

/// Largest limit [`sieve_count`] takes: its base primes up to sqrt(limit) fit a small table.
pub const SIEVE_LIMIT: u64 = 100_000_000;

/// Primes below `limit` by a segmented sieve of Eratosthenes: an independent way to get the
/// count the workers must reach. `None` above [`SIEVE_LIMIT`]. Uses about 9 KiB of stack (it
/// runs on the main thread's stack): a 32768-number bit segment and pi(10^4) = 1229 base primes.
pub fn sieve_count(limit: u64) -> Option<u64> {
    const SEGMENT_WORDS: usize = 512;
    const SEGMENT: u64 = SEGMENT_WORDS as u64 * 64;
    const BASE: usize = 1229;
    if limit > SIEVE_LIMIT {
        return None;
    }
    let mut base = [0u32; BASE];
    let mut bases = 0;
    let mut candidate: u32 = 2;
    while u64::from(candidate) * u64::from(candidate) < limit {
        if base[..bases].iter().all(|p| candidate % p != 0) {
            base[bases] = candidate;
            bases += 1;
        }
        candidate += 1;
    }
    let mut count = 0;
    let mut composite = [0u64; SEGMENT_WORDS];
    let mut low = 0;
    while low < limit {
        let high = (low + SEGMENT).min(limit);
        composite.fill(0);
        for p in base[..bases].iter().map(|p| u64::from(*p)) {
            let mut multiple = (low.div_ceil(p) * p).max(p * p);
            while multiple < high {
                let bit = (multiple - low) as usize;
                composite[bit / 64] |= 1 << (bit % 64);
                multiple += p;
            }
        }
        count += (low.max(2)..high)
            .filter(|n| {
                let bit = (n - low) as usize;
                composite[bit / 64] & 1 << (bit % 64) == 0
            })
            .count() as u64;
        low = high;
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_primes() {
        let primes: Vec<u64> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(!is_prime(49));
        assert!(is_prime(199_999));
    }

    #[test]
    fn known_counts() {
        assert_eq!(count_primes(0..1000), 168);
        assert_eq!(count_primes(0..200_000), 17_984);
    }

    #[test]
    fn the_sieve_agrees() {
        for limit in [0, 1, 2, 3, 10, 100, 1000, 32_768, 32_769, 200_000] {
            assert_eq!(sieve_count(limit), Some(count_primes(0..limit)), "{limit}");
        }
        assert_eq!(sieve_count(1_000_000), Some(78_498));
        assert_eq!(sieve_count(SIEVE_LIMIT + 1), None);
    }

    #[test]
    fn shares_partition_the_range() {
        for workers in 1..=13 {
            let mut next = 0;
            let mut total = 0;
            for index in 0..workers {
                let range = share(200_000, workers, index);
                assert_eq!(range.start, next);
                next = range.end;
                total += count_primes(range);
            }
            assert_eq!(next, 200_000);
            assert_eq!(total, 17_984, "{workers} workers");
        }
    }
}
