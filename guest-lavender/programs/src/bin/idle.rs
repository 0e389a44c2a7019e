//! `idle`: a program that does nothing, blocked in `sleep`, so Lavender's load reports show a
//! live but idle guest. Arguments: `seconds=N` (default 0: forever), `period_ms=N` (default
//! 100): how long to run and how long each sleep is.
#![no_std]
#![no_main]

use lavender_user::args::{self};
use lavender_user::{println, sys};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let (Ok(seconds), Ok(period_ms)) = (
        args::number(args, "seconds", 0, 0, 86_400),
        args::number(args, "period_ms", 100, 1, 60_000),
    ) else {
        println!("usage: idle [seconds=0..=86400] [period_ms=1..=60000]");
        return 2;
    };
    println!(
        "pid {}: idle, sleeping {period_ms} ms at a time{}",
        sys::process_id(),
        if seconds == 0 { ", forever" } else { "" }
    );
    let started = sys::clock_us();
    let mut sleeps = 0u64;
    while seconds == 0 || sys::clock_us().wrapping_sub(started) < seconds * 1_000_000 {
        sys::sleep_us(period_ms * 1000);
        sleeps += 1;
    }
    println!("idle for {seconds} s ({sleeps} sleeps)");
    0
}
