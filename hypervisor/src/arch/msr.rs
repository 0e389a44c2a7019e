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
    let has_mtrr = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_mtrr());
    (is_informational(msr) && (msr == 0x1a0 || has_mtrr)).then(|| {
        // SAFETY: every MSR in the list is architectural on the processors the hypervisor
        // runs on (VMX implies IA32_MISC_ENABLE; MTRRs are checked in CPUID.1:EDX[12]), and
        // reading it has no side effect.
        unsafe { read(msr) }
    })
}

/// The pass-through MSRs a guest kernel sets that the VMCS does not switch (unlike FS/GS base,
/// which are guest-state fields): IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK,
/// IA32_KERNEL_GS_BASE and IA32_TSC_AUX (SDM Vol. 4, Table 2-2).
const GUEST_ONLY_MSRS: [u32; 6] = [
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
];

/// Zeroes [`GUEST_ONLY_MSRS`] after a guest's vCPU ends on this core, so the next guest to run
/// here cannot read where the previous one keeps its system-call entry or per-CPU data.
pub fn clear_guest_only_msrs() {
    for msr in GUEST_ONLY_MSRS {
        // SAFETY: these MSRs exist on every x86-64 CPU with RDTSCP (VMX-capable ones here);
        // the hypervisor itself never uses SYSCALL, KERNEL_GS_BASE or TSC_AUX, so zeroing them
        // changes nothing for it, and the next guest sets its own before using them.
        unsafe { write(msr, 0) };
    }
}
