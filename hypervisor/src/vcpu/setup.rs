//! Filling a VMCS for a guest's boot core: controls adjusted to the CPU, host state of
//! this core, and the guest's 64-bit entry state (Intel SDM Vol. 3C §25, §27.3).

use core::fmt;

use super::mailbox::Start;
use crate::arch::descriptors::HostTables;
use crate::arch::vmx::{self, FixedBits, VmxInstructionError};
use crate::guest::Guest;
use crate::vmx::caps::VmxCapabilityMsrs;
use crate::vmx::enable::apply_fixed_bits;
use crate::vmx::vmcs::{
    adjust_controls, entry, exit, pin, proc, proc2, ControlError, ControlField, VmcsField as F,
};

#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    /// The VMX capability MSRs could not be read on this core.
    Capabilities,
    /// VMCLEAR or VMPTRLD of the core's VMCS failed.
    MakeCurrent(VmxInstructionError),
    Controls(ControlError),
    Instruction(F, VmxInstructionError),
    /// Given up before the end, as asked: the VMCS is incomplete.
    Interrupted,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Capabilities => f.write_str("VMX capabilities unreadable"),
            Self::MakeCurrent(e) => write!(f, "VMCLEAR/VMPTRLD: {e}"),
            Self::Controls(e) => e.fmt(f),
            Self::Instruction(field, e) => write!(f, "VMWRITE {field:?}: {e}"),
            Self::Interrupted => f.write_str("interrupted"),
        }
    }
}

fn write(field: F, value: u64) -> Result<(), SetupError> {
    vmx::vmwrite(field, value).map_err(|e| SetupError::Instruction(field, e))
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_VMXE: u64 = 1 << 13;
/// The power-on PAT value (SDM Vol. 3A §13.12.4).
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// Segment access rights in VMCS format (SDM Vol. 3C §25.4.1, Table 25-2).
const AR_CODE64: u64 = 0xa09b;
const AR_DATA: u64 = 0xc093;
const AR_TSS_BUSY: u64 = 0x8b;
const AR_UNUSABLE: u64 = 1 << 16;
/// Real-mode code (accessed, readable) and 16-bit data segments.
const AR_REAL_CODE: u64 = 0x9b;
const AR_DATA_16: u64 = 0x93;

/// The CR0 bits a guest may not change: those VMX fixes, except PE and PG, which the
/// unrestricted-guest control frees (SDM Vol. 3C §25.8). CR4 hides VMXE.
pub fn cr0_guest_host_mask(fixed: &FixedBits) -> u64 {
    (fixed.cr0_fixed0 | !fixed.cr0_fixed1) & !(CR0_PE | CR0_PG) & 0xffff_ffff
}

pub fn cr4_guest_host_mask(fixed: &FixedBits) -> u64 {
    (fixed.cr4_fixed0 | !fixed.cr4_fixed1) & 0xffff_ffff
}

/// The CR0 value the CPU runs with for a guest-visible `value`.
pub fn effective_cr0(value: u64, fixed: &FixedBits) -> u64 {
    let fixed0 = fixed.cr0_fixed0 & !(CR0_PE | CR0_PG);
    apply_fixed_bits(value, fixed0, fixed.cr0_fixed1)
}

/// The CR4 value the CPU runs with for a guest-visible `value` (VMXE forced on).
pub fn effective_cr4(value: u64, fixed: &FixedBits) -> u64 {
    apply_fixed_bits(value | CR4_VMXE, fixed.cr4_fixed0, fixed.cr4_fixed1)
}

/// Writes every VMCS field for a vCPU of `guest` starting as `start`. The VMCS must be
/// current on this core. Between groups of fields, gives up when `stop` says so: a parked
/// core that prepares a vCPU ahead of need must not hold up a start that arrives meanwhile.
pub fn configure(
    guest: &Guest,
    start: Start,
    caps: &VmxCapabilityMsrs,
    fixed: &FixedBits,
    host: &HostTables,
    stop: &dyn Fn() -> bool,
) -> Result<(), SetupError> {
    let go_on = || {
        if stop() {
            Err(SetupError::Interrupted)
        } else {
            Ok(())
        }
    };
    // Controls. External interrupts reach the guest directly (its cores' APICs are its
    // own), except while its vCPU halts, when they exit to mark its wake-up (switched by the
    // HLT exit, `exits::exit_on_interrupt`); NMIs exit so the hypervisor can signal a core;
    // HLT exits so idleness is seen; the preemption timer (where the processor has it)
    // bounds how long a vCPU goes without an exit, for the monitor's passes and the samples.
    let pin = adjust_controls(
        ControlField::PinBased,
        caps.pinbased,
        pin::NMI_EXITING,
        pin::PREEMPTION_TIMER,
    )
    .map_err(SetupError::Controls)?;
    let primary = adjust_controls(
        ControlField::ProcBased,
        caps.procbased,
        proc::HLT_EXITING | proc::USE_IO_BITMAPS | proc::USE_MSR_BITMAPS | proc::ACTIVATE_SECONDARY,
        0,
    )
    .map_err(SetupError::Controls)?;
    let secondary = adjust_controls(
        ControlField::Secondary,
        caps.procbased2,
        proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST,
        // Without these the guest's RDTSCP / INVPCID / XSAVES would raise #UD.
        proc2::ENABLE_RDTSCP | proc2::ENABLE_INVPCID | proc2::ENABLE_XSAVES,
    )
    .map_err(SetupError::Controls)?;
    let exits = adjust_controls(
        ControlField::Exit,
        caps.exit,
        exit::HOST_ADDRESS_SPACE_SIZE | exit::SAVE_EFER | exit::LOAD_EFER,
        exit::SAVE_PAT | exit::LOAD_PAT,
    )
    .map_err(SetupError::Controls)?;
    let entries = adjust_controls(
        ControlField::Entry,
        caps.entry,
        entry::IA32E_MODE_GUEST | entry::LOAD_EFER,
        entry::LOAD_PAT,
    )
    .map_err(SetupError::Controls)?;
    go_on()?;
    write(F::PinBasedControls, pin.into())?;
    write(F::ProcBasedControls, primary.into())?;
    write(F::SecondaryControls, secondary.into())?;
    write(F::ExitControls, exits.into())?;
    write(F::EntryControls, entries.into())?;
    go_on()?;
    write(F::ExceptionBitmap, 0)?;
    write(F::IoBitmapA, guest.io_bitmap_a)?;
    write(F::IoBitmapB, guest.io_bitmap_b)?;
    write(F::MsrBitmap, guest.msr_bitmap)?;
    write(F::EptPointer, guest.ept_pointer)?;
    write(F::Vpid, guest.vpid.into())?;
    write(F::ExitMsrStoreCount, 0)?;
    write(F::ExitMsrLoadCount, 0)?;
    write(F::EntryMsrLoadCount, 0)?;
    write(F::EntryInterruptionInfo, 0)?;
    write(F::Cr0GuestHostMask, cr0_guest_host_mask(fixed))?;
    write(F::Cr4GuestHostMask, cr4_guest_host_mask(fixed))?;
    go_on()?;
    write_host_state(host)?;
    go_on()?;

    match start {
        Start::Entry64 => write_guest_entry64(guest, fixed),
        Start::RealMode { vector } => write_guest_real_mode(vector, fixed),
    }?;
    go_on()?;
    for (field, value) in [
        (F::GuestSysenterCs, 0),
        (F::GuestSysenterEsp, 0),
        (F::GuestSysenterEip, 0),
        (F::GuestInterruptibility, 0),
        (F::GuestActivityState, 0),
        (F::GuestPendingDebugExceptions, 0),
        (F::GuestDr7, 0x400),
        (F::GuestRflags, 0x2),
        (F::GuestIa32Pat, PAT_DEFAULT),
        (F::GuestLdtrSelector, 0),
        (F::GuestLdtrBase, 0),
        (F::GuestLdtrLimit, 0),
        (F::GuestLdtrAccessRights, AR_UNUSABLE),
        (F::VmcsLinkPointer, u64::MAX),
    ] {
        write(field, value)?;
    }
    Ok(())
}

/// A boot core: 64-bit mode with flat segments at the guest's entry state
/// (SDM Vol. 3C §27.3.1 lists the checks these values satisfy).
fn write_guest_entry64(guest: &Guest, fixed: &FixedBits) -> Result<(), SetupError> {
    let e = guest.entry;
    write(F::GuestCr0, effective_cr0(e.cr0, fixed))?;
    write(F::Cr0ReadShadow, e.cr0)?;
    write(F::GuestCr3, e.cr3)?;
    write(F::GuestCr4, effective_cr4(e.cr4, fixed))?;
    write(F::Cr4ReadShadow, e.cr4)?;
    write(F::GuestIa32Efer, e.efer)?;
    write(F::GuestRsp, e.rsp)?;
    write(F::GuestRip, e.rip)?;
    write_segment(
        Segment::Cs,
        e.code_selector.into(),
        0,
        0xffff_ffff,
        AR_CODE64,
    )?;
    for segment in DATA_SEGMENTS {
        write_segment(segment, e.data_selector.into(), 0, 0xffff_ffff, AR_DATA)?;
    }
    // No guest TSS yet: a minimal busy one at 0 satisfies the entry checks; the guest
    // loads its own TR before it needs one.
    write_segment(Segment::Tr, 0, 0, 0x67, AR_TSS_BUSY)?;
    write(F::GuestGdtrBase, e.gdt_base)?;
    write(F::GuestGdtrLimit, e.gdt_limit.into())?;
    write(F::GuestIdtrBase, 0)?;
    write(F::GuestIdtrLimit, 0)
}

/// A core started by INIT + STARTUP IPI: the state of SDM Vol. 3A §9.1.1 (Table 9-1)
/// with CS:IP = (vector << 8):0. Real mode needs the unrestricted-guest control.
fn write_guest_real_mode(vector: u8, fixed: &FixedBits) -> Result<(), SetupError> {
    const CR0_RESET: u64 = 0x6000_0010; // CD | NW | ET
    let segment = u64::from(vector) << 8;
    write(F::GuestCr0, effective_cr0(CR0_RESET, fixed))?;
    write(F::Cr0ReadShadow, CR0_RESET)?;
    write(F::GuestCr3, 0)?;
    write(F::GuestCr4, effective_cr4(0, fixed))?;
    write(F::Cr4ReadShadow, 0)?;
    write(F::GuestIa32Efer, 0)?;
    write(F::GuestRsp, 0)?;
    write(F::GuestRip, 0)?;
    write_segment(Segment::Cs, segment, segment << 4, 0xffff, AR_REAL_CODE)?;
    for data in DATA_SEGMENTS {
        write_segment(data, 0, 0, 0xffff, AR_DATA_16)?;
    }
    write_segment(Segment::Tr, 0, 0, 0xffff, AR_TSS_BUSY)?;
    write(F::GuestGdtrBase, 0)?;
    write(F::GuestGdtrLimit, 0xffff)?;
    write(F::GuestIdtrBase, 0)?;
    write(F::GuestIdtrLimit, 0xffff)?;
    // Real mode is not IA-32e mode.
    let entries = vmx::vmread(F::EntryControls) & !u64::from(entry::IA32E_MODE_GUEST);
    write(F::EntryControls, entries)
}

/// Points a vCPU prepared for a STARTUP IPI (by `write_guest_real_mode`) at the SIPI's
/// `vector`: CS = vector << 8, base vector << 12 (SDM Vol. 3A §9.4.4.1).
pub fn set_startup_vector(vector: u8) -> Result<(), SetupError> {
    let segment = u64::from(vector) << 8;
    write(F::GuestCsSelector, segment)?;
    write(F::GuestCsBase, segment << 4)
}

#[derive(Clone, Copy)]
enum Segment {
    Cs,
    Ss,
    Ds,
    Es,
    Fs,
    Gs,
    Tr,
}

const DATA_SEGMENTS: [Segment; 5] = [
    Segment::Ss,
    Segment::Ds,
    Segment::Es,
    Segment::Fs,
    Segment::Gs,
];

fn write_segment(
    segment: Segment,
    selector: u64,
    base: u64,
    limit: u64,
    rights: u64,
) -> Result<(), SetupError> {
    let (s, b, l, r) = match segment {
        Segment::Cs => (
            F::GuestCsSelector,
            F::GuestCsBase,
            F::GuestCsLimit,
            F::GuestCsAccessRights,
        ),
        Segment::Ss => (
            F::GuestSsSelector,
            F::GuestSsBase,
            F::GuestSsLimit,
            F::GuestSsAccessRights,
        ),
        Segment::Ds => (
            F::GuestDsSelector,
            F::GuestDsBase,
            F::GuestDsLimit,
            F::GuestDsAccessRights,
        ),
        Segment::Es => (
            F::GuestEsSelector,
            F::GuestEsBase,
            F::GuestEsLimit,
            F::GuestEsAccessRights,
        ),
        Segment::Fs => (
            F::GuestFsSelector,
            F::GuestFsBase,
            F::GuestFsLimit,
            F::GuestFsAccessRights,
        ),
        Segment::Gs => (
            F::GuestGsSelector,
            F::GuestGsBase,
            F::GuestGsLimit,
            F::GuestGsAccessRights,
        ),
        Segment::Tr => (
            F::GuestTrSelector,
            F::GuestTrBase,
            F::GuestTrLimit,
            F::GuestTrAccessRights,
        ),
    };
    write(s, selector)?;
    write(b, base)?;
    write(l, limit)?;
    write(r, rights)
}

fn write_host_state(host: &HostTables) -> Result<(), SetupError> {
    vmx::write_host_state(host).map_err(|(field, e)| SetupError::Instruction(field, e))
}
