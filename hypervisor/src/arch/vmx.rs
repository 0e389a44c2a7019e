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
        let (exit, entry) = if true_controls {
            (
                msr::read(caps_msr::IA32_VMX_TRUE_EXIT_CTLS),
                msr::read(caps_msr::IA32_VMX_TRUE_ENTRY_CTLS),
            )
        } else {
            (
                msr::read(caps_msr::IA32_VMX_EXIT_CTLS),
                msr::read(caps_msr::IA32_VMX_ENTRY_CTLS),
            )
        };
        Ok(VmxCapabilityMsrs {
            basic,
            pinbased,
            procbased,
            procbased2,
            misc,
            ept_vpid_cap,
            exit,
            entry,
        })
    }
}

/// The CR0 and CR4 fixed-bit MSRs (FIXED0, FIXED1 for each; SDM Vol. 3D §A.7, §A.8).
#[derive(Clone, Copy, Debug)]
pub struct FixedBits {
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// Reads the fixed-bit MSRs; `None` without VMX.
pub fn fixed_bits() -> Option<FixedBits> {
    if !cpuid_has_vmx() {
        return None;
    }
    // SAFETY: the fixed-bit MSRs exist when CPUID reports VMX (SDM Vol. 3D §A.7, §A.8).
    Some(unsafe {
        FixedBits {
            cr0_fixed0: msr::read(caps_msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: msr::read(caps_msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: msr::read(caps_msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: msr::read(caps_msr::IA32_VMX_CR4_FIXED1),
        }
    })
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

    let fixed = fixed_bits().ok_or(VmxUnavailable::NotSupported)?;
    let cr0 = apply_fixed_bits(cpu::read_cr0(), fixed.cr0_fixed0, fixed.cr0_fixed1);
    let cr4 = apply_fixed_bits(
        cpu::read_cr4() | CR4_VMXE,
        fixed.cr4_fixed0,
        fixed.cr4_fixed1,
    );
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

/// Failure of a VMX instruction (SDM Vol. 3C §31.2): VMfailInvalid (no current VMCS) or
/// VMfailValid with the VM-instruction error number (§31.4, Table 31-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxInstructionError {
    FailInvalid,
    FailValid(u32),
}

impl core::fmt::Display for VmxInstructionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::FailInvalid => f.write_str("VMfailInvalid (no current VMCS)"),
            Self::FailValid(n) => write!(f, "VMfailValid, VM-instruction error {n}"),
        }
    }
}

/// Turns the flags a VMX instruction left into a result: CF = VMfailInvalid,
/// ZF = VMfailValid (error number in the current VMCS).
fn check(rflags: u64) -> Result<(), VmxInstructionError> {
    const CF: u64 = 1 << 0;
    const ZF: u64 = 1 << 6;
    if rflags & CF != 0 {
        Err(VmxInstructionError::FailInvalid)
    } else if rflags & ZF != 0 {
        Err(VmxInstructionError::FailValid(
            vmread(VmcsField::VmInstructionError) as u32,
        ))
    } else {
        Ok(())
    }
}

use super::descriptors::{HostTables, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, TSS_SELECTOR};
use crate::vmx::vmcs::VmcsField;

impl VmxRegion {
    /// Prepares this region as a VMCS: revision ID, then VMCLEAR and VMPTRLD make it the
    /// current VMCS of this core (SDM Vol. 3C §25.11.3). Regions come from the per-CPU
    /// table, so they outlive their time as the current VMCS.
    pub fn make_current_vmcs(&mut self, vmcs_revision: u32) -> Result<(), VmxInstructionError> {
        self.0[..4].copy_from_slice(&vmcs_revision.to_le_bytes());
        let physical = self.physical_address();
        let (clear_flags, load_flags): (u64, u64);
        // SAFETY: VMCLEAR/VMPTRLD take the physical address of a 4 KiB-aligned region with
        // the right revision ID, owned by this core (per-CPU table, never freed), in VMX root.
        unsafe {
            core::arch::asm!(
                "vmclear [{addr}]", "pushfq", "pop {cf}",
                "vmptrld [{addr}]", "pushfq", "pop {lf}",
                addr = in(reg) &physical, cf = out(reg) clear_flags, lf = out(reg) load_flags,
            );
        }
        check(clear_flags)?;
        check(load_flags)
    }

    /// Makes this region the current VMCS again (VMPTRLD alone), after another region was:
    /// its data and launch state are kept, so a VMCS set up by [`Self::make_current_vmcs`]
    /// and not launched since may be launched (SDM Vol. 3C §25.1: a processor keeps several
    /// VMCSs active, one of them current).
    pub fn load_vmcs(&mut self) -> Result<(), VmxInstructionError> {
        let physical = self.physical_address();
        let load_flags: u64;
        // SAFETY: VMPTRLD takes the physical address of a 4 KiB-aligned region owned by this
        // core (per-CPU table, never freed), in VMX root; a region without the right revision
        // ID makes it fail (reported), not use the region.
        unsafe {
            core::arch::asm!(
                "vmptrld [{addr}]", "pushfq", "pop {lf}",
                addr = in(reg) &physical, lf = out(reg) load_flags,
            );
        }
        check(load_flags)
    }
}

/// Reads a field of the current VMCS (0 if there is none; callers only read after a
/// VMCS was made current on this core).
///
/// Inlined, like [`vmwrite`] and [`enter_guest`]: they are on every VM exit's path, where
/// a call and, for `vmwrite`, the host-state check of a field known at compile time would
/// be counted in microseconds under Bochs.
#[inline]
pub fn vmread(field: VmcsField) -> u64 {
    let value: u64;
    // SAFETY: VMREAD only reads the current VMCS; with none it fails (value unchanged 0).
    unsafe {
        core::arch::asm!("xor {v:e}, {v:e}", "vmread {v}, {f}", f = in(reg) field as u64, v = out(reg) value, options(nostack));
    }
    value
}

fn is_host_state(field: VmcsField) -> bool {
    matches!(field as u32 >> 10 & 3, 3)
}

/// Writes a control, guest-state or read-only-data field of the current VMCS.
#[inline]
pub fn vmwrite(field: VmcsField, value: u64) -> Result<(), VmxInstructionError> {
    assert!(
        !is_host_state(field),
        "host state is written by write_host_state only"
    );
    // SAFETY: control and guest-state fields only affect the guest, which EPT confines to
    // its partition; VMX checks their consistency at VM entry.
    unsafe { raw_vmwrite(field, value) }
}

/// Fills the host-state area of the current VMCS with this core's own state, which the
/// processor loads at every VM exit (Intel SDM Vol. 3C §25.5, §28.5): its live control
/// registers, the descriptor tables [`load_for_cpu`](super::descriptors::load_for_cpu)
/// loaded, EFER and PAT as they are now, and the exit trampoline. HOST_RSP is set by the
/// trampoline on every entry. On failure, the field VMWRITE refused.
pub fn write_host_state(host: &HostTables) -> Result<(), (VmcsField, VmxInstructionError)> {
    use VmcsField as F;
    let fields = [
        (F::HostCr0, cpu::read_cr0()),
        (F::HostCr3, cpu::read_cr3()),
        (F::HostCr4, cpu::read_cr4()),
        (F::HostCsSelector, KERNEL_CODE_SELECTOR.into()),
        (F::HostSsSelector, KERNEL_DATA_SELECTOR.into()),
        (F::HostDsSelector, KERNEL_DATA_SELECTOR.into()),
        (F::HostEsSelector, KERNEL_DATA_SELECTOR.into()),
        (F::HostFsSelector, 0),
        (F::HostGsSelector, 0),
        (F::HostTrSelector, TSS_SELECTOR.into()),
        (F::HostFsBase, 0),
        (F::HostGsBase, 0),
        (F::HostTrBase, host.tss_base),
        (F::HostGdtrBase, host.gdt_base),
        (F::HostIdtrBase, host.idt_base),
        (F::HostIa32Efer, cpu::read_efer()),
        (F::HostIa32Pat, cpu::read_pat()),
        (F::HostSysenterCs, 0),
        (F::HostSysenterEsp, 0),
        (F::HostSysenterEip, 0),
        (F::HostRip, exit_trampoline_address()),
    ];
    for (field, value) in fields {
        debug_assert!(is_host_state(field));
        // SAFETY: every value is the state this core runs with now (control registers,
        // EFER, PAT read just above), a static table only `load_for_cpu` hands out (never
        // moved or freed), a selector of those tables, or the exit trampoline; reloading
        // them at a VM exit resumes the hypervisor where it was.
        unsafe { raw_vmwrite(field, value) }.map_err(|e| (field, e))?;
    }
    Ok(())
}

#[inline]
unsafe fn raw_vmwrite(field: VmcsField, value: u64) -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller vouches for the field's effect; VMWRITE itself only changes the VMCS.
    unsafe {
        core::arch::asm!("vmwrite {f}, {v}", "pushfq", "pop {r}", f = in(reg) field as u64, v = in(reg) value, r = out(reg) rflags);
    }
    check(rflags)
}

/// Guest general-purpose registers the VMCS does not hold (RSP and RIP are in it).
/// Field order is the layout the entry/exit trampoline below uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl GuestRegisters {
    /// A register by its number in instruction encodings (0 = RAX .. 15 = R15); RSP (4)
    /// lives in the VMCS and is `None` here.
    pub fn by_number(&mut self, number: u8) -> Option<&mut u64> {
        Some(match number {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }
}

extern "C" {
    /// Enters the guest of the current VMCS with `registers` (VMLAUNCH if `resume` is 0,
    /// else VMRESUME) and returns at its next VM exit with the guest's registers saved
    /// back. Returns 0 after an exit, 1 for VMfailInvalid, 2 for VMfailValid.
    fn tandem_vm_enter(registers: *mut GuestRegisters, resume: u64) -> u64;
    /// Where a VM exit lands (HOST_RIP).
    static tandem_vm_exit: u8;
}

/// HOST_RIP for every VMCS.
pub fn exit_trampoline_address() -> u64 {
    &raw const tandem_vm_exit as u64
}

/// Runs the guest until its next VM exit.
#[inline]
pub fn enter_guest(
    registers: &mut GuestRegisters,
    launched: bool,
) -> Result<(), VmxInstructionError> {
    // SAFETY: the current VMCS has complete host state (HOST_RIP = tandem_vm_exit, which
    // returns here; HOST_RSP is set by the trampoline to this very stack frame), so the
    // exit resumes this function with callee-saved registers restored; `registers` is a
    // live exclusive borrow for the whole call.
    match unsafe { tandem_vm_enter(registers, u64::from(launched)) } {
        0 => Ok(()),
        1 => Err(VmxInstructionError::FailInvalid),
        _ => Err(VmxInstructionError::FailValid(
            vmread(VmcsField::VmInstructionError) as u32,
        )),
    }
}

// The entry/exit trampoline. On entry: RDI = &mut GuestRegisters, RSI = resume flag.
// It saves the callee-saved registers and the GuestRegisters pointer on the host stack,
// records that stack in HOST_RSP, loads the guest registers and launches/resumes.
// A VM exit lands at tandem_vm_exit with RSP = that HOST_RSP (SDM Vol. 3C §28.5.1).
core::arch::global_asm!(
    r#"
    .section .text.vm_enter, "ax"
    .global tandem_vm_enter
tandem_vm_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, 0x6c14
    vmwrite rax, rsp
    cmp rsi, 0
    mov rax, [rdi + 0x00]
    mov rbx, [rdi + 0x08]
    mov rcx, [rdi + 0x10]
    mov rdx, [rdi + 0x18]
    mov rsi, [rdi + 0x20]
    mov rbp, [rdi + 0x30]
    mov r8,  [rdi + 0x38]
    mov r9,  [rdi + 0x40]
    mov r10, [rdi + 0x48]
    mov r11, [rdi + 0x50]
    mov r12, [rdi + 0x58]
    mov r13, [rdi + 0x60]
    mov r14, [rdi + 0x68]
    mov r15, [rdi + 0x70]
    mov rdi, [rdi + 0x28]
    jne 2f
    vmlaunch
    jmp 3f
2:
    vmresume
3:
    /* Entry failed: CF = VMfailInvalid, ZF = VMfailValid. MOVs kept the flags. */
    mov eax, 1
    jc 4f
    mov eax, 2
4:
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret

    .global tandem_vm_exit
tandem_vm_exit:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0x00], rax
    mov [rdi + 0x08], rbx
    mov [rdi + 0x10], rcx
    mov [rdi + 0x18], rdx
    mov [rdi + 0x20], rsi
    mov [rdi + 0x30], rbp
    mov [rdi + 0x38], r8
    mov [rdi + 0x40], r9
    mov [rdi + 0x48], r10
    mov [rdi + 0x50], r11
    mov [rdi + 0x58], r12
    mov [rdi + 0x60], r13
    mov [rdi + 0x68], r14
    mov [rdi + 0x70], r15
    pop rax
    mov [rdi + 0x28], rax
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    xor eax, eax
    ret
    .text
"#
);
