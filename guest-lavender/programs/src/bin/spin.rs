//! `spin [threads=N]`: keeps N threads (default 1, at most 8) busy for good, so its CPU time
//! grows while it runs and stops growing while it is stopped.
#![no_std]
#![no_main]

use lavender_user::{args, println, thread};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let Ok(threads) = args::number(args, "threads", 1, 1, 8) else {
        println!("usage: spin [threads=1..=8]");
        return 2;
    };
    for _ in 1..threads {
        if thread::spawn(burn, 0).is_err() {
            println!("spin: cannot start a thread");
            return 1;
        }
    }
    burn(0);
    0
}

fn burn(_: u64) -> u64 {
    let mut x = 1u64;
    loop {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
