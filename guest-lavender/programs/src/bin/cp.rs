//! `cp from=A to=B`: copies file `A` to `B` (created or truncated) through Linux. It moves
//! the data through its window buffer when it has one (Linux reads into it and writes from
//! it, no copies), else through its own memory.
#![no_std]
#![no_main]

use lavender_user::fs::{self, File, Result};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

/// The bytes copied, and whether they went through the window buffer.
fn copy(from: &str, to: &str) -> Result<(u64, bool)> {
    let mut source = File::open(from)?;
    let mut target = File::create(to)?;
    let mut own = [0u8; 32 * 1024];
    let (buffer, through_window) = fs::large_io_buffer(&mut own);
    let mut total = 0u64;
    loop {
        let n = source.read(buffer)?;
        if n == 0 {
            target.sync_all()?;
            return Ok((total, through_window));
        }
        target.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

fn main(args: &str) -> i32 {
    let (Some(from), Some(to)) = (args::value(args, "from"), args::value(args, "to")) else {
        println!("usage: cp from=FILE to=FILE");
        return 2;
    };
    let started = sys::clock_us();
    match copy(from, to) {
        Ok((bytes, through_window)) => {
            println!(
                "cp: {from} -> {to}: {bytes} bytes in {} us, through {}",
                sys::clock_us().wrapping_sub(started),
                if through_window {
                    "the window buffer"
                } else {
                    "its own memory"
                }
            );
            0
        }
        Err(error) => {
            println!("cp: {from} -> {to}: {error}");
            1
        }
    }
}
