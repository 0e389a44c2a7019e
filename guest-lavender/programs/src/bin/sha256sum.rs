//! `sha256sum path=P`: prints the SHA-256 of file `P` as `sha256sum` does (`HEX  P`).
#![no_std]
#![no_main]

use lavender_user::fs::{File, Result};
use lavender_user::sha256::{self, Sha256};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

fn digest(path: &str) -> Result<([u8; 32], u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = [0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((hasher.finish(), total));
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
        Ok((digest, bytes)) => {
            let hex = sha256::hex(&digest);
            println!("{}  {path}", core::str::from_utf8(&hex).unwrap_or("?"));
            println!(
                "sha256sum: {bytes} bytes in {} us",
                sys::clock_us().wrapping_sub(started)
            );
            0
        }
        Err(error) => {
            println!("sha256sum: {path}: {error}");
            1
        }
    }
}
