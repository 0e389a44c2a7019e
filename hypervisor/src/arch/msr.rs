//! Model-specific registers (RDMSR/WRMSR, Intel SDM Vol. 2B).

use x86_64::registers::model_specific::Msr;

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (RDMSR of an unimplemented MSR raises #GP): check
/// the CPUID feature that documents it first.
pub unsafe fn read(msr: u32) -> u64 {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist, and the value must not break memory safety (e.g. moving the
/// APIC base under live mappings, changing EFER modes).
pub unsafe fn write(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Msr::new(msr).write(value) }
}
