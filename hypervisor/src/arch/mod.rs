//! The audited `unsafe` core of the hypervisor: everything that executes privileged
//! instructions or touches memory by physical address lives in this folder, each
//! `unsafe` block with a `// SAFETY:` line. Code outside `arch` is safe Rust.

pub mod cpu;
pub mod descriptors;
pub mod firmware;
pub mod firmware_boot;
pub mod guest_memory;
pub mod ioapic;
pub mod lapic;
pub mod msr;
pub mod page_pool;
pub mod percpu;
pub mod port;
pub mod serial;
pub mod shared_memory;
pub mod vmx;
