//! `openwait path=P threads=N`: `N` threads (1 to 60) each open `P` at once. On a FIFO nobody
//! writes, each open is a delegated call that waits in Linux (or, past the connection's
//! calls in flight, for a free slot of it): the calls in flight when the agent dies. Prints
//! how the calls ended, `openwait: N calls, E EIO, O opened, X other errors`, each other
//! error on a line of its own, and exits 0 only when every call ended in EIO.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use lavender_user::fs::{Errno, File};
use lavender_user::{args, println, thread};

lavender_user::main!(main);

const MAX_CALLERS: u64 = 60;
const OPENED: u64 = 0;
const EIO: u64 = 1;
const OTHER: u64 = 2;

/// The path, packed for the threads (set by `main` before any starts).
static PATH: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

fn caller(_index: u64) -> u64 {
    let mut packed = [0u8; 64];
    for (chunk, word) in packed.chunks_mut(8).zip(&PATH) {
        chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let len = packed.iter().position(|b| *b == 0).unwrap_or(packed.len());
    let path = core::str::from_utf8(&packed[..len]).unwrap_or("");
    match File::open(path) {
        Ok(_) => OPENED,
        Err(Errno::EIO) => EIO,
        Err(error) => {
            println!("openwait: {path}: {error}");
            OTHER
        }
    }
}

fn main(args: &str) -> i32 {
    let (Some(path), Ok(callers)) = (
        args::value(args, "path"),
        args::number(args, "threads", 25, 1, MAX_CALLERS),
    ) else {
        println!("usage: openwait path=P threads=1..={MAX_CALLERS}");
        return 2;
    };
    if path.len() >= 64 {
        println!("openwait: path too long");
        return 2;
    }
    let mut packed = [0u8; 64];
    packed[..path.len()].copy_from_slice(path.as_bytes());
    for (chunk, word) in packed.chunks(8).zip(&PATH) {
        let mut value = [0u8; 8];
        value.copy_from_slice(chunk);
        word.store(u64::from_le_bytes(value), Ordering::Relaxed);
    }
    let mut handles = [const { None }; MAX_CALLERS as usize];
    let mut not_started = 0;
    for (index, handle) in handles.iter_mut().take(callers as usize).enumerate() {
        match thread::spawn(caller, index as u64) {
            Ok(started) => *handle = Some(started),
            Err(error) => {
                println!("openwait: cannot start thread {index}: {error}");
                not_started += 1;
            }
        }
    }
    let (mut opened, mut eio, mut other) = (0u64, 0u64, not_started);
    for handle in handles.into_iter().flatten() {
        match handle.join() {
            Ok(OPENED) => opened += 1,
            Ok(EIO) => eio += 1,
            _ => other += 1,
        }
    }
    println!("openwait: {callers} calls, {eio} EIO, {opened} opened, {other} other errors");
    i32::from(eio != callers)
}
