//! `cp from=A to=B`: copies file `A` to `B` (created or truncated) through Linux.
#![no_std]
#![no_main]

use lavender_user::fs::{File, Result};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

fn copy(from: &str, to: &str) -> Result<u64> {
    let mut source = File::open(from)?;
    let mut target = File::create(to)?;
    let mut buffer = [0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = source.read(&mut buffer)?;
        if n == 0 {
            target.sync_all()?;
            return Ok(total);
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
        Ok(bytes) => {
            println!(
                "cp: {from} -> {to}: {bytes} bytes in {} us",
                sys::clock_us().wrapping_sub(started)
            );
            0
        }
        Err(error) => {
            println!("cp: {from} -> {to}: {error}");
            1
        }
    }
}
