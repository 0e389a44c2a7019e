//! The atomics the core table is written against: `core`'s, or loom's under `--cfg loom`
//! so that `tests/loom_cores.rs` model-checks the real compare-and-swap code.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
