//! `sha256sum path=P`: prints the SHA-256 of file `P` as `sha256sum` does (`HEX  P`). It
//! reads into its window buffer when it has one (Linux's reads land there, no copies), else
//! into its own memory.
#![no_std]
#![no_main]

use lavender_user::fs::{self, File, Result};
use lavender_user::sha256::{self, Sha256};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

/// The digest, the bytes read, and whether they came through the window buffer.
fn digest(path: &str) -> Result<([u8; 32], u64, bool)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut own = [0u8; 32 * 1024];
    let (buffer, through_window) = fs::large_io_buffer(&mut own);
    let mut total = 0u64;
    loop {
        let n = file.read(buffer)?;
        if n == 0 {
            return Ok((hasher.finish(), total, through_window));
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

fn main(args: &str) -> i32 {
    let Some(path) = args::value(args, "path") else {
        println!("usage: sha256sum path=FILE");
        return 2;
    };
    let started = sys::clock_us();
    match digest(path) {
        Ok((digest, bytes, through_window)) => {
            let hex = sha256::hex(&digest);
            println!("{}  {path}", core::str::from_utf8(&hex).unwrap_or("?"));
            println!(
                "sha256sum: {bytes} bytes in {} us, read into {}",
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
            println!("sha256sum: {path}: {error}");
            1
        }
    }
}
