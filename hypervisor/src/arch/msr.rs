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

/// MSRs that only describe the platform and that a guest kernel reads during early boot,
/// before it can survive a #GP: the MTRRs (SDM Vol. 3A §13.11) and IA32_MISC_ENABLE.
pub fn is_informational(msr: u32) -> bool {
    matches!(msr, 0xfe | 0x1a0 | 0x200..=0x20f | 0x250 | 0x258 | 0x259 | 0x268..=0x26f | 0x2ff)
}

/// Reads an informational MSR (see [`is_informational`]); `None` for any other.
pub fn read_informational(msr: u32) -> Option<u64> {
    // SAFETY: every MSR in the list is architectural on the processors the hypervisor
    // runs on (VMX implies IA32_MISC_ENABLE; MTRRs are checked in CPUID.1:EDX[12]), and
    // reading it has no side effect.
    let has_mtrr = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_mtrr());
    (is_informational(msr) && (msr == 0x1a0 || has_mtrr)).then(|| unsafe { read(msr) })
}
