//! `phases threads=N work=K rounds=R [idle_us=S] [io=PATH calls=M]`: a batch job with a fixed
//! amount of work in phases, for the policy benchmark (`cargo xtask bench --only policies`).
//! Each round: a compute phase (N threads, each K units of arithmetic, joined); with `io=`,
//! M timed 4 KiB reads of PATH through delegation (which keeps Linux's server busy) and a
//! second compute phase; then, with `idle_us=`, a sleep of S µs. So `rounds=1 io=...` is
//! compute, I/O, compute, and `idle_us=` with many short rounds is a square wave of load.
//!
//! Prints one line, `phases: makespan_us=... compute_us=... io_us=... idle_us=... calls=...
//! call_p50_us=... call_p99_us=... call_max_us=... errors=...` (Lavender's clock: TSC time,
//! virtual under Bochs), with `io_from_us=...` (when the first I/O phase began, after the
//! start) when it ran one, and exits 0 when every call succeeded.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use lavender_user::fs::File;
use lavender_user::thread::{self, MAX_THREADS};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

/// Iterations of the arithmetic in one unit of `work`.
const UNIT: u64 = 1000;
/// The most delegated calls timed in one run (their times are kept to sort).
const MAX_CALLS: usize = 4096;
const READ_BYTES: usize = 4096;

static WORK: AtomicU64 = AtomicU64::new(0);

fn compute(_: u64) -> u64 {
    let mut x = 1u64;
    for _ in 0..WORK.load(Ordering::Relaxed) * UNIT {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

/// One compute phase: `threads` threads (this one among them) doing `WORK` units each.
fn compute_phase(threads: u64) -> bool {
    let mut handles: [Option<thread::JoinHandle>; MAX_THREADS] = [const { None }; MAX_THREADS];
    for handle in handles.iter_mut().take(threads as usize - 1) {
        match thread::spawn(compute, 0) {
            Ok(started) => *handle = Some(started),
            Err(error) => {
                println!("phases: a worker did not start: {error}");
                return false;
            }
        }
    }
    compute(0);
    handles
        .iter_mut()
        .filter_map(Option::take)
        .all(|h| h.join().is_ok())
}

/// ` io_from_us=N` when the job ran an I/O phase, nothing otherwise.
struct IoFrom(Option<u64>);

impl core::fmt::Display for IoFrom {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(us) => write!(f, " io_from_us={us}"),
            None => Ok(()),
        }
    }
}

fn main(args: &str) -> i32 {
    let (Ok(threads), Ok(work), Ok(rounds), Ok(idle_us), Ok(calls)) = (
        args::number(args, "threads", 2, 1, MAX_THREADS as u64),
        args::number(args, "work", 100, 0, 10_000_000),
        args::number(args, "rounds", 1, 1, 100_000),
        args::number(args, "idle_us", 0, 0, 10_000_000),
        args::number(args, "calls", 0, 0, MAX_CALLS as u64),
    ) else {
        println!(
            "usage: phases threads=1..={MAX_THREADS} work=K rounds=R [idle_us=S] [io=PATH calls=1..={MAX_CALLS}]"
        );
        return 2;
    };
    WORK.store(work, Ordering::Relaxed);
    let io = match args::value(args, "io") {
        Some(path) => match File::open(path) {
            Ok(file) => Some(file),
            Err(error) => {
                println!("phases: {path}: {error}");
                return 1;
            }
        },
        None => None,
    };
    let mut times = [0u64; MAX_CALLS];
    let mut buffer = [0u8; READ_BYTES];
    let (mut timed, mut errors) = (0usize, 0u64);
    let (mut compute_us, mut io_us, mut slept_us) = (0u64, 0u64, 0u64);
    let mut io_from_us = None;
    let started = sys::clock_us();
    for _ in 0..rounds {
        let at = sys::clock_us();
        if !compute_phase(threads) {
            return 1;
        }
        compute_us += sys::clock_us() - at;
        if let Some(file) = &io {
            let at = sys::clock_us();
            io_from_us.get_or_insert(at - started);
            for call in 0..calls {
                let before = sys::clock_us();
                let offset = (call * READ_BYTES as u64) % (64 * READ_BYTES as u64);
                if file.read_at(&mut buffer, offset).is_err() {
                    errors += 1;
                }
                if timed < MAX_CALLS {
                    times[timed] = sys::clock_us() - before;
                    timed += 1;
                }
            }
            io_us += sys::clock_us() - at;
            let at = sys::clock_us();
            if !compute_phase(threads) {
                return 1;
            }
            compute_us += sys::clock_us() - at;
        }
        if idle_us > 0 {
            let at = sys::clock_us();
            sys::sleep_us(idle_us);
            slept_us += sys::clock_us() - at;
        }
    }
    let makespan = sys::clock_us() - started;
    let times = &mut times[..timed];
    times.sort_unstable();
    let at = |q: u64| {
        if times.is_empty() {
            0
        } else {
            times[((times.len() as u64 - 1) * q / 100) as usize]
        }
    };
    println!(
        "phases: makespan_us={makespan} compute_us={compute_us} io_us={io_us} idle_us={slept_us} calls={timed} call_p50_us={} call_p99_us={} call_max_us={} errors={errors}{}",
        at(50),
        at(99),
        at(100),
        IoFrom(io_from_us)
    );
    i32::from(errors > 0)
}
