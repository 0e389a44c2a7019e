//! `fault`: reads memory outside its user window, which faults (#PF): the kernel kills it as
//! Linux kills a process for a segmentation fault (signal 11, status 139).
#![no_std]
#![no_main]

use lavender_user::println;

lavender_user::main!(main);

fn main(_args: &str) -> i32 {
    println!("fault: reading kernel memory");
    // SAFETY: not safe, on purpose: address 0x1000 is the kernel's (supervisor-only), so the
    // read faults in user mode and the process is killed before the value is used.
    let value = unsafe { core::ptr::read_volatile(0x1000 as *const u64) };
    println!("fault: read {value:#x}, which must not happen");
    0
}
