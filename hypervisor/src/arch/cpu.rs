//! Control registers, the time-stamp counter and halting.

use x86_64::registers::control::{Cr0, Cr3, Cr4};

/// Stops this core for good: interrupts off, then HLT in a loop (only NMI/SMI/INIT
/// can wake a halted core with IF=0, and we go straight back to sleep).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

pub fn read_cr0() -> u64 {
    Cr0::read_raw()
}

pub fn read_cr4() -> u64 {
    Cr4::read_raw()
}

/// Physical address of the current top-level page table.
pub fn read_cr3() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// Writes CR0 and CR4 in one step of VMX preparation.
///
/// # Safety
/// The values must keep paging, protection and long mode exactly as they are (only
/// bits the VMX fixed-bit MSRs force, and CR4.VMXE, may change).
pub unsafe fn write_cr0_cr4(cr0: u64, cr4: u64) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }
}

pub fn read_tsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// 64 random bits from RDRAND, when the CPU has it (CPUID.01H:ECX[30]; SDM Vol. 1 §7.3.17:
/// it may fail transiently, so a few tries).
pub fn rdrand() -> Option<u64> {
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 30) == 0 {
        return None;
    }
    (0..10).find_map(|_| {
        let mut value = 0u64;
        // SAFETY: RDRAND is present (checked above); the instruction only writes `value`.
        (unsafe { rdrand64(&mut value) } == 1).then_some(value)
    })
}

/// Callable only where the CPU has RDRAND (the caller checks).
#[target_feature(enable = "rdrand")]
fn rdrand64(value: &mut u64) -> i32 {
    core::arch::x86_64::_rdrand64_step(value)
}

/// IA32_EFER and IA32_PAT, for the VMCS host-state area.
pub fn read_efer() -> u64 {
    // SAFETY: IA32_EFER (0xc0000080) exists on every x86-64 CPU.
    unsafe { super::msr::read(0xc000_0080) }
}

pub fn read_pat() -> u64 {
    // SAFETY: IA32_PAT (0x277) exists on every x86-64 CPU (CPUID.1:EDX.PAT is architectural
    // in 64-bit processors).
    unsafe { super::msr::read(0x277) }
}

/// CPUID with a subleaf, for emulating it to guests.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = raw_cpuid::native_cpuid::cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

const CR4_OSXSAVE: u64 = 1 << 18;

/// Turns CR4.OSXSAVE on when the CPU has XSAVE, so the hypervisor can execute XSETBV for
/// a guest (XSETBV raises #UD with CR4.OSXSAVE = 0, SDM Vol. 2D). The hypervisor itself
/// uses no extended state.
pub fn enable_xsave() {
    let has_xsave = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_xsave());
    if has_xsave {
        // SAFETY: setting OSXSAVE only allows XGETBV/XSETBV/XSAVE; paging, protection and
        // long mode are untouched.
        unsafe { x86_64::registers::control::Cr4::write_raw(read_cr4() | CR4_OSXSAVE) };
    }
}

/// XSAVE is on for this core: CR4.OSXSAVE is set ([`enable_xsave`] sets it where CPUID
/// offers XSAVE). Without it XGETBV and XSETBV raise #UD (SDM Vol. 2D). KVM, for one, may
/// give its guest no XSAVE at all (see docs/nested-kvm.md).
pub fn xsave_enabled() -> bool {
    read_cr4() & CR4_OSXSAVE != 0
}

/// The XCR0 bits this CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX), 0 where XSAVE is not on
/// ([`xsave_enabled`]): the hypervisor touches XCR0 only where it returned nonzero.
pub fn supported_xcr0() -> u64 {
    if !xsave_enabled() {
        return 0;
    }
    let [eax, _, _, edx] = cpuid(0xd, 0);
    (u64::from(edx) << 32) | u64::from(eax)
}

/// Loads XCR0 with a value the caller validated against [`supported_xcr0`].
pub fn write_xcr0(value: u64) {
    // SAFETY: XSETBV with ECX = 0 loads XCR0; the caller checked the value is one the CPU
    // accepts (no #GP) and OSXSAVE is on (enable_xsave ran on every core). XCR0 only
    // selects which extended state XSAVE/XRSTOR manage; the hypervisor uses none.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack));
    }
}

/// The current XCR0 (XGETBV with ECX = 0). Only where [`supported_xcr0`] is nonzero.
pub fn read_xcr0() -> u64 {
    let (eax, edx): (u32, u32);
    // SAFETY: XGETBV only reads XCR0; callers ask only where `supported_xcr0` is nonzero,
    // that is with CR4.OSXSAVE set, so it does not raise #UD.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") edx, options(nomem, nostack))
    };
    (u64::from(edx) << 32) | u64::from(eax)
}

/// The extended state every core goes back to: an XSAVE area (legacy region, header) whose
/// header selects no component (XSTATE_BV = 0), so that XRSTOR puts each requested one in
/// its initial state (SDM Vol. 1 §13.8.1), and MXCSR at its power-up value 0x1F80 (§10.2.3),
/// which XRSTOR and FXRSTOR load from the legacy region.
#[repr(C, align(64))]
struct InitImage([u8; 576]);

static EXTENDED_STATE_INIT: InitImage = {
    let mut image = [0u8; 576];
    // MXCSR is bytes 24..28 of the legacy region (SDM Vol. 1 Table 10-2).
    image[24] = 0x80;
    image[25] = 0x1f;
    InitImage(image)
};

/// XCR0 after reset: x87 only (SDM Vol. 1 §13.3).
const XCR0_RESET: u64 = 1;
/// The components a guest may enable (x87, SSE, AVX), which this clears.
const XCR0_GUEST_COMPONENTS: u64 = 0b111;

/// Puts the x87, SSE and AVX registers in their initial state (zeroes XMM/YMM) and XCR0
/// back to its reset value, so that no register a guest wrote reaches the next one.
pub fn clear_extended_state() {
    // Asked once: every core of the machine has the same CPUID.
    static SUPPORTED: spin::Once<u64> = spin::Once::new();
    let supported = *SUPPORTED.call_once(|| supported_xcr0() & XCR0_GUEST_COMPONENTS);
    let image = EXTENDED_STATE_INIT.0.as_ptr();
    if supported != 0 {
        write_xcr0(supported);
        // SAFETY: XRSTOR reads the 64-byte aligned 576-byte image (legacy region + header,
        // valid: XCOMP_BV and reserved header bytes zero) and loads only register state of
        // the components in EDX:EAX, all enabled in XCR0 just above; the hypervisor keeps
        // nothing in those registers (it is built without SSE).
        unsafe {
            core::arch::asm!("xrstor64 [{}]", in(reg) image, in("eax") supported as u32, in("edx") 0u32, options(readonly, nostack));
        }
        write_xcr0(XCR0_RESET);
    } else {
        // SAFETY: FXRSTOR reads the 16-byte aligned 512-byte legacy region of the image
        // (MXCSR valid, the rest zero) into x87/SSE registers the hypervisor does not use.
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) image, options(readonly, nostack)) };
    }
}

/// Zeroes CR2 and the debug address registers DR0-DR3, and puts DR6 and DR7 at their
/// reset values (SDM Vol. 3B §18.2): none of them is switched by the VMCS except DR7.
pub fn clear_debug_registers_and_cr2() {
    // SAFETY: CR2 only holds the last page-fault address; the debug registers only arm
    // breakpoints, and DR7 = 0x400 disables them all. The hypervisor uses neither.
    unsafe {
        core::arch::asm!(
            "mov cr2, {zero}",
            "mov dr0, {zero}",
            "mov dr1, {zero}",
            "mov dr2, {zero}",
            "mov dr3, {zero}",
            "mov dr6, {dr6}",
            "mov dr7, {dr7}",
            zero = in(reg) 0u64,
            dr6 = in(reg) 0xffff_0ff0u64,
            dr7 = in(reg) 0x400u64,
            options(nomem, nostack),
        );
    }
}

/// Ends any blocking of NMIs on this core, which takes an NMI that was held back meanwhile
/// (the hypervisor's handler drops it). A VM exit caused by an NMI leaves NMIs blocked
/// until the next IRET, and a VM entry then lifts the blocking (Intel SDM Vol. 3C, "NMI
/// Exiting" and "Blocking by NMI" in the guest's interruptibility state): without an IRET
/// here, an NMI that came after such an exit would be delivered right after the core's
/// next entry, into whichever guest that is.
pub fn unblock_nmis() {
    // SAFETY: an IRETQ to the next instruction, at CPL 0, with this core's own SS, RSP
    // (as it was before the pushes), RFLAGS and CS: it changes nothing but the NMI blocking
    // (SDM Vol. 2A, IRET: "unblocks NMIs"). It uses five words of the current stack, which
    // it pops.
    unsafe {
        core::arch::asm!(
            "mov {scratch}, rsp",
            "mov {selector:e}, ss",
            "push {selector}",
            "push {scratch}",
            "pushfq",
            "mov {selector:e}, cs",
            "push {selector}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "iretq",
            "2:",
            scratch = out(reg) _,
            selector = out(reg) _,
        );
    }
}
