//! `wc [-l] [path=P]`: counts the lines, words and bytes of file `P`, or of standard input
//! without `path=` (a process started by `vmctl exec` reads the launcher's), as `wc` does;
//! `-l` prints the line count alone.
#![no_std]
#![no_main]

use lavender_user::fs::{File, Result};
use lavender_user::{args, println};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let lines_only = args.split_ascii_whitespace().any(|word| word == "-l");
    if let Some(word) = args
        .split_ascii_whitespace()
        .find(|word| *word != "-l" && !word.starts_with("path="))
    {
        println!("wc: unknown argument '{word}' (usage: wc [-l] [path=FILE])");
        return 2;
    }
    let path = args::value(args, "path");
    let counted = match path {
        Some(path) => File::open(path).and_then(|mut file| count(&mut file)),
        None => count(&mut File::standard_input()),
    };
    let name = path.unwrap_or("standard input");
    match counted {
        Ok((lines, _, _)) if lines_only => {
            match path {
                Some(path) => println!("{lines} {path}"),
                None => println!("{lines}"),
            }
            0
        }
        Ok((lines, words, bytes)) => {
            match path {
                Some(path) => println!("{lines} {words} {bytes} {path}"),
                None => println!("{lines} {words} {bytes}"),
            }
            0
        }
        Err(error) => {
            println!("wc: {name}: {error}");
            1
        }
    }
}

fn count(file: &mut File) -> Result<(u64, u64, u64)> {
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
}
