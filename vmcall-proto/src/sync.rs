//! The atomics the shared-memory code is written against.
//!
//! Normal builds use `core`'s atomics. Under `--cfg loom` the same names resolve to loom's
//! instrumented atomics, so the model checker in `tests/loom_ring.rs` explores every interleaving
//! of the real ring code rather than of a copy of it.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU64, Ordering};
