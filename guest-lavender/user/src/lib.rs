//! Lavender's user library: what a ring-3 program links against.
//!
//! - [`sys`]: the system calls of [`lavender_abi`], one safe function each;
//! - [`print!`] / [`println!`]: console output through `write`;
//! - [`thread`]: threads with stacks from a fixed pool, joined for their value;
//! - [`args`]: the `key=value` words of the argument string;
//! - [`fs`]: files through Linux (delegated system calls), errno-typed errors;
//! - [`primes`]: the parallel primes worker's arithmetic;
//! - [`sha256`]: SHA-256, for `sha256sum`;
//! - [`main!`]: names a program's `main`; the entry code and panic handler are here.
//!
//! On the host (`cargo test`) the pure parts are unit-tested; the system calls exist only in
//! the bare-metal build.
#![cfg_attr(not(test), no_std)]

pub mod args;
pub mod fs;
pub mod io;
pub mod primes;
#[cfg(target_os = "none")]
mod rt;
pub mod sha256;
#[cfg(target_os = "none")]
pub mod sys;
#[cfg(target_os = "none")]
pub mod thread;

pub use lavender_abi as abi;

/// Declares the program's `main`: `fn main(args: &str) -> i32`, whose value is the process's
/// exit status.
#[macro_export]
macro_rules! main {
    ($main:path) => {
        #[no_mangle]
        fn lavender_program_main(args: &str) -> i32 {
            $main(args)
        }
    };
}
