//! `status N`: exits at once with status `N` (0..=255), for checking that a launcher sees a
//! program's exit status.
#![no_std]
#![no_main]

use lavender_user::println;

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    match args.trim().parse::<u8>() {
        Ok(status) => i32::from(status),
        Err(_) => {
            println!("usage: status N (0..=255)");
            2
        }
    }
}
