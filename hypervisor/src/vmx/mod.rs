//! VMX: what the CPU offers and how to turn it on. Pure logic lives here and is
//! unit-tested on the host; the instructions themselves are in `crate::arch::vmx`.

pub mod caps;
pub mod enable;
