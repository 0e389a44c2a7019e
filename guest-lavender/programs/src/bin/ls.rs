//! `ls path=D`: lists directory `D` (default `.`), one `kind size name` line per entry.
#![no_std]
#![no_main]

use lavender_user::fs::{self, FileKind};
use lavender_user::{args, println};

lavender_user::main!(main);

fn main(args: &str) -> i32 {
    let path = args::value(args, "path").unwrap_or(".");
    let mut cwd = [0u8; 256];
    if let Ok(cwd) = fs::current_dir(&mut cwd) {
        println!("ls: in {cwd}");
    }
    let result = fs::read_dir(path, |kind, name| {
        let tag = match kind {
            FileKind::File => "f",
            FileKind::Directory => "d",
            FileKind::Symlink => "l",
            FileKind::Other => "?",
        };
        println!("{tag} {name}");
    });
    match result {
        Ok(count) => {
            println!("ls: {path}: {count} entries");
            0
        }
        Err(error) => {
            println!("ls: {path}: {error}");
            1
        }
    }
}
