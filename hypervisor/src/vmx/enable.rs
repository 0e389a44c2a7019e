//! Deciding whether and how VMX can be turned on, from CPUID and IA32_FEATURE_CONTROL
//! (Intel SDM Vol. 3C §24.7 "Enabling and Entering VMX Operation").

use core::fmt;

/// IA32_FEATURE_CONTROL bits (SDM Vol. 4, Table 2-2, MSR 3AH).
pub mod feature_control {
    /// Once set, the MSR cannot be written until reset.
    pub const LOCK: u64 = 1 << 0;
    /// VMXON is allowed outside SMX operation.
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// Why VMX cannot be used on a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxUnavailable {
    /// CPUID.1:ECX.VMX[bit 5] = 0: the processor (or emulator) has no VMX.
    NotSupported,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX outside SMX disabled.
    LockedOff,
    /// VMXON failed although every documented precondition was met.
    VmxonFailed,
}

impl VmxUnavailable {
    const ALL: [Self; 3] = [Self::NotSupported, Self::LockedOff, Self::VmxonFailed];

    /// Compact form for an atomic in another core's public state (0 = none).
    pub fn to_u8(self) -> u8 {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .map_or(0, |i| i as u8 + 1)
    }

    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).checked_sub(1)?).copied()
    }

    /// Stable short code, used in the `fatal` marker.
    pub fn code(self) -> &'static str {
        match self {
            Self::NotSupported => "no_vmx",
            Self::LockedOff => "vmx_locked_off",
            Self::VmxonFailed => "vmxon_failed",
        }
    }
}

impl fmt::Display for VmxUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSupported => f.write_str(
                "this CPU does not support Intel VMX (CPUID.1:ECX.VMX = 0); \
                 run on an Intel CPU with VT-x, or under Bochs / QEMU+KVM with nested VMX",
            ),
            Self::LockedOff => f.write_str(
                "VMX is disabled and locked by the firmware (IA32_FEATURE_CONTROL lock=1, \
                 VMX-outside-SMX=0); enable Intel VT-x in the firmware setup",
            ),
            Self::VmxonFailed => f.write_str("VMXON failed (VMfailInvalid)"),
        }
    }
}

/// What to do with IA32_FEATURE_CONTROL before VMXON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControlPlan {
    /// Already locked with VMX outside SMX allowed: nothing to write.
    AlreadyEnabled,
    /// Unlocked: write this value (VMX outside SMX + lock) first.
    WriteAndLock(u64),
}

/// Decides from CPUID.1:ECX.VMX and the current IA32_FEATURE_CONTROL value.
pub fn plan_feature_control(
    cpuid_has_vmx: bool,
    current: u64,
) -> Result<FeatureControlPlan, VmxUnavailable> {
    use feature_control::{LOCK, VMX_OUTSIDE_SMX};
    if !cpuid_has_vmx {
        return Err(VmxUnavailable::NotSupported);
    }
    match (current & LOCK != 0, current & VMX_OUTSIDE_SMX != 0) {
        (true, true) => Ok(FeatureControlPlan::AlreadyEnabled),
        (true, false) => Err(VmxUnavailable::LockedOff),
        (false, _) => Ok(FeatureControlPlan::WriteAndLock(
            current | LOCK | VMX_OUTSIDE_SMX,
        )),
    }
}

/// Applies the VMX fixed-bit MSRs to a CR0 or CR4 value: bits set in FIXED0 must be 1,
/// bits clear in FIXED1 must be 0 (SDM Vol. 3D §A.7, §A.8).
pub fn apply_fixed_bits(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

#[cfg(test)]
mod tests {
    use super::feature_control::*;
    use super::*;

    #[test]
    fn no_vmx_in_cpuid_is_refused_whatever_the_msr_says() {
        assert_eq!(
            plan_feature_control(false, LOCK | VMX_OUTSIDE_SMX),
            Err(VmxUnavailable::NotSupported)
        );
    }

    #[test]
    fn locked_off_is_refused() {
        assert_eq!(
            plan_feature_control(true, LOCK),
            Err(VmxUnavailable::LockedOff)
        );
        assert_eq!(
            plan_feature_control(true, LOCK | (1 << 1)),
            Err(VmxUnavailable::LockedOff)
        );
    }

    #[test]
    fn locked_on_needs_no_write() {
        assert_eq!(
            plan_feature_control(true, LOCK | VMX_OUTSIDE_SMX),
            Ok(FeatureControlPlan::AlreadyEnabled)
        );
    }

    #[test]
    fn unlocked_is_enabled_and_locked_keeping_other_bits() {
        let other = 1 << 20;
        assert_eq!(
            plan_feature_control(true, other),
            Ok(FeatureControlPlan::WriteAndLock(
                other | LOCK | VMX_OUTSIDE_SMX
            ))
        );
    }

    #[test]
    fn fixed_bits_force_ones_and_zeros() {
        // CR4: VMXE (bit 13) forced to 1 by FIXED0; bit 30 not allowed by FIXED1.
        let fixed0 = 1 << 13;
        let fixed1 = !(1u64 << 30);
        assert_eq!(
            apply_fixed_bits((1 << 30) | (1 << 5), fixed0, fixed1),
            (1 << 13) | (1 << 5)
        );
    }

    #[test]
    fn compact_form_round_trips() {
        for r in VmxUnavailable::ALL {
            assert_eq!(VmxUnavailable::from_u8(r.to_u8()), Some(r));
        }
        assert_eq!(VmxUnavailable::from_u8(0), None);
        assert_eq!(VmxUnavailable::from_u8(200), None);
    }

    #[test]
    fn reasons_are_one_line_with_stable_codes() {
        for r in [
            VmxUnavailable::NotSupported,
            VmxUnavailable::LockedOff,
            VmxUnavailable::VmxonFailed,
        ] {
            assert!(!std::format!("{r}").contains('\n'));
            assert!(!r.code().is_empty());
        }
    }
}
