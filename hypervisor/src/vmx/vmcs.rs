//! VMCS field encodings and VM-execution control bits (Intel SDM Vol. 3C §25 and
//! Appendix B), and adjusting wanted controls to what the CPU allows (§A.3-A.5).

use core::fmt;

/// VMCS fields this hypervisor reads or writes, by their encoding (SDM Vol. 3C App. B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum VmcsField {
    // 16-bit control / guest / host fields (B.1).
    Vpid = 0x0000,
    GuestEsSelector = 0x0800,
    GuestCsSelector = 0x0802,
    GuestSsSelector = 0x0804,
    GuestDsSelector = 0x0806,
    GuestFsSelector = 0x0808,
    GuestGsSelector = 0x080a,
    GuestLdtrSelector = 0x080c,
    GuestTrSelector = 0x080e,
    HostEsSelector = 0x0c00,
    HostCsSelector = 0x0c02,
    HostSsSelector = 0x0c04,
    HostDsSelector = 0x0c06,
    HostFsSelector = 0x0c08,
    HostGsSelector = 0x0c0a,
    HostTrSelector = 0x0c0c,
    // 64-bit fields (B.2).
    IoBitmapA = 0x2000,
    IoBitmapB = 0x2002,
    MsrBitmap = 0x2004,
    EptPointer = 0x201a,
    GuestPhysicalAddress = 0x2400,
    VmcsLinkPointer = 0x2800,
    GuestIa32Pat = 0x2804,
    GuestIa32Efer = 0x2806,
    HostIa32Pat = 0x2c00,
    HostIa32Efer = 0x2c02,
    // 32-bit fields (B.3).
    PinBasedControls = 0x4000,
    ProcBasedControls = 0x4002,
    ExceptionBitmap = 0x4004,
    ExitControls = 0x400c,
    ExitMsrStoreCount = 0x400e,
    ExitMsrLoadCount = 0x4010,
    EntryControls = 0x4012,
    EntryMsrLoadCount = 0x4014,
    EntryInterruptionInfo = 0x4016,
    EntryExceptionErrorCode = 0x4018,
    EntryInstructionLength = 0x401a,
    SecondaryControls = 0x401e,
    VmInstructionError = 0x4400,
    ExitReason = 0x4402,
    ExitInterruptionInfo = 0x4404,
    ExitInstructionLength = 0x440c,
    GuestEsLimit = 0x4800,
    GuestCsLimit = 0x4802,
    GuestSsLimit = 0x4804,
    GuestDsLimit = 0x4806,
    GuestFsLimit = 0x4808,
    GuestGsLimit = 0x480a,
    GuestLdtrLimit = 0x480c,
    GuestTrLimit = 0x480e,
    GuestGdtrLimit = 0x4810,
    GuestIdtrLimit = 0x4812,
    GuestEsAccessRights = 0x4814,
    GuestCsAccessRights = 0x4816,
    GuestSsAccessRights = 0x4818,
    GuestDsAccessRights = 0x481a,
    GuestFsAccessRights = 0x481c,
    GuestGsAccessRights = 0x481e,
    GuestLdtrAccessRights = 0x4820,
    GuestTrAccessRights = 0x4822,
    GuestInterruptibility = 0x4824,
    GuestActivityState = 0x4826,
    GuestSysenterCs = 0x482a,
    PreemptionTimerValue = 0x482e,
    HostSysenterCs = 0x4c00,
    // Natural-width fields (B.4).
    Cr0GuestHostMask = 0x6000,
    Cr4GuestHostMask = 0x6002,
    Cr0ReadShadow = 0x6004,
    Cr4ReadShadow = 0x6006,
    ExitQualification = 0x6400,
    GuestLinearAddress = 0x640a,
    GuestCr0 = 0x6800,
    GuestCr3 = 0x6802,
    GuestCr4 = 0x6804,
    GuestEsBase = 0x6806,
    GuestCsBase = 0x6808,
    GuestSsBase = 0x680a,
    GuestDsBase = 0x680c,
    GuestFsBase = 0x680e,
    GuestGsBase = 0x6810,
    GuestLdtrBase = 0x6812,
    GuestTrBase = 0x6814,
    GuestGdtrBase = 0x6816,
    GuestIdtrBase = 0x6818,
    GuestDr7 = 0x681a,
    GuestRsp = 0x681c,
    GuestRip = 0x681e,
    GuestRflags = 0x6820,
    GuestPendingDebugExceptions = 0x6822,
    GuestSysenterEsp = 0x6824,
    GuestSysenterEip = 0x6826,
    HostCr0 = 0x6c00,
    HostCr3 = 0x6c02,
    HostCr4 = 0x6c04,
    HostFsBase = 0x6c06,
    HostGsBase = 0x6c08,
    HostTrBase = 0x6c0a,
    HostGdtrBase = 0x6c0c,
    HostIdtrBase = 0x6c0e,
    HostSysenterEsp = 0x6c10,
    HostSysenterEip = 0x6c12,
    HostRsp = 0x6c14,
    HostRip = 0x6c16,
}

/// Pin-based VM-execution controls (SDM Vol. 3C §25.6.1, Table 25-5).
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based controls (Table 25-6).
pub mod proc {
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based controls (Table 25-7).
pub mod proc2 {
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
}

/// VM-exit controls (Table 25-13).
pub mod exit {
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (Table 25-15).
pub mod entry {
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// Which control field a [`ControlError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlField {
    PinBased,
    ProcBased,
    Secondary,
    Exit,
    Entry,
}

/// Required controls the CPU cannot set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError {
    pub field: ControlField,
    /// Bits that were required but are not allowed to be 1.
    pub unsupported: u32,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} VM controls {:#x} are required but not supported by this CPU",
            self.field, self.unsupported
        )
    }
}

/// Adjusts controls to a capability MSR (allowed-0 settings in bits 31:0 must be 1,
/// allowed-1 settings in bits 63:32 may be 1; SDM Vol. 3D §A.3). `required` bits must
/// be allowed; `optional` bits are set only where allowed.
pub fn adjust_controls(
    field: ControlField,
    capability: u64,
    required: u32,
    optional: u32,
) -> Result<u32, ControlError> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let unsupported = required & !may_be_one;
    if unsupported != 0 {
        return Err(ControlError { field, unsupported });
    }
    Ok(must_be_one | required | (optional & may_be_one))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_one_bits_are_kept_and_optional_bits_filtered() {
        let capability = (0x0000_00ffu64 << 32) | 0x16; // may set 0..7, must set 1,2,4
        assert_eq!(
            adjust_controls(ControlField::PinBased, capability, 0x1, 0x300 | 0x40),
            Ok(0x16 | 0x1 | 0x40)
        );
    }

    #[test]
    fn unsupported_required_bits_are_named() {
        let capability = 0x0000_000fu64 << 32;
        assert_eq!(
            adjust_controls(ControlField::Secondary, capability, 0x12, 0),
            Err(ControlError {
                field: ControlField::Secondary,
                unsupported: 0x10
            })
        );
    }
}
