//! `cat path=P`: prints file `P` (read through Linux) on the console.
#![no_std]
#![no_main]

use lavender_user::fs::File;
use lavender_user::{args, println, sys};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let Some(path) = args::value(args, "path") else {
        println!("usage: cat path=FILE");
        return 2;
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) => {
            println!("cat: {path}: {error}");
            return 1;
        }
    };
    let mut buffer = [0u8; 4096];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return 0,
            Ok(n) => {
                let _ = sys::write(1, &buffer[..n]);
            }
            Err(error) => {
                println!("cat: {path}: {error}");
                return 1;
            }
        }
    }
}
