//! One handler per VM-exit reason. Each exit is handled on purpose; anything else stops
//! the guest with a diagnostic (`Vcpu::stop`).

use vmcall_proto::hypercall::ForcedState;

use super::{doorbell, hypercalls, ioapic_access, mailbox, setup, sync_long_mode, End, Next, Vcpu};
use crate::arch::lapic::{self, LocalApic};
use crate::arch::percpu::CPUS;
use crate::arch::{cpu, msr};
use crate::cores::CORES;
use crate::faults;
use crate::guest::GuestState;
use crate::guest_cpuid;
use crate::ipi::{self, IpiDecision};
use crate::linux::acpi_tables::RESET_REGISTER;
use crate::pci::VirtualBus;
use crate::platform::MAX_CPUS;
use crate::time;
use crate::vmx::exit::{CrAccess, EptViolation, ExitReason, IoAccess};
use crate::vmx::vmcs::VmcsField as F;

pub fn handle(vcpu: &mut Vcpu, reason: ExitReason) -> Next {
    match reason {
        ExitReason::Cpuid => cpuid(vcpu),
        ExitReason::Hlt => hlt(vcpu),
        ExitReason::Vmcall => hypercalls::dispatch(vcpu),
        ExitReason::CrAccess => cr_access(vcpu),
        ExitReason::IoInstruction => io_instruction(vcpu),
        ExitReason::Rdmsr => rdmsr(vcpu),
        ExitReason::Wrmsr => wrmsr(vcpu),
        ExitReason::EptViolation => {
            let access = EptViolation::decode(vcpu.read(F::ExitQualification));
            let gpa = vcpu.read(F::GuestPhysicalAddress);
            if let Some(next) = ioapic_access::emulate(vcpu, gpa) {
                return next;
            }
            let kind = match access.kind() {
                "fetch" => "memory_fetch",
                "write" => "memory_write",
                _ => "memory_read",
            };
            vcpu.violation(kind, gpa)
        }
        ExitReason::ExceptionOrNmi => {
            // Interruption type 2 is an NMI (SDM Vol. 3C §25.9.2): the hypervisor's signal
            // to take the core back (a forced release, or the guest was stopped on another
            // core), or one the guest sent to its own core, which goes back to it. Guest
            // exceptions do not exit (empty exception bitmap).
            let info = vcpu.read(F::ExitInterruptionInfo);
            if (info >> 8) & 7 == 2 {
                if CORES.force_requested(vcpu.core) {
                    log::warn!(
                        "guest '{}' missed its release deadline: cpu{} taken back",
                        vcpu.guest.name(),
                        vcpu.core
                    );
                    keep_forced_state(vcpu);
                    return Next::Park(End::ForcedOff);
                }
                if vcpu.guest.state() != GuestState::Running {
                    return Next::Park(End::Stopped);
                }
                vcpu.inject_nmi()
            } else {
                vcpu.stop(
                    "unexpected_exception",
                    format_args!("exception exit, interruption info {info:#x}"),
                )
            }
        }
        ExitReason::PreemptionTimer => Next::Resume,
        ExitReason::TripleFault => {
            vcpu.stop("triple_fault", format_args!("the guest triple-faulted"))
        }
        ExitReason::EptMisconfiguration => vcpu.stop(
            "ept_misconfiguration",
            format_args!("EPT misconfiguration (hypervisor bug)"),
        ),
        ExitReason::Init | ExitReason::Sipi => vcpu.stop(
            "unexpected_init",
            format_args!("INIT/SIPI to a running guest core is not handled yet"),
        ),
        ExitReason::Xsetbv => xsetbv(vcpu),
        ExitReason::ExternalInterrupt => woken(vcpu),
        ExitReason::InvalidGuestState | ExitReason::Other(_) => vcpu.stop(
            "unexpected_exit",
            format_args!("unexpected VM exit '{}'", reason.name()),
        ),
    }
}

/// The vCPU leaves its core by force: the registers the guest would resume with are kept
/// for it (`faults::keep_forced_state`), so it can run the interrupted code on in another
/// core. The general-purpose registers are the hypervisor's copy; RIP, RSP, RFLAGS and the
/// selectors are the VMCS's guest-state area (SDM Vol. 3C §25.4.1).
pub(super) fn keep_forced_state(vcpu: &Vcpu) {
    let r = &vcpu.regs;
    let state = ForcedState {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: vcpu.read(F::GuestRsp),
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: vcpu.read(F::GuestRip),
        rflags: vcpu.read(F::GuestRflags),
        cs: vcpu.read(F::GuestCsSelector),
        ss: vcpu.read(F::GuestSsSelector),
    };
    faults::keep_forced_state(vcpu.guest.id, vcpu.core, state);
}

/// XSETBV: the guest selects its extended state in XCR0, which belongs to the core it
/// runs on. Values the CPU would refuse get the #GP it would raise (SDM Vol. 2D, XSETBV).
fn xsetbv(vcpu: &mut Vcpu) -> Next {
    let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
    if vcpu.regs.rcx as u32 != 0
        || !guest_cpuid::valid_xcr0(value, cpu::supported_xcr0() & guest_cpuid::GUEST_XCR0)
    {
        return vcpu.inject_general_protection();
    }
    cpu::write_xcr0(value);
    vcpu.advance_rip()
}

/// A port the guest does not own (owned ones pass through the I/O bitmap, so OUT and IN
/// to any other exit: SDM Vol. 3C §26.1.3) behaves like one with no device behind it:
/// reads return all ones, writes are dropped. Stock kernels probe ports for hardware this
/// way (Linux probes COM2..COM4, whose COM2 is the hypervisor's console), so this is
/// refusal without harm. String I/O to such a port is not emulated: it is a violation.
/// The one port with a device behind it is the reset register Linux's FADT offers
/// ([`RESET_REGISTER`]): a guest that resets the machine through it is stopped, since the
/// machine is not its own and Tandem restarts no guest (Linux does so when it panics,
/// `panic=-1 reboot=acpi` on its command line).
fn io_instruction(vcpu: &mut Vcpu) -> Next {
    let io = IoAccess::decode(vcpu.read(F::ExitQualification));
    if !io.is_in && !io.string && RESET_REGISTER.resets(io.port, io.size, vcpu.regs.rax) {
        return vcpu.stop(
            "reset",
            format_args!(
                "the guest reset the machine (port {:#x} <- {:#x})",
                io.port, vcpu.regs.rax as u8
            ),
        );
    }
    if !io.string && VirtualBus::claims(io.port) && doorbell::has_bus(vcpu.guest) {
        return virtual_bus(vcpu, io);
    }
    let direction = if io.is_in { "read" } else { "write" };
    log::debug!(
        "guest '{}': {direction} of unowned port {:#x} refused",
        vcpu.guest.name(),
        io.port
    );
    if io.string {
        return vcpu.violation(
            if io.is_in {
                "io_string_read"
            } else {
                "io_string_write"
            },
            io.port.into(),
        );
    }
    if io.is_in {
        // IN writes AL, AX or EAX; a 32-bit result zero-extends into RAX (SDM Vol. 1 §3.4.1.1).
        vcpu.regs.rax = match io.size {
            1 => (vcpu.regs.rax & !0xff) | 0xff,
            2 => (vcpu.regs.rax & !0xffff) | 0xffff,
            _ => 0xffff_ffff,
        };
    }
    vcpu.advance_rip()
}

/// Configuration mechanism #1 of the guest's virtual PCI bus (`crate::pci`).
fn virtual_bus(vcpu: &mut Vcpu, io: IoAccess) -> Next {
    if io.is_in {
        let value = u64::from(doorbell::BUS.read(io.port, io.size));
        // IN writes AL, AX or EAX; a 32-bit result zero-extends into RAX (SDM Vol. 1 §3.4.1.1).
        vcpu.regs.rax = match io.size {
            1 => (vcpu.regs.rax & !0xff) | value,
            2 => (vcpu.regs.rax & !0xffff) | value,
            _ => value,
        };
    } else {
        doorbell::deliver(doorbell::BUS.write(io.port, io.size, vcpu.regs.rax as u32));
    }
    vcpu.advance_rip()
}

fn cpuid(vcpu: &mut Vcpu) -> Next {
    let (leaf, subleaf) = (vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
    // Without XSAVE on this core there is no XCR0 to read (XGETBV would raise #UD).
    let supported_xcr0 = cpu::supported_xcr0();
    let context = guest_cpuid::Context {
        guest_id: vcpu.guest.id,
        guest_osxsave: vcpu.read(F::Cr4ReadShadow) & CR4_OSXSAVE != 0,
        supported_xcr0,
        current_xcr0: if supported_xcr0 != 0 {
            cpu::read_xcr0()
        } else {
            0
        },
        tsc_hz: time::tsc_hz(),
    };
    let [eax, ebx, ecx, edx] = guest_cpuid::leaf(leaf, subleaf, &context, cpu::cpuid);
    vcpu.regs.rax = eax.into();
    vcpu.regs.rbx = ebx.into();
    vcpu.regs.rcx = ecx.into();
    vcpu.regs.rdx = edx.into();
    vcpu.advance_rip()
}

/// HLT with interrupts enabled: let the guest sleep in the HLT activity state (its
/// interrupts reach it directly and wake it). With interrupts disabled nothing can wake
/// it: the guest has halted for good, which the monitor reports.
fn hlt(vcpu: &mut Vcpu) -> Next {
    const RFLAGS_IF: u64 = 1 << 9;
    const ACTIVITY_HLT: u64 = 1;
    if vcpu.read(F::GuestRflags) & RFLAGS_IF == 0 {
        // The vCPU is done until an INIT. On the last running core of its guest the guest
        // has halted; otherwise it is a core taken offline (Linux's play_dead), which the
        // guest may restart with INIT/SIPI: the core stays the guest's.
        let others_running = CORES.running_cores(vcpu.guest.id) & !(1 << vcpu.core) != 0;
        let name = vcpu.guest.name();
        if others_running {
            log::info!(
                "guest '{name}' cpu{}: core offline (halted with interrupts disabled)",
                vcpu.core
            );
            return Next::Park(End::Offline);
        }
        log::info!(
            "guest '{name}' cpu{}: halted with interrupts disabled",
            vcpu.core
        );
        vcpu.guest.set_state(GuestState::Halted);
        super::kick_out(vcpu.guest, vcpu.core);
        return Next::Park(End::Halted);
    }
    if let Next::Park(end) = vcpu.advance_rip() {
        return Next::Park(end);
    }
    // HLT has executed, so an STI or MOV-SS shadow before it is over; entering in the HLT
    // state with such blocking is invalid guest state (SDM Vol. 3C §27.3.1.5).
    const BLOCKING_BY_STI_OR_MOV_SS: u64 = 0b11;
    let interruptibility = vcpu.read(F::GuestInterruptibility) & !BLOCKING_BY_STI_OR_MOV_SS;
    if let Err(next) = vcpu.write(F::GuestInterruptibility, interruptibility) {
        return next;
    }
    // An interrupt that came while the core handled this exit is already requested in the
    // APIC: the guest takes it at the entry, as its HLT would have ended for it. Entered in
    // the HLT state instead, the vCPU should exit at once for it (external-interrupt exiting,
    // SDM Vol. 3C §26.2; HLT does not block external interrupts, "Activity State" in
    // "Special Features of VM Entry"): a round trip saved on hardware. Under Bochs such a
    // vCPU stayed halted until a later interrupt, often Linux's next timer tick
    // (docs/hypervisor.md, "Exits").
    if LocalApic::X2Apic.has_deliverable_request() {
        return Next::Resume;
    }
    match vcpu
        .write(F::GuestActivityState, ACTIVITY_HLT)
        .and_then(|()| exit_on_interrupt(vcpu, true))
    {
        Ok(()) => {
            crate::core_idle::IDLE[vcpu.core].halted(cpu::read_tsc());
            Next::Resume
        }
        Err(next) => next,
    }
}

/// Whether an external interrupt makes the vCPU exit. Only while it halts: the exit is its
/// wake-up, the end of its idle time (`core_idle`), which would otherwise go unseen (the
/// guest's interrupts reach it without an exit). The interrupt is not acknowledged on the
/// exit ("acknowledge interrupt on exit" is 0), so it stays pending in the local APIC and
/// the guest takes it as soon as it is entered (SDM Vol. 3C §26.2; the controls: §25.6.1,
/// §25.7.1).
fn exit_on_interrupt(vcpu: &mut Vcpu, on: bool) -> Result<(), Next> {
    let pin = vcpu.read(F::PinBasedControls);
    let bit = u64::from(crate::vmx::vmcs::pin::EXTERNAL_INTERRUPT_EXITING);
    let wanted = if on { pin | bit } else { pin & !bit };
    if wanted == pin {
        return Ok(());
    }
    vcpu.write(F::PinBasedControls, wanted)
}

/// An interrupt for the guest woke its halted vCPU (see [`exit_on_interrupt`]): it runs on
/// from after its HLT, where the interrupt, still pending, is delivered to it on entry.
fn woken(vcpu: &mut Vcpu) -> Next {
    const ACTIVITY_ACTIVE: u64 = 0;
    match exit_on_interrupt(vcpu, false)
        .and_then(|()| vcpu.write(F::GuestActivityState, ACTIVITY_ACTIVE))
    {
        Ok(()) => Next::Resume,
        Err(next) => next,
    }
}

fn cr_access(vcpu: &mut Vcpu) -> Next {
    let access = CrAccess::decode(vcpu.read(F::ExitQualification));
    let result = match access {
        CrAccess::MovTo { cr, gpr } => {
            let value = read_gpr(vcpu, gpr);
            match cr {
                0 => write_cr0(vcpu, value),
                3 => vcpu.write(F::GuestCr3, value),
                4 => vcpu
                    .write(F::GuestCr4, setup::effective_cr4(value, &vcpu.fixed))
                    .and_then(|()| vcpu.write(F::Cr4ReadShadow, value)),
                _ => return vcpu.stop("unexpected_cr", format_args!("MOV to CR{cr}")),
            }
        }
        CrAccess::MovFrom { cr: 3, gpr } => {
            let value = vcpu.read(F::GuestCr3);
            write_gpr(vcpu, gpr, value)
        }
        CrAccess::MovFrom { cr, .. } => {
            return vcpu.stop("unexpected_cr", format_args!("MOV from CR{cr}"))
        }
        CrAccess::Clts => {
            let cr0 = guest_cr0(vcpu) & !(1 << 3);
            write_cr0(vcpu, cr0)
        }
        CrAccess::Lmsw { source_data } => {
            // LMSW sets PE, MP, EM, TS; it cannot clear PE (SDM Vol. 2A, LMSW).
            let shadow = guest_cr0(vcpu);
            let cr0 = (shadow & !0xe) | u64::from(source_data & 0xf) | (shadow & 1);
            write_cr0(vcpu, cr0)
        }
    };
    match result {
        Ok(()) => vcpu.advance_rip(),
        Err(next) => next,
    }
}

/// CR0 as the guest sees it: the bits the hypervisor owns (the guest/host mask) from the read
/// shadow, the rest, PE and PG included, from the real guest CR0, which the guest changes
/// without an exit (SDM Vol. 3C §25.6.6).
fn guest_cr0(vcpu: &Vcpu) -> u64 {
    let mask = vcpu.read(F::Cr0GuestHostMask);
    (vcpu.read(F::GuestCr0) & !mask) | (vcpu.read(F::Cr0ReadShadow) & mask)
}

fn write_cr0(vcpu: &mut Vcpu, value: u64) -> Result<(), Next> {
    vcpu.write(F::GuestCr0, setup::effective_cr0(value, &vcpu.fixed))?;
    vcpu.write(F::Cr0ReadShadow, value)?;
    sync_long_mode(vcpu, value)
}

fn read_gpr(vcpu: &mut Vcpu, number: u8) -> u64 {
    match vcpu.regs.by_number(number) {
        Some(register) => *register,
        None => vcpu.read(F::GuestRsp),
    }
}

fn write_gpr(vcpu: &mut Vcpu, number: u8, value: u64) -> Result<(), Next> {
    match vcpu.regs.by_number(number) {
        Some(register) => {
            *register = value;
            Ok(())
        }
        None => vcpu.write(F::GuestRsp, value),
    }
}

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_PAT: u32 = 0x277;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_ID: u32 = 0x802;
const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
const CR4_OSXSAVE: u64 = 1 << 18;
const IA32_PLATFORM_ID: u32 = 0x17;
const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_BIOS_SIGN_ID: u32 = 0x8b;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const MISC_ENABLE_XD_DISABLE: u64 = 1 << 34;

fn rdmsr(vcpu: &mut Vcpu) -> Next {
    let value = match vcpu.regs.rcx as u32 {
        IA32_APIC_BASE => lapic::apic_base(),
        // A guest's x2APIC IDs are core indices; the hypervisor maps them to physical
        // APIC IDs in `send_ipi` (docs/architecture.md, "Interrupts and the APIC").
        X2APIC_ID => vcpu.core as u64,
        IA32_PAT => vcpu.read(F::GuestIa32Pat),
        IA32_TIME_STAMP_COUNTER => cpu::read_tsc(),
        IA32_SYSENTER_CS => vcpu.read(F::GuestSysenterCs),
        IA32_SYSENTER_ESP => vcpu.read(F::GuestSysenterEsp),
        IA32_SYSENTER_EIP => vcpu.read(F::GuestSysenterEip),
        // Locked, VMX off: consistent with CPUID hiding VMX.
        IA32_FEATURE_CONTROL => 1,
        // No microcode update information (platform ID, update signature).
        IA32_PLATFORM_ID | IA32_BIOS_SIGN_ID => 0,
        // XD-disable cleared: NX is on, as CPUID says.
        IA32_MISC_ENABLE => {
            msr::read_informational(IA32_MISC_ENABLE).unwrap_or(0) & !MISC_ENABLE_XD_DISABLE
        }
        msr if msr::is_informational(msr) => msr::read_informational(msr).unwrap_or(0),
        // Any other MSR does not exist for a guest, as on hardware without it.
        msr => {
            log::debug!(
                "guest '{}': RDMSR {msr:#x} refused (#GP)",
                vcpu.guest.name()
            );
            return vcpu.inject_general_protection();
        }
    };
    vcpu.regs.rax = value & 0xffff_ffff;
    vcpu.regs.rdx = value >> 32;
    vcpu.advance_rip()
}

fn wrmsr(vcpu: &mut Vcpu) -> Next {
    let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
    let result = match vcpu.regs.rcx as u32 {
        IA32_PAT => vcpu.write(F::GuestIa32Pat, value),
        // Writes that would change the platform for everyone (MTRRs, MISC_ENABLE) or that
        // only prepare a microcode-revision read are accepted and dropped.
        IA32_BIOS_SIGN_ID => Ok(()),
        // The SYSENTER MSRs are guest state the VMCS loads and saves (SDM Vol. 3C §25.4.2).
        IA32_SYSENTER_CS => vcpu.write(F::GuestSysenterCs, value),
        IA32_SYSENTER_ESP => vcpu.write(F::GuestSysenterEsp, value),
        IA32_SYSENTER_EIP => vcpu.write(F::GuestSysenterEip, value),
        msr if msr::is_informational(msr) => {
            log::debug!(
                "guest '{}': WRMSR {msr:#x} <- {value:#x} ignored",
                vcpu.guest.name()
            );
            Ok(())
        }
        // The APIC stays enabled in x2APIC mode: rewriting the same value is harmless.
        IA32_APIC_BASE if value == lapic::apic_base() => Ok(()),
        X2APIC_ICR => return send_ipi(vcpu, value),
        msr => {
            log::debug!(
                "guest '{}': WRMSR {msr:#x} <- {value:#x} refused (#GP)",
                vcpu.guest.name()
            );
            return vcpu.inject_general_protection();
        }
    };
    match result {
        Ok(()) => vcpu.advance_rip(),
        Err(next) => next,
    }
}

/// A guest's write to the x2APIC ICR (SDM Vol. 3A §11.12.9), checked by [`ipi::decide`]:
/// INIT and STARTUP are emulated (the target is a core parked in the hypervisor, which
/// awaits a STARTUP IPI from its grant on, and is started in real mode at the SIPI vector
/// without the 10 ms INIT delay), other IPIs go to the physical APIC ID of the target core;
/// refusals are reported.
fn send_ipi(vcpu: &mut Vcpu, icr: u64) -> Next {
    let guest = vcpu.guest.id;
    let decision = ipi::decide(icr, guest, |core| {
        (core < MAX_CPUS).then(|| CORES.word(core))
    });
    match decision {
        IpiDecision::Send { core, icr_low } => {
            let destination = core.map_or(0, |c| u64::from(CPUS[c].apic_id()));
            let forward =
                || LocalApic::X2Apic.forward_x2apic_icr(destination << 32 | u64::from(icr_low));
            match core {
                // The target may have left the guest since the decision: checked again.
                Some(target) => {
                    super::send_to_vcpu(target, guest, forward);
                }
                // The self shorthand: this core, which runs the sender's vCPU.
                None => forward(),
            }
        }
        IpiDecision::Ignore => {}
        IpiDecision::Init { core } => {
            // The manager checks again, atomically: the grant may be gone since.
            let _ = CORES.init(core, guest);
        }
        IpiDecision::Startup { core, vector } => {
            // Taking the STARTUP re-checks the grant in the same step; a second STARTUP
            // finds the core awaiting none and is ignored, like a real AP already running
            // (SDM Vol. 3A §9.4.4.1).
            if let Ok(generation) = CORES.startup(core, guest, cpu::read_tsc()) {
                mailbox::post_start(core, guest, generation, mailbox::Start::RealMode { vector });
                mailbox::wake(core);
            }
        }
        IpiDecision::Refuse(why) => {
            vcpu.report_refusal(
                "ipi",
                Some(why.name()),
                icr >> 32,
                "dropped",
                format_args!("IPI {icr:#x} ({})", why.name()),
            );
        }
    }
    vcpu.advance_rip()
}
