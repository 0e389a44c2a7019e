//! `primes`: the parallel CPU-bound worker. Each round starts `threads` threads, each counting
//! the primes in its share of `0..limit`, joins them all and checks the total against an
//! independent sieve. Prints one line per round and a summary; exits 0 only if every round
//! was right and every worker ran exactly once.
//!
//! Arguments: `threads=N` (1..=64, default 8), `limit=N` (default 200000), `rounds=N`
//! (default 1).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use lavender_user::args::{self, NumberError};
use lavender_user::thread::{self, MAX_THREADS};
use lavender_user::{primes, println, sys};

lavender_user::main!(main);

static LIMIT: AtomicU64 = AtomicU64::new(0);
static THREADS: AtomicU64 = AtomicU64::new(1);
/// How many times each worker of the current round ran (must end at exactly 1).
static RUNS: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];
/// Cores the workers finished on, as a bit mask of core indices.
static CORES_SEEN: AtomicU64 = AtomicU64::new(0);

fn worker(index: u64) -> u64 {
    let range = primes::share(
        LIMIT.load(Ordering::Relaxed),
        THREADS.load(Ordering::Relaxed),
        index,
    );
    let count = primes::count_primes(range);
    RUNS[index as usize].fetch_add(1, Ordering::Relaxed);
    CORES_SEEN.fetch_or(1 << (sys::core_id() % 64), Ordering::Relaxed);
    count
}

fn argument(args: &str, key: &str, default: u64, min: u64, max: u64) -> Option<u64> {
    match args::number(args, key, default, min, max) {
        Ok(value) => Some(value),
        Err(NumberError::NotANumber) => {
            println!("{key}= is not a number");
            None
        }
        Err(NumberError::OutOfRange { min, max }) => {
            println!("{key}= must be in {min}..={max}");
            None
        }
    }
}

fn main(args: &str) -> i32 {
    let (Some(threads), Some(limit), Some(rounds)) = (
        argument(args, "threads", 8, 1, MAX_THREADS as u64),
        argument(args, "limit", 200_000, 0, primes::SIEVE_LIMIT),
        argument(args, "rounds", 1, 1, 10_000),
    ) else {
        return 2;
    };
    LIMIT.store(limit, Ordering::Relaxed);
    THREADS.store(threads, Ordering::Relaxed);
    let expected = primes::sieve_count(limit).unwrap_or(0);
    println!(
        "pid {} on core {}: {threads} threads x {rounds} rounds, primes below {limit} (expect {expected})",
        sys::process_id(),
        sys::core_id()
    );
    let (mut created, mut finished, mut duplicated, mut wrong) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..rounds {
        let started = sys::clock_us();
        CORES_SEEN.store(0, Ordering::Relaxed);
        for runs in &RUNS[..threads as usize] {
            runs.store(0, Ordering::Relaxed);
        }
        let mut handles: [Option<thread::JoinHandle>; MAX_THREADS] = [const { None }; MAX_THREADS];
        for (index, handle) in handles.iter_mut().take(threads as usize).enumerate() {
            match thread::spawn(worker, index as u64) {
                Ok(started) => {
                    *handle = Some(started);
                    created += 1;
                }
                Err(error) => println!("round {round}: worker {index} not started: {error}"),
            }
        }
        let mut total = 0;
        for handle in handles.iter_mut().filter_map(Option::take) {
            match handle.join() {
                Ok(count) => total += count,
                Err(error) => println!("round {round}: join failed: {error}"),
            }
        }
        for runs in &RUNS[..threads as usize] {
            match runs.load(Ordering::Relaxed) {
                0 => {}
                1 => finished += 1,
                more => {
                    finished += 1;
                    duplicated += more - 1;
                }
            }
        }
        let ok = total == expected;
        wrong += u64::from(!ok);
        println!(
            "round {round}: {threads} threads counted {total} primes below {limit} in {} us on cores {:#x} ({})",
            sys::clock_us().wrapping_sub(started),
            CORES_SEEN.load(Ordering::Relaxed),
            if ok { "ok" } else { "WRONG" }
        );
    }
    let lost = created - finished.min(created);
    let clean = wrong == 0 && lost == 0 && duplicated == 0;
    println!(
        "done: {rounds} rounds, {wrong} wrong; workers created {created}, finished {finished}, lost {lost}, duplicated {duplicated} ({})",
        if clean { "ok" } else { "FAILED" }
    );
    if clean {
        0
    } else {
        1
    }
}
