//! `hostile`: a misbehaving program, for the kernel's tests. It passes bad arguments to system
//! calls and checks that each is refused with the right error, tries to forge a console marker,
//! floods the console faster than it drains, and finally reads kernel memory, which must kill it (#PF, exit status 139: 128 + SIGSEGV) while the rest of
//! Lavender goes on. Prints one line per check and a summary before the last, fatal one.
#![no_std]
#![no_main]

use lavender_user::abi::{Error, Syscall, MAX_WRITE_BYTES, USER_END};
use lavender_user::{println, sys};

lavender_user::main!(main);

/// Lines written as fast as the system calls go, faster than the console drains: each must
/// come out, in order (the kernel makes the writer wait, it drops nothing).
const FLOOD_LINES: usize = 3500;

/// An address in the kernel's image (Lavender links itself at 2 MiB).
const KERNEL_ADDRESS: u64 = 0x20_0000;

static MESSAGE: [u8; 8] = *b"hostile\n";
static BIG: [u8; MAX_WRITE_BYTES as usize + 1] = [b'x'; MAX_WRITE_BYTES as usize + 1];

#[repr(C, align(16))]
struct Stack([u8; 4096]);
static STACK: Stack = Stack([0; 4096]);

fn noop(_: u64) -> u64 {
    0
}

fn main(_args: &str) -> i32 {
    let message = MESSAGE.as_ptr() as u64;
    let write = Syscall::Write as u64;
    let spawn = Syscall::ThreadSpawn as u64;
    let stack_top = STACK.0.as_ptr() as u64 + 4096;
    let checks: [(&str, Result<u64, Error>, Error); 9] = [
        (
            "write from kernel memory",
            sys::raw_call(write, 1, KERNEL_ADDRESS, 16),
            Error::BadAddress,
        ),
        (
            "write across the end of user space",
            sys::raw_call(write, 1, USER_END - 8, 16),
            Error::BadAddress,
        ),
        (
            "write from null",
            sys::raw_call(write, 1, 0, 5),
            Error::BadAddress,
        ),
        (
            "write to stream 7",
            sys::raw_call(write, 7, message, 3),
            Error::InvalidArgument,
        ),
        (
            "write too long",
            sys::raw_call(write, 1, BIG.as_ptr() as u64, BIG.len() as u64),
            Error::TooLong,
        ),
        (
            "thread at a kernel address",
            sys::raw_call(spawn, KERNEL_ADDRESS, stack_top, 0),
            Error::BadAddress,
        ),
        (
            "thread on a misaligned stack",
            sys::thread_spawn(noop as *const () as u64, stack_top - 8, 0),
            Error::InvalidArgument,
        ),
        (
            "join a thread that does not exist",
            sys::raw_call(Syscall::ThreadJoin as u64, 12_345, 0, 0),
            Error::NoSuchThread,
        ),
        (
            "system call 999",
            sys::raw_call(999, 0, 0, 0),
            Error::UnknownSyscall,
        ),
    ];
    let mut refused = 0;
    for (what, result, expected) in checks {
        let ok = result == Err(expected);
        refused += usize::from(ok);
        println!(
            "{what}: {} ({})",
            match result {
                Ok(_) => "accepted",
                Err(error) => error.as_str(),
            },
            if ok { "ok" } else { "WRONG" }
        );
    }
    println!("@@tandem {{\"ev\":\"forged\"}}");
    for line in 0..FLOOD_LINES {
        println!("flood {line}");
    }
    println!(
        "{refused} of {} bad calls refused; now reading kernel memory",
        checks.len()
    );
    // SAFETY: none; this read is the attack. The kernel's pages are supervisor-only, so it
    // faults and the kernel kills this process.
    let stolen = unsafe { (KERNEL_ADDRESS as *const u64).read_volatile() };
    println!("read kernel memory: {stolen:#x} (WRONG)");
    1
}
