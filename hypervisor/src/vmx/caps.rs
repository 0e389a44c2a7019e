//! What the CPU's VMX capability MSRs offer (Intel SDM Vol. 3D, Appendix A).
//!
//! Pure decoding: the values are read by `arch::vmx` and decoded here, so the logic
//! is unit-tested on the host.

/// MSR numbers of the VMX capability registers (SDM Vol. 4, Table 2-2).
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// Raw values of the capability MSRs, as read on one core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCapabilityMsrs {
    pub basic: u64,
    /// The TRUE_ variant when IA32_VMX_BASIC[55] says it exists (SDM Vol. 3D §A.3.1).
    pub pinbased: u64,
    /// The TRUE_ variant when IA32_VMX_BASIC[55] says it exists (SDM Vol. 3D §A.3.2).
    pub procbased: u64,
    /// Zero when the primary controls cannot activate secondary controls.
    pub procbased2: u64,
    pub misc: u64,
    /// Zero when neither EPT nor VPID can be enabled (SDM Vol. 3D §A.10).
    pub ept_vpid_cap: u64,
    /// VM-exit and VM-entry controls (TRUE_ variants when available, §A.4, §A.5).
    pub exit: u64,
    pub entry: u64,
}

impl VmxCapabilityMsrs {
    /// IA32_VMX_BASIC[55]: the TRUE_xxx_CTLS MSRs exist.
    pub fn has_true_controls(&self) -> bool {
        self.basic & (1 << 55) != 0
    }
}

/// Tests whether a control may be set to 1: bit `bit` of the allowed-1 settings in
/// bits 63:32 of a control capability MSR (SDM Vol. 3D §A.3).
fn allowed1(capability: u64, bit: u32) -> bool {
    (capability >> 32) & (1 << bit) != 0
}

/// The VMX features this project cares about, decoded from the capability MSRs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxFeatures {
    /// VMCS revision identifier, IA32_VMX_BASIC[30:0].
    pub vmcs_revision: u32,
    /// Bytes to allocate for the VMXON region and VMCS, IA32_VMX_BASIC[44:32].
    pub vmcs_region_size: u32,
    pub ept: bool,
    pub ept_2mib_pages: bool,
    pub ept_1gib_pages: bool,
    pub ept_write_back: bool,
    pub invept: bool,
    pub vpid: bool,
    pub invvpid: bool,
    pub unrestricted_guest: bool,
    pub preemption_timer: bool,
    /// The preemption timer counts down every 2^rate TSC ticks (IA32_VMX_MISC[4:0]).
    pub preemption_timer_rate: u8,
    pub hlt_exiting: bool,
    pub msr_bitmaps: bool,
    pub io_bitmaps: bool,
    pub tpr_shadow: bool,
    pub x2apic_virtualization: bool,
    pub apic_register_virtualization: bool,
    pub virtual_interrupt_delivery: bool,
    pub posted_interrupts: bool,
    /// Guests may be put in the wait-for-SIPI activity state (IA32_VMX_MISC[8]).
    pub wait_for_sipi_state: bool,
    /// The TRUE_xxx_CTLS MSRs report which default-1 controls may be cleared.
    pub true_controls: bool,
}

impl VmxFeatures {
    pub fn decode(msrs: &VmxCapabilityMsrs) -> Self {
        // Primary processor-based controls (SDM Vol. 3C §25.6.2, Table 25-6).
        const PROC_HLT_EXITING: u32 = 7;
        const PROC_USE_TPR_SHADOW: u32 = 21;
        const PROC_USE_IO_BITMAPS: u32 = 25;
        const PROC_USE_MSR_BITMAPS: u32 = 28;
        const PROC_ACTIVATE_SECONDARY: u32 = 31;
        // Secondary processor-based controls (Table 25-7).
        const PROC2_ENABLE_EPT: u32 = 1;
        const PROC2_VIRTUALIZE_X2APIC: u32 = 4;
        const PROC2_ENABLE_VPID: u32 = 5;
        const PROC2_UNRESTRICTED_GUEST: u32 = 7;
        const PROC2_APIC_REGISTER_VIRT: u32 = 8;
        const PROC2_VIRTUAL_INTR_DELIVERY: u32 = 9;
        // Pin-based controls (Table 25-5).
        const PIN_PREEMPTION_TIMER: u32 = 6;
        const PIN_POSTED_INTERRUPTS: u32 = 7;

        let secondary = allowed1(msrs.procbased, PROC_ACTIVATE_SECONDARY);
        let proc2 = |bit| secondary && allowed1(msrs.procbased2, bit);
        let ept = proc2(PROC2_ENABLE_EPT);
        let vpid = proc2(PROC2_ENABLE_VPID);
        // IA32_VMX_EPT_VPID_CAP bits (SDM Vol. 3D §A.10).
        let cap = |bit: u32| msrs.ept_vpid_cap & (1 << bit) != 0;

        Self {
            vmcs_revision: (msrs.basic & 0x7fff_ffff) as u32,
            vmcs_region_size: ((msrs.basic >> 32) & 0x1fff) as u32,
            ept,
            ept_2mib_pages: ept && cap(16),
            ept_1gib_pages: ept && cap(17),
            ept_write_back: ept && cap(14),
            invept: ept && cap(20),
            vpid,
            invvpid: vpid && cap(32),
            unrestricted_guest: proc2(PROC2_UNRESTRICTED_GUEST),
            preemption_timer: allowed1(msrs.pinbased, PIN_PREEMPTION_TIMER),
            preemption_timer_rate: (msrs.misc & 0x1f) as u8,
            hlt_exiting: allowed1(msrs.procbased, PROC_HLT_EXITING),
            msr_bitmaps: allowed1(msrs.procbased, PROC_USE_MSR_BITMAPS),
            io_bitmaps: allowed1(msrs.procbased, PROC_USE_IO_BITMAPS),
            tpr_shadow: allowed1(msrs.procbased, PROC_USE_TPR_SHADOW),
            x2apic_virtualization: proc2(PROC2_VIRTUALIZE_X2APIC),
            apic_register_virtualization: proc2(PROC2_APIC_REGISTER_VIRT),
            virtual_interrupt_delivery: proc2(PROC2_VIRTUAL_INTR_DELIVERY),
            posted_interrupts: allowed1(msrs.pinbased, PIN_POSTED_INTERRUPTS),
            wait_for_sipi_state: msrs.misc & (1 << 8) != 0,
            true_controls: msrs.has_true_controls(),
        }
    }

    /// (name, offered) for every feature, in report order.
    pub fn flags(&self) -> [(&'static str, bool); 19] {
        [
            ("ept", self.ept),
            ("ept_2mib_pages", self.ept_2mib_pages),
            ("ept_1gib_pages", self.ept_1gib_pages),
            ("ept_write_back", self.ept_write_back),
            ("invept", self.invept),
            ("vpid", self.vpid),
            ("invvpid", self.invvpid),
            ("unrestricted_guest", self.unrestricted_guest),
            ("preemption_timer", self.preemption_timer),
            ("hlt_exiting", self.hlt_exiting),
            ("msr_bitmaps", self.msr_bitmaps),
            ("io_bitmaps", self.io_bitmaps),
            ("tpr_shadow", self.tpr_shadow),
            ("x2apic_virtualization", self.x2apic_virtualization),
            (
                "apic_register_virtualization",
                self.apic_register_virtualization,
            ),
            (
                "virtual_interrupt_delivery",
                self.virtual_interrupt_delivery,
            ),
            ("posted_interrupts", self.posted_interrupts),
            ("wait_for_sipi_state", self.wait_for_sipi_state),
            ("true_controls", self.true_controls),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_allowed1(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |acc, b| acc | (1u64 << (32 + b)))
    }

    #[test]
    fn decodes_revision_and_region_size() {
        let msrs = VmxCapabilityMsrs {
            basic: (0x1000u64 << 32) | 0x12,
            ..Default::default()
        };
        let f = VmxFeatures::decode(&msrs);
        assert_eq!(f.vmcs_revision, 0x12);
        assert_eq!(f.vmcs_region_size, 0x1000);
    }

    #[test]
    fn secondary_features_need_the_activate_secondary_control() {
        let msrs = VmxCapabilityMsrs {
            procbased: 0, // cannot activate secondary controls
            procbased2: with_allowed1(&[1, 5, 7]),
            ept_vpid_cap: u64::MAX,
            ..Default::default()
        };
        let f = VmxFeatures::decode(&msrs);
        assert!(!f.ept && !f.vpid && !f.unrestricted_guest && !f.ept_2mib_pages);
    }

    #[test]
    fn decodes_ept_vpid_and_pin_controls() {
        let msrs = VmxCapabilityMsrs {
            pinbased: with_allowed1(&[6]),
            procbased: with_allowed1(&[7, 25, 28, 31]),
            procbased2: with_allowed1(&[1, 4, 5, 7]),
            ept_vpid_cap: (1 << 14) | (1 << 16) | (1 << 20) | (1 << 32),
            misc: 5 | (1 << 8),
            ..Default::default()
        };
        let f = VmxFeatures::decode(&msrs);
        assert!(f.ept && f.ept_2mib_pages && !f.ept_1gib_pages && f.ept_write_back && f.invept);
        assert!(f.vpid && f.invvpid && f.unrestricted_guest && f.x2apic_virtualization);
        assert!(f.preemption_timer && !f.posted_interrupts);
        assert!(f.hlt_exiting && f.io_bitmaps && f.msr_bitmaps && !f.tpr_shadow);
        assert_eq!(f.preemption_timer_rate, 5);
        assert!(f.wait_for_sipi_state);
    }
}
