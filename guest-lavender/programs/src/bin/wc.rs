//! `wc path=P`: counts the lines, words and bytes of file `P`, as `wc` does.
#![no_std]
#![no_main]

use lavender_user::fs::File;
use lavender_user::{args, println};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let Some(path) = args::value(args, "path") else {
        println!("usage: wc path=FILE");
        return 2;
    };
    let result = File::open(path).and_then(|mut file| {
        let mut buffer = [0u8; 16 * 1024];
        let (mut lines, mut words, mut bytes, mut in_word) = (0u64, 0u64, 0u64, false);
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok((lines, words, bytes));
            }
            bytes += n as u64;
            for &byte in &buffer[..n] {
                lines += u64::from(byte == b'\n');
                let space = byte.is_ascii_whitespace();
                words += u64::from(!space && !in_word);
                in_word = !space;
            }
        }
    });
    match result {
        Ok((lines, words, bytes)) => {
            println!("{lines} {words} {bytes} {path}");
            0
        }
        Err(error) => {
            println!("wc: {path}: {error}");
            1
        }
    }
}
