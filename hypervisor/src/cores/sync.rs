//! The atomics the core table is written against: `core`'s, or loom's under `--cfg loom`
//! so that `tests/loom_cores.rs` model-checks the real compare-and-swap code.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// One step of a busy wait: the processor's spin-loop hint, or under loom a yield, so that
/// the model runs the thread waited for.
#[cfg(not(loom))]
#[inline]
pub fn spin() {
    core::hint::spin_loop();
}

#[cfg(loom)]
pub fn spin() {
    loom::thread::yield_now();
}
