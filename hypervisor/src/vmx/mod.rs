//! VMX: what the CPU offers and how to turn it on, VMCS encodings, EPT construction and
//! exit decoding. Pure logic, unit-tested on the host; the instructions themselves are
//! in `crate::arch::vmx`.

pub mod caps;
pub mod enable;
pub mod ept;
pub mod exit;
pub mod msr_bitmap;
pub mod vmcs;
