//! Lavender's pure logic: everything the kernel decides without touching the machine, so it is
//! unit-tested on the host (`cargo test -p guest-lavender`). The kernel itself is the binary
//! (`src/main.rs`, `src/kernel/`), built for `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod call_slots;
pub mod cmdline;
pub mod core_events;
pub mod descriptors;
pub mod elf;
pub mod exceptions;
pub mod forced_thread;
pub mod frames;
pub mod identity_map;
pub mod line_buffer;
pub mod load;
pub mod panic_message;
pub mod placement;
pub mod trampoline;
pub mod user_output;
