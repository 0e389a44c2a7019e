//! `mix id=N rounds=R`: a delegation workload for several processes at once. Each round
//! writes a file of its own (`mix-N.dat`, a pattern of its id and the round) in pieces,
//! reads it back and compares, stats it, reads a piece of the shared file `shared=PATH`
//! with `read_at`, and makes a null call. Prints one summary line; exits 0 only if every
//! byte read back was right.
#![no_std]
#![no_main]

use lavender_user::fs::{self, File, OpenOptions};
use lavender_user::{args, println, sys};

lavender_user::main!(main);

const FILE_BYTES: usize = 48 * 1024;

fn pattern(id: u64, round: u64, index: usize) -> u8 {
    (index as u64 * 31 + id * 7 + round * 13) as u8
}

fn main(args: &str) -> i32 {
    let (Ok(id), Ok(rounds)) = (
        args::number(args, "id", 0, 0, 999),
        args::number(args, "rounds", 4, 1, 1000),
    ) else {
        println!("usage: mix id=0..=999 rounds=1..=1000 [shared=PATH]");
        return 2;
    };
    let shared = args::value(args, "shared");
    let mut name = [0u8; 16];
    let name = format_name(&mut name, id);
    let mut buffer = [0u8; 8192];
    let (mut written, mut verified, mut null_calls, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let started = sys::clock_us();
    for round in 0..rounds {
        let result = (|| -> fs::Result<()> {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(name)?;
            let mut offset = 0;
            while offset < FILE_BYTES {
                let piece = (FILE_BYTES - offset).min(buffer.len());
                for (i, byte) in buffer[..piece].iter_mut().enumerate() {
                    *byte = pattern(id, round, offset + i);
                }
                file.write_all(&buffer[..piece])?;
                offset += piece;
                written += piece as u64;
            }
            if file.metadata()?.size != FILE_BYTES as u64 {
                return Err(fs::Errno::EIO);
            }
            file.seek(fs::SeekFrom::Start(0))?;
            let mut offset = 0;
            while offset < FILE_BYTES {
                let piece = (FILE_BYTES - offset).min(buffer.len());
                file.read_exact(&mut buffer[..piece])?;
                if buffer[..piece]
                    .iter()
                    .enumerate()
                    .any(|(i, byte)| *byte != pattern(id, round, offset + i))
                {
                    return Err(fs::Errno::EIO);
                }
                offset += piece;
                verified += piece as u64;
            }
            if let Some(shared) = shared {
                let file = File::open(shared)?;
                file.read_at(&mut buffer[..4096], round * 4096)?;
            }
            fs::null_call()?;
            null_calls += 1;
            Ok(())
        })();
        if let Err(error) = result {
            println!("mix {id}: round {round}: {error}");
            errors += 1;
        }
    }
    let _ = fs::remove_file(name);
    println!(
        "mix {id}: {rounds} rounds, {written} bytes written, {verified} verified, {null_calls} null calls, {errors} errors, {} us",
        sys::clock_us().wrapping_sub(started)
    );
    i32::from(errors != 0)
}

fn format_name(buffer: &mut [u8; 16], id: u64) -> &str {
    let prefix = b"mix-";
    buffer[..4].copy_from_slice(prefix);
    let digits = [(id / 100) % 10, (id / 10) % 10, id % 10];
    for (slot, digit) in buffer[4..7].iter_mut().zip(digits) {
        *slot = b'0' + digit as u8;
    }
    buffer[7..11].copy_from_slice(b".dat");
    core::str::from_utf8(&buffer[..11]).unwrap_or("mix.dat")
}
