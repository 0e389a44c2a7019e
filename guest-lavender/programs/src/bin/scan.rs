//! `scan dir=D threads=N`: reads every file of directory `D` from `N` threads at once (file
//! `i` goes to thread `i mod N`), each thread summing the bytes it read. Prints the files and
//! bytes each thread read and the total; exits 0 when every file was read whole.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use lavender_user::fs::{self, File, FileKind};
use lavender_user::thread;
use lavender_user::{args, println};

lavender_user::main!(main);

const MAX_FILES: usize = 64;
const NAME_BYTES: usize = 64;
const MAX_SCAN_THREADS: u64 = 16;

struct Names {
    count: usize,
    names: [[u8; NAME_BYTES]; MAX_FILES],
    lengths: [usize; MAX_FILES],
}

static mut NAMES: Names = Names {
    count: 0,
    names: [[0; NAME_BYTES]; MAX_FILES],
    lengths: [0; MAX_FILES],
};
static THREADS: AtomicU64 = AtomicU64::new(1);
static FAILED: AtomicU64 = AtomicU64::new(0);
static DIR: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

fn names() -> &'static Names {
    // SAFETY: written only by `main` before any thread starts, read-only afterwards.
    unsafe { &*core::ptr::addr_of!(NAMES) }
}

fn worker(index: u64) -> u64 {
    let threads = THREADS.load(Ordering::Relaxed);
    let names = names();
    let mut dir = [0u8; 64];
    for (chunk, word) in dir.chunks_mut(8).zip(&DIR) {
        chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let dir_len = dir.iter().position(|b| *b == 0).unwrap_or(dir.len());
    let dir = core::str::from_utf8(&dir[..dir_len]).unwrap_or(".");
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut buffer = [0u8; 8192];
    let mut path = [0u8; 160];
    for file in (index as usize..names.count).step_by(threads as usize) {
        let name = &names.names[file][..names.lengths[file]];
        let len = dir.len() + 1 + name.len();
        path[..dir.len()].copy_from_slice(dir.as_bytes());
        path[dir.len()] = b'/';
        path[dir.len() + 1..len].copy_from_slice(name);
        let path = core::str::from_utf8(&path[..len]).unwrap_or("");
        let read = File::open(path).and_then(|mut file| {
            let expected = file.metadata()?.size;
            let mut total = 0u64;
            loop {
                match file.read(&mut buffer)? {
                    0 => return Ok((total, expected)),
                    n => total += n as u64,
                }
            }
        });
        match read {
            Ok((total, expected)) if total == expected => {
                files += 1;
                bytes += total;
            }
            Ok((total, expected)) => {
                println!("scan: {path}: read {total} of {expected} bytes");
                FAILED.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                println!("scan: {path}: {error}");
                FAILED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    println!("scan: thread {index}: {files} files, {bytes} bytes");
    bytes
}

fn main(args: &str) -> i32 {
    let dir = args::value(args, "dir").unwrap_or(".");
    let Ok(threads) = args::number(args, "threads", 4, 1, MAX_SCAN_THREADS) else {
        println!("usage: scan dir=D threads=1..={MAX_SCAN_THREADS}");
        return 2;
    };
    if dir.len() >= 64 {
        println!("scan: directory name too long");
        return 2;
    }
    let mut packed = [0u8; 64];
    packed[..dir.len()].copy_from_slice(dir.as_bytes());
    for (chunk, word) in packed.chunks(8).zip(&DIR) {
        let mut value = [0u8; 8];
        value.copy_from_slice(chunk);
        word.store(u64::from_le_bytes(value), Ordering::Relaxed);
    }
    THREADS.store(threads, Ordering::Relaxed);
    // SAFETY: no other thread runs yet; `names()` readers start after this.
    let table = unsafe { &mut *core::ptr::addr_of_mut!(NAMES) };
    let listed = fs::read_dir(dir, |kind, name| {
        if kind == FileKind::File && table.count < MAX_FILES && name.len() <= NAME_BYTES {
            table.names[table.count][..name.len()].copy_from_slice(name.as_bytes());
            table.lengths[table.count] = name.len();
            table.count += 1;
        }
    });
    if let Err(error) = listed {
        println!("scan: {dir}: {error}");
        return 1;
    }
    let mut handles = [const { None }; MAX_SCAN_THREADS as usize];
    for (index, handle) in handles.iter_mut().take(threads as usize).enumerate() {
        match thread::spawn(worker, index as u64) {
            Ok(started) => *handle = Some(started),
            Err(error) => {
                println!("scan: cannot start thread {index}: {error}");
                FAILED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let mut total = 0u64;
    for handle in handles.into_iter().flatten() {
        total += handle.join().unwrap_or(0);
    }
    let failed = FAILED.load(Ordering::Relaxed);
    println!(
        "scan: {} files, {total} bytes, {threads} threads, {failed} failures",
        names().count
    );
    i32::from(failed != 0)
}
