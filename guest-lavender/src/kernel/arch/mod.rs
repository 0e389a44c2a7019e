//! The audited `unsafe` core of Lavender: the entry point, descriptor tables, page tables,
//! privileged registers, hypercalls and fault-tolerant probes. Every `unsafe` block here has a
//! `// SAFETY:` line; the rest of the kernel is safe Rust on top of these functions.

pub mod boot_info;
pub mod cpu;
pub mod entry;
pub mod gdt;
pub mod hypercall;
pub mod idt;
pub mod paging;
pub mod probe;
