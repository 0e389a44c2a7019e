//! The audited `unsafe` core of Lavender: the entry point, descriptor tables, page tables,
//! privileged registers, the local APIC, context switches, the AP trampoline, the heap,
//! hypercalls, shared memory and fault-tolerant probes. Every `unsafe` block here has a
//! `// SAFETY:` line; the rest of the kernel is safe Rust on top of these functions.

pub mod address_space;
pub mod apic;
pub mod boot_info;
pub mod context;
pub mod copy;
pub mod cpu;
pub mod entry;
pub mod gdt;
pub mod heap;
pub mod hypercall;
pub mod idt;
pub mod paging;
pub mod probe;
pub mod shared;
pub mod traces;
pub mod trampoline;
pub mod user;
