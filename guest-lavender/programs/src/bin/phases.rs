//! `phases threads=N work=K rounds=R [idle_us=S] [io=PATH calls=M [readers=T]]`: a batch job
//! with a fixed amount of work in phases, for the policy benchmark (`cargo xtask bench --only
//! policies`). Each round: a compute phase (N threads, each K units of arithmetic, joined),
//! then, with `idle_us=`, a sleep of S µs; so `idle_us=` with many short rounds is a square
//! wave of load. With `io=`, the job is a time-stepped one: a compute phase, then R rounds of
//! an I/O phase and a compute phase (`rounds=1 io=...` is compute, I/O, compute). In an I/O
//! phase T threads (default 1) each make M timed 4 KiB reads of PATH through delegation,
//! which keeps as many of Linux's servers busy.
//!
//! Prints one line, `phases: makespan_us=... compute_us=... io_us=... idle_us=... calls=...
//! call_p50_us=... call_p99_us=... call_max_us=... errors=...` (Lavender's clock: TSC time,
//! virtual under Bochs), with `io_from_us=...` (when the first I/O phase began, after the
//! start) when it ran one, and exits 0 when every call succeeded.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use lavender_user::fs::File;
use lavender_user::thread::{self, MAX_THREADS};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

/// Iterations of the arithmetic in one unit of `work`.
const UNIT: u64 = 1000;
/// The most delegated calls timed in one run (their times are kept to sort).
const MAX_CALLS: usize = 4096;
const READ_BYTES: usize = 4096;
/// The longest `io=` path.
const MAX_PATH: usize = 256;

static WORK: AtomicU64 = AtomicU64::new(0);
/// Reads each reader makes in an I/O phase.
static CALLS: AtomicU64 = AtomicU64::new(0);
/// Every timed read's duration in µs, in the order they ended, and how many there are.
static TIMES: [AtomicU64; MAX_CALLS] = [const { AtomicU64::new(0) }; MAX_CALLS];
static TIMED: AtomicUsize = AtomicUsize::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
/// The `io=` path, for the readers this thread starts: each opens the file for itself.
static IO_PATH: PathSlot = PathSlot {
    length: AtomicUsize::new(0),
    bytes: [const { AtomicU8::new(0) }; MAX_PATH],
};

struct PathSlot {
    length: AtomicUsize,
    bytes: [AtomicU8; MAX_PATH],
}

impl PathSlot {
    /// Keeps `path`; false if it is longer than [`MAX_PATH`].
    fn set(&self, path: &str) -> bool {
        if path.len() > MAX_PATH {
            return false;
        }
        for (slot, byte) in self.bytes.iter().zip(path.bytes()) {
            slot.store(byte, Ordering::Relaxed);
        }
        self.length.store(path.len(), Ordering::Release);
        true
    }

    /// Copies the path kept into `buffer`.
    fn get<'a>(&self, buffer: &'a mut [u8; MAX_PATH]) -> &'a str {
        let length = self.length.load(Ordering::Acquire);
        for (byte, slot) in buffer.iter_mut().zip(&self.bytes[..length]) {
            *byte = slot.load(Ordering::Relaxed);
        }
        core::str::from_utf8(&buffer[..length]).unwrap_or("")
    }
}

fn compute(_: u64) -> u64 {
    let mut x = 1u64;
    for _ in 0..WORK.load(Ordering::Relaxed) * UNIT {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

/// Runs `worker` on `count - 1` new threads and `own` on this one, then joins them; false
/// (with a line saying so) if a thread did not start, or when one failed.
fn together(count: u64, worker: fn(u64) -> u64, own: impl FnOnce(), what: &str) -> bool {
    let mut handles: [Option<thread::JoinHandle>; MAX_THREADS] = [const { None }; MAX_THREADS];
    for handle in handles.iter_mut().take(count as usize - 1) {
        match thread::spawn(worker, 0) {
            Ok(started) => *handle = Some(started),
            Err(error) => {
                println!("phases: a {what} did not start: {error}");
                return false;
            }
        }
    }
    own();
    handles
        .iter_mut()
        .filter_map(Option::take)
        .all(|h| h.join().is_ok())
}

/// One compute phase: `threads` threads (this one among them) doing `WORK` units each.
fn compute_phase(threads: u64) -> bool {
    together(
        threads,
        compute,
        || {
            compute(0);
        },
        "worker",
    )
}

/// [`CALLS`] timed reads of `file`, at offsets cycling through its first 256 KiB.
fn reads(file: &File) {
    let mut buffer = [0u8; READ_BYTES];
    for call in 0..CALLS.load(Ordering::Relaxed) {
        let before = sys::clock_us();
        let offset = (call * READ_BYTES as u64) % (64 * READ_BYTES as u64);
        if file.read_at(&mut buffer, offset).is_err() {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        // Past MAX_CALLS the count goes on (it is capped when read) and the time is not kept.
        if let Some(time) = TIMES.get(TIMED.fetch_add(1, Ordering::Relaxed)) {
            time.store(sys::clock_us() - before, Ordering::Relaxed);
        }
    }
}

/// A reader started by [`io_phase`]: its reads, on a descriptor of its own.
fn reader(_: u64) -> u64 {
    let mut path = [0u8; MAX_PATH];
    match File::open(IO_PATH.get(&mut path)) {
        Ok(file) => reads(&file),
        Err(_) => {
            ERRORS.fetch_add(CALLS.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
    0
}

/// One I/O phase: `readers` threads (this one, reading `file`, among them) each making
/// [`CALLS`] reads.
fn io_phase(file: &File, readers: u64) -> bool {
    together(readers, reader, || reads(file), "reader")
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
    let (Ok(threads), Ok(work), Ok(rounds), Ok(idle_us), Ok(calls), Ok(readers)) = (
        args::number(args, "threads", 2, 1, MAX_THREADS as u64),
        args::number(args, "work", 100, 0, 10_000_000),
        args::number(args, "rounds", 1, 1, 100_000),
        args::number(args, "idle_us", 0, 0, 10_000_000),
        args::number(args, "calls", 0, 0, MAX_CALLS as u64),
        args::number(args, "readers", 1, 1, MAX_THREADS as u64),
    ) else {
        println!(
            "usage: phases threads=1..={MAX_THREADS} work=K rounds=R [idle_us=S] [io=PATH calls=1..={MAX_CALLS} [readers=1..={MAX_THREADS}]]"
        );
        return 2;
    };
    WORK.store(work, Ordering::Relaxed);
    CALLS.store(calls, Ordering::Relaxed);
    let io = match args::value(args, "io") {
        Some(path) if !IO_PATH.set(path) => {
            println!("phases: {path}: longer than {MAX_PATH} bytes");
            return 2;
        }
        Some(path) => match File::open(path) {
            Ok(file) => Some(file),
            Err(error) => {
                println!("phases: {path}: {error}");
                return 1;
            }
        },
        None => None,
    };
    let (mut compute_us, mut io_us, mut slept_us) = (0u64, 0u64, 0u64);
    let mut io_from_us = None;
    let started = sys::clock_us();
    for round in 0..rounds {
        // A time-stepped job's rounds each end with the compute phase that follows its I/O.
        if round == 0 || io.is_none() {
            let at = sys::clock_us();
            if !compute_phase(threads) {
                return 1;
            }
            compute_us += sys::clock_us() - at;
        }
        if let Some(file) = &io {
            let at = sys::clock_us();
            io_from_us.get_or_insert(at - started);
            if !io_phase(file, readers) {
                return 1;
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
    let mut times = [0u64; MAX_CALLS];
    let timed = TIMED.load(Ordering::Relaxed).min(MAX_CALLS);
    for (time, slot) in times.iter_mut().zip(&TIMES[..timed]) {
        *time = slot.load(Ordering::Relaxed);
    }
    let errors = ERRORS.load(Ordering::Relaxed);
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
