//! Turning VMX operation on: IA32_FEATURE_CONTROL, CR0/CR4 fixed bits, CR4.VMXE and
//! VMXON (Intel SDM Vol. 3C §24.7, §24.8). The decisions are in `crate::vmx`.

use super::{cpu, msr};
use crate::vmx::caps::{msr as caps_msr, VmxCapabilityMsrs};
use crate::vmx::enable::{
    apply_fixed_bits, plan_feature_control, FeatureControlPlan, VmxUnavailable,
};

const CR4_VMXE: u64 = 1 << 13;

/// A 4 KiB-aligned VMXON region or VMCS (SDM Vol. 3C §25.2, §25.11.5).
#[repr(C, align(4096))]
pub struct VmxRegion([u8; 4096]);

impl VmxRegion {
    pub const ZEROED: Self = Self([0; 4096]);

    /// Physical address: the hypervisor is identity-mapped.
    fn physical_address(&self) -> u64 {
        self as *const Self as u64
    }
}

fn cpuid_has_vmx() -> bool {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_vmx())
}

/// Reads the capability MSRs of this core.
pub fn read_capabilities() -> Result<VmxCapabilityMsrs, VmxUnavailable> {
    if !cpuid_has_vmx() {
        return Err(VmxUnavailable::NotSupported);
    }
    // SAFETY: CPUID reports VMX, so IA32_VMX_BASIC..PROCBASED_CTLS exist (SDM Vol. 3D §A.1);
    // PROCBASED_CTLS2 exists only if secondary controls can be activated (§A.3.3) and
    // EPT_VPID_CAP only if EPT or VPID can be enabled (§A.10), checked before reading.
    unsafe {
        let basic = msr::read(caps_msr::IA32_VMX_BASIC);
        let true_controls = basic & (1 << 55) != 0;
        let (pin, proc) = if true_controls {
            (
                caps_msr::IA32_VMX_TRUE_PINBASED_CTLS,
                caps_msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            )
        } else {
            (
                caps_msr::IA32_VMX_PINBASED_CTLS,
                caps_msr::IA32_VMX_PROCBASED_CTLS,
            )
        };
        let pinbased = msr::read(pin);
        let procbased = msr::read(proc);
        let has_secondary = (procbased >> 32) & (1 << 31) != 0;
        let procbased2 = if has_secondary {
            msr::read(caps_msr::IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let ept_or_vpid = (procbased2 >> 32) & ((1 << 1) | (1 << 5)) != 0;
        let ept_vpid_cap = if ept_or_vpid {
            msr::read(caps_msr::IA32_VMX_EPT_VPID_CAP)
        } else {
            0
        };
        let misc = msr::read(caps_msr::IA32_VMX_MISC);
        Ok(VmxCapabilityMsrs {
            basic,
            pinbased,
            procbased,
            procbased2,
            misc,
            ept_vpid_cap,
        })
    }
}

/// Enters VMX root operation on this core with `region` as its VMXON region.
pub fn enable(region: &'static mut VmxRegion, vmcs_revision: u32) -> Result<(), VmxUnavailable> {
    if !cpuid_has_vmx() {
        return Err(VmxUnavailable::NotSupported);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists when CPUID reports VMX (SDM Vol. 4 Table 2-2).
    let feature_control = unsafe { msr::read(caps_msr::IA32_FEATURE_CONTROL) };
    if let FeatureControlPlan::WriteAndLock(value) = plan_feature_control(true, feature_control)? {
        // SAFETY: the MSR is unlocked (plan says so); setting VMX-outside-SMX and the lock
        // bit changes no memory mapping.
        unsafe { msr::write(caps_msr::IA32_FEATURE_CONTROL, value) };
    }

    // SAFETY: the fixed-bit MSRs exist with VMX (SDM Vol. 3D §A.7, §A.8).
    let (cr0_fixed0, cr0_fixed1, cr4_fixed0, cr4_fixed1) = unsafe {
        (
            msr::read(caps_msr::IA32_VMX_CR0_FIXED0),
            msr::read(caps_msr::IA32_VMX_CR0_FIXED1),
            msr::read(caps_msr::IA32_VMX_CR4_FIXED0),
            msr::read(caps_msr::IA32_VMX_CR4_FIXED1),
        )
    };
    let cr0 = apply_fixed_bits(cpu::read_cr0(), cr0_fixed0, cr0_fixed1);
    let cr4 = apply_fixed_bits(cpu::read_cr4() | CR4_VMXE, cr4_fixed0, cr4_fixed1);
    // SAFETY: in long mode the fixed bits require exactly what is already set (PE, PG, NE,
    // PAE) plus VMXE; paging and protection stay as they are.
    unsafe { cpu::write_cr0_cr4(cr0, cr4) };

    region.0[..4].copy_from_slice(&vmcs_revision.to_le_bytes());
    let physical = region.physical_address();
    let failed: u8;
    // SAFETY: VMXON takes the physical address of a 4 KiB-aligned region that starts with
    // the VMCS revision identifier (SDM Vol. 3C §25.11.5); `region` is 'static and this
    // core's alone, and all preconditions checked above hold. CF=1 reports VMfailInvalid.
    unsafe {
        core::arch::asm!(
            "vmxon [{addr}]",
            "setc {failed}",
            addr = in(reg) &physical,
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    if failed != 0 {
        return Err(VmxUnavailable::VmxonFailed);
    }
    Ok(())
}
