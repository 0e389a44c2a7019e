//! One handler per VM-exit reason. Each exit is handled on purpose; anything else stops
//! the guest with a diagnostic (`Vcpu::stop`).

use vmcall_proto::version::ABI_VERSION;

use super::{hypercalls, mailbox, setup, sync_long_mode, wake_core, End, Next, Vcpu};
use crate::arch::cpu;
use crate::arch::lapic::{self, LocalApic};
use crate::arch::percpu::CPUS;
use crate::guest::ownership;
use crate::platform::MAX_CPUS;
use crate::vmx::exit::{CrAccess, EptViolation, ExitReason, IoAccess};
use crate::vmx::vmcs::VmcsField as F;
use vmcall_proto::hypercall::CoreState;

pub fn handle(vcpu: &mut Vcpu, reason: ExitReason) -> Next {
    match reason {
        ExitReason::Cpuid => cpuid(vcpu),
        ExitReason::Hlt => hlt(vcpu),
        ExitReason::Vmcall => hypercalls::dispatch(vcpu),
        ExitReason::CrAccess => cr_access(vcpu),
        ExitReason::IoInstruction => {
            let io = IoAccess::decode(vcpu.read(F::ExitQualification));
            vcpu.violation(
                if io.is_in { "io_read" } else { "io_write" },
                io.port.into(),
            )
        }
        ExitReason::Rdmsr => rdmsr(vcpu),
        ExitReason::Wrmsr => wrmsr(vcpu),
        ExitReason::EptViolation => {
            let access = EptViolation::decode(vcpu.read(F::ExitQualification));
            let gpa = vcpu.read(F::GuestPhysicalAddress);
            let kind = match access.kind() {
                "fetch" => "memory_fetch",
                "write" => "memory_write",
                _ => "memory_read",
            };
            vcpu.violation(kind, gpa)
        }
        ExitReason::ExceptionOrNmi => {
            // Interruption type 2 is an NMI (SDM Vol. 3C §25.9.2): a hypervisor signal
            // to this core. Guest exceptions do not exit (empty exception bitmap).
            let info = vcpu.read(F::ExitInterruptionInfo);
            if (info >> 8) & 7 == 2 {
                if mailbox::take_force_release(vcpu.core) {
                    log::warn!(
                        "guest '{}' missed its release deadline: cpu{} taken back",
                        vcpu.guest.name(),
                        vcpu.core
                    );
                    return Next::Park(End::ForcedOff);
                }
                Next::Resume
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
        ExitReason::ExternalInterrupt
        | ExitReason::InvalidGuestState
        | ExitReason::Xsetbv
        | ExitReason::Other(_) => vcpu.stop(
            "unexpected_exit",
            format_args!("unexpected VM exit '{}'", reason.name()),
        ),
    }
}

/// CPUID leaves of the hypervisor range (Intel SDM Vol. 2A notes 0x40000000-0x4fffffff
/// are reserved for software): 0x40000000 names the hypervisor, 0x40000001 gives the
/// paravirtual ABI version and the guest's id.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const SIGNATURE: &[u8; 12] = b"TandemHV\0\0\0\0";

fn cpuid(vcpu: &mut Vcpu) -> Next {
    let (leaf, subleaf) = (vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
    let word =
        |i: usize| u32::from_le_bytes(SIGNATURE[i * 4..i * 4 + 4].try_into().unwrap_or_default());
    let [eax, ebx, ecx, edx] = match leaf {
        HYPERVISOR_LEAF => [HYPERVISOR_LEAF + 1, word(0), word(1), word(2)],
        0x4000_0001 => [ABI_VERSION.to_u32(), u32::from(vcpu.guest.id), 0, 0],
        0x4000_0002..=0x4fff_ffff => [0; 4],
        1 => {
            let [a, b, c, d] = cpu::cpuid(1, 0);
            // Hide VMX (no nested virtualization); set "running under a hypervisor"
            // (CPUID.1:ECX[31], reserved for this use).
            [a, b, (c & !(1 << 5)) | (1 << 31), d]
        }
        _ => cpu::cpuid(leaf, subleaf),
    };
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
        log::info!(
            "guest '{}' cpu{}: halted with interrupts disabled",
            vcpu.guest.name(),
            vcpu.core
        );
        vcpu.guest.set_state(crate::guest::GuestState::Halted);
        return Next::Park(End::Halted);
    }
    if let Next::Park(end) = vcpu.advance_rip() {
        return Next::Park(end);
    }
    // HLT has executed, so an STI or MOV-SS shadow before it is over; entering in the HLT
    // state with such blocking is invalid guest state (SDM Vol. 3C §27.3.1.5).
    const BLOCKING_BY_STI_OR_MOV_SS: u64 = 0b11;
    let interruptibility = vcpu.read(F::GuestInterruptibility) & !BLOCKING_BY_STI_OR_MOV_SS;
    match vcpu
        .write(F::GuestInterruptibility, interruptibility)
        .and_then(|()| vcpu.write(F::GuestActivityState, ACTIVITY_HLT))
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
            let cr0 = vcpu.read(F::Cr0ReadShadow) & !(1 << 3);
            write_cr0(vcpu, cr0)
        }
        CrAccess::Lmsw { source_data } => {
            // LMSW sets PE, MP, EM, TS; it cannot clear PE (SDM Vol. 2A, LMSW).
            let shadow = vcpu.read(F::Cr0ReadShadow);
            let cr0 = (shadow & !0xe) | u64::from(source_data & 0xf) | (shadow & 1);
            write_cr0(vcpu, cr0)
        }
    };
    match result {
        Ok(()) => vcpu.advance_rip(),
        Err(next) => next,
    }
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
const IA32_EFER: u32 = 0xc000_0080;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_ID: u32 = 0x802;
/// EFER bits a guest may set: SCE, LME, LMA, NXE (SDM Vol. 3A §2.2.1).
const EFER_ALLOWED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);

fn rdmsr(vcpu: &mut Vcpu) -> Next {
    let value = match vcpu.regs.rcx as u32 {
        IA32_APIC_BASE => lapic::apic_base(),
        // A guest's x2APIC IDs are core indices; the hypervisor maps them to physical
        // APIC IDs in `send_ipi` (ARCHITECTURE.md, "Interrupts and the APIC").
        X2APIC_ID => vcpu.core as u64,
        IA32_EFER => vcpu.read(F::GuestIa32Efer),
        IA32_PAT => vcpu.read(F::GuestIa32Pat),
        // Any other MSR does not exist for a guest, as on hardware without it.
        _ => return vcpu.inject_general_protection(),
    };
    vcpu.regs.rax = value & 0xffff_ffff;
    vcpu.regs.rdx = value >> 32;
    vcpu.advance_rip()
}

fn wrmsr(vcpu: &mut Vcpu) -> Next {
    let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
    let result = match vcpu.regs.rcx as u32 {
        IA32_EFER if value & !EFER_ALLOWED == 0 => {
            let cr0 = vcpu.read(F::Cr0ReadShadow);
            vcpu.write(F::GuestIa32Efer, value)
                .and_then(|()| sync_long_mode(vcpu, cr0))
        }
        IA32_PAT => vcpu.write(F::GuestIa32Pat, value),
        // The APIC stays enabled in x2APIC mode: rewriting the same value is harmless.
        IA32_APIC_BASE if value == lapic::apic_base() => Ok(()),
        X2APIC_ICR => return send_ipi(vcpu, value),
        _ => return vcpu.inject_general_protection(),
    };
    match result {
        Ok(()) => vcpu.advance_rip(),
        Err(next) => next,
    }
}

/// A guest's write to the x2APIC ICR (SDM Vol. 3A §11.12.9). The destination is a core
/// index; only cores of the sender's partition are reachable. INIT and STARTUP IPIs are
/// emulated (the target is a core parked in the hypervisor, started in real mode at the
/// SIPI vector without the 10 ms INIT delay); other IPIs go to the physical APIC ID.
fn send_ipi(vcpu: &mut Vcpu, icr: u64) -> Next {
    const SHORTHAND_MASK: u64 = 3 << 18;
    const SHORTHAND_SELF: u64 = 1 << 18;
    const LOGICAL_DESTINATION: u64 = 1 << 11;
    const DELIVERY_MODE_MASK: u64 = 7 << 8;
    const DELIVERY_INIT: u64 = 5 << 8;
    const DELIVERY_STARTUP: u64 = 6 << 8;
    let destination = (icr >> 32) as u32;
    let target = destination as usize;
    let guest = vcpu.guest.id;
    match icr & SHORTHAND_MASK {
        SHORTHAND_SELF => LocalApic::X2Apic.forward_x2apic_icr(icr),
        0 if icr & LOGICAL_DESTINATION == 0
            && target < MAX_CPUS
            && ownership::owner(target) == Some(guest) =>
        {
            match icr & DELIVERY_MODE_MASK {
                DELIVERY_INIT => {
                    if ownership::state(target) == CoreState::Granted {
                        ownership::note_init(target);
                    } else {
                        log::warn!(
                            "guest '{}': INIT to running cpu{target} ignored",
                            vcpu.guest.name()
                        );
                    }
                }
                DELIVERY_STARTUP => {
                    // A second STARTUP IPI (as the SDM sequence sends) finds no pending
                    // INIT and is ignored, like a real AP already running.
                    if ownership::state(target) == CoreState::Granted
                        && ownership::take_init(target)
                    {
                        mailbox::post_start(
                            target,
                            guest,
                            mailbox::Start::RealMode { vector: icr as u8 },
                        );
                        wake_core(target);
                    }
                }
                _ => {
                    let physical = u64::from(CPUS[target].apic_id());
                    LocalApic::X2Apic.forward_x2apic_icr((physical << 32) | (icr & 0xffff_ffff));
                }
            }
        }
        // Broadcasts, logical destinations and cores of others could reach other partitions.
        _ => {
            log::warn!(
                "guest '{}' cpu{}: IPI {icr:#x} to core {destination} dropped",
                vcpu.guest.name(),
                vcpu.core
            );
            crate::console::marker("isolation_violation", |o| {
                o.str("guest", vcpu.guest.name())
                    .u64("cpu", vcpu.core as u64)
                    .str("kind", "ipi")
                    .hex("target", destination.into())
                    .hex("rip", vcpu.read(F::GuestRip))
                    .str("action", "dropped");
            });
        }
    }
    vcpu.advance_rip()
}
