//! `dbench mode=null calls=N out=FILE [start=PATH]` or
//! `dbench mode=read path=P block=B rounds=R [buffer=window] out=FILE [start=PATH]`: timings of delegated
//! calls, for `cargo xtask bench --only delegation`. `null` makes `N` null calls (a round trip
//! to Linux's server and nothing else); `read` reads the first `B` bytes of `P` (at most
//! 1 MiB, into one buffer) `R` times, into the program's own memory or, with `buffer=window`,
//! into its window buffer (`fs::WindowBuffer`: no copies). The figures are Lavender's clock
//! (microseconds; virtual under Bochs) and go to `FILE` through Linux, as one line of
//! `key=value` words: `mode calls bytes us errors`, and for `null` the median, 99th
//! percentile and longest call (`p50_us p99_us max_us`: the first [`SAMPLED`] calls for the
//! percentiles, all of them for the longest) and the calls longer than [`SLOW_US`] and
//! their time in all (`slow_calls slow_us`), which the agent reads. Exits 0 when no
//! call failed. With `start=PATH` it waits until `PATH` exists (looking every
//! [`START_LOOK_US`]) before it starts timing, so processes Linux starts one after another
//! make their calls at the same time.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::fmt::Write as _;

use lavender_user::fs::{self, File, WindowBuffer};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

const MAX_BLOCK: usize = 1 << 20;
/// How often a process waiting for its `start=` file looks for it.
const START_LOOK_US: u64 = 500;
/// Null calls whose times are kept for the percentiles.
const SAMPLED: usize = 512;
/// A null call longer than this is slow (µs; some five times the usual under Bochs).
const SLOW_US: u64 = 300;

/// The read buffer (in the image's zeroed data, not on the stack).
struct Buffer(UnsafeCell<[u8; MAX_BLOCK]>);
// SAFETY: only `main`'s thread (the program starts no other) touches the buffer.
unsafe impl Sync for Buffer {}
static BUFFER: Buffer = Buffer(UnsafeCell::new([0; MAX_BLOCK]));

fn main(args: &str) -> i32 {
    let (Some(mode), Some(out)) = (args::value(args, "mode"), args::value(args, "out")) else {
        return usage();
    };
    if let Some(start) = args::value(args, "start") {
        while fs::metadata(start).is_err() {
            sys::sleep_us(START_LOOK_US);
        }
    }
    // The null calls are timed one by one with the TSC, which costs no system call (two
    // clock calls a call added some 10 µs to a 65 µs call under Bochs); its rate is
    // measured first.
    let ticks_per_us = (mode == "null").then(tsc_ticks_per_us);
    let started = sys::clock_us();
    let mut spread = None;
    let (calls, bytes, errors) = match mode {
        "null" => {
            let Ok(calls) = args::number(args, "calls", 1000, 1, 1_000_000) else {
                return usage();
            };
            let (errors, times) = null_calls(calls, ticks_per_us.unwrap_or(1));
            spread = Some(times);
            (calls, 0, errors)
        }
        "read" => {
            let (Some(path), Ok(block), Ok(rounds)) = (
                args::value(args, "path"),
                args::number(args, "block", 4096, 1, MAX_BLOCK as u64),
                args::number(args, "rounds", 10, 1, 1_000_000),
            ) else {
                return usage();
            };
            let window = args::value(args, "buffer") == Some("window");
            match read(path, block as usize, rounds, window) {
                Ok((calls, bytes)) => (calls, bytes, 0),
                Err(error) => {
                    println!("dbench: {path}: {error}");
                    (0, 0, 1)
                }
            }
        }
        _ => return usage(),
    };
    let us = sys::clock_us() - started;
    let mut line = Line::default();
    let _ = write!(
        line,
        "mode={mode} calls={calls} bytes={bytes} us={us} errors={errors}"
    );
    if let Some(t) = spread {
        let _ = write!(
            line,
            " p50_us={} p99_us={} max_us={} slow_calls={} slow_us={}",
            t.p50, t.p99, t.max, t.slow, t.slow_us
        );
    }
    let _ = writeln!(line);
    if let Err(error) = fs::File::create(out).and_then(|mut file| file.write_all(line.text())) {
        println!("dbench: {out}: {error}");
        return 1;
    }
    i32::from(errors != 0)
}

/// The spread of the null calls' times (µs).
struct CallTimes {
    p50: u64,
    p99: u64,
    max: u64,
    /// Calls longer than [`SLOW_US`], and their time in all.
    slow: u64,
    slow_us: u64,
}

/// The TSC's ticks per µs, against Lavender's clock over a couple of milliseconds.
fn tsc_ticks_per_us() -> u64 {
    let (ticks, us) = (sys::tsc(), sys::clock_us());
    sys::sleep_us(2000);
    let us = (sys::clock_us() - us).max(1);
    ((sys::tsc() - ticks) / us).max(1)
}

/// Makes `calls` null calls, timed in TSC ticks (`ticks_per_us` to the µs): the failed ones
/// and the spread of their times.
fn null_calls(calls: u64, ticks_per_us: u64) -> (u64, CallTimes) {
    let mut sampled = [0u64; SAMPLED];
    let (mut errors, mut max, mut slow, mut slow_ticks) = (0, 0, 0, 0);
    for call in 0..calls {
        let before = sys::tsc();
        errors += u64::from(fs::null_call().is_err());
        let took = sys::tsc().saturating_sub(before);
        max = max.max(took);
        if took > SLOW_US * ticks_per_us {
            slow += 1;
            slow_ticks += took;
        }
        if let Some(slot) = sampled.get_mut(call as usize) {
            *slot = took;
        }
    }
    let sampled = &mut sampled[..(calls as usize).min(SAMPLED)];
    sampled.sort_unstable();
    let at = |permille: usize| sampled[(sampled.len() - 1) * permille / 1000] / ticks_per_us;
    (
        errors,
        CallTimes {
            p50: at(500),
            p99: at(990),
            max: max / ticks_per_us,
            slow,
            slow_us: slow_ticks / ticks_per_us,
        },
    )
}

/// Reads the first `block` bytes of `path` `rounds` times, into the window buffer when
/// `window`: the delegated calls made and the bytes read.
fn read(path: &str, block: usize, rounds: u64, window: bool) -> fs::Result<(u64, u64)> {
    let file = File::open(path)?;
    let mut window_buffer;
    let buffer: &mut [u8] = if window {
        window_buffer = WindowBuffer::take().ok_or(fs::Errno::ENOSYS)?;
        &mut window_buffer[..]
    } else {
        // SAFETY: the only reference to the buffer while it lives (one thread, see `Buffer`).
        unsafe { &mut *BUFFER.0.get() }
    };
    let buffer = buffer.get_mut(..block).ok_or(fs::Errno::EINVAL)?;
    let (mut calls, mut bytes) = (1, 0);
    for _ in 0..rounds {
        let mut done = 0;
        while done < block {
            let n = file.read_at(&mut buffer[done..], done as u64)?;
            calls += 1;
            if n == 0 {
                return Err(fs::Errno::EIO);
            }
            done += n;
        }
        bytes += done as u64;
    }
    Ok((calls, bytes))
}

fn usage() -> i32 {
    println!("usage: dbench mode=null calls=N out=FILE | mode=read path=P block=B rounds=R [buffer=window] out=FILE");
    2
}

/// A line of text built without an allocator.
struct Line {
    bytes: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            bytes: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn text(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let end = self.len + text.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(core::fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}
