//! `escape`: tries to reach files outside the served root and reports what Linux answered:
//! one `escape PATH: refused ERRNO` (or `escape PATH: OPENED`) line per attempt. Exits with
//! the number of attempts that opened something (0: all refused).
//!
//! Arguments: `link=NAME` and `proc=NAME`, names of symlinks inside the root that point to
//! `/` and to `/proc/self/root` (Linux's side creates them).
#![no_std]
#![no_main]

use lavender_user::fs::{self, File, OpenOptions};
use lavender_user::{args, println};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let link = args::value(args, "link").unwrap_or("to-root");
    let proc_link = args::value(args, "proc").unwrap_or("to-proc-root");
    let mut through_link = [0u8; 96];
    let mut through_proc = [0u8; 96];
    let attempts = [
        "../../etc/shadow",
        "/etc/shadow",
        "/proc/self/root/etc/shadow",
        join(&mut through_link, link, "/etc/shadow"),
        join(&mut through_proc, proc_link, "/etc/shadow"),
    ];
    let mut opened = 0;
    for path in attempts {
        match File::open(path) {
            Ok(_) => {
                println!("escape {path}: OPENED");
                opened += 1;
            }
            Err(error) => println!("escape {path}: refused {}", error.name()),
        }
    }
    // Writing outside must fail as well, and creating through the link.
    let mut outside = [0u8; 96];
    let target = join(&mut outside, link, "/tmp/escaped");
    match OpenOptions::new().write(true).create(true).open(target) {
        Ok(_) => {
            println!("escape create {target}: OPENED");
            opened += 1;
        }
        Err(error) => println!("escape create {target}: refused {}", error.name()),
    }
    match fs::create_dir("../outside") {
        Ok(()) => {
            println!("escape mkdir ../outside: OPENED");
            opened += 1;
        }
        Err(error) => println!("escape mkdir ../outside: refused {}", error.name()),
    }
    println!("escape: {opened} of 7 attempts got through");
    opened
}

fn join<'a>(buffer: &'a mut [u8; 96], first: &str, second: &str) -> &'a str {
    let len = (first.len() + second.len()).min(buffer.len());
    let cut = first.len().min(len);
    buffer[..cut].copy_from_slice(&first.as_bytes()[..cut]);
    buffer[cut..len].copy_from_slice(&second.as_bytes()[..len - cut]);
    core::str::from_utf8(&buffer[..len]).unwrap_or("")
}
