//! One handler per VM-exit reason. Each exit is handled on purpose; anything else stops
//! the guest with a diagnostic (`Vcpu::stop`).

use vmcall_proto::version::ABI_VERSION;

use super::{hypercalls, mailbox, setup, sync_long_mode, wake_core, End, Next, Vcpu};
use crate::arch::lapic::{self, LocalApic};
use crate::arch::percpu::CPUS;
use crate::arch::{cpu, msr};
use crate::cores::CORES;
use crate::guest::GuestState;
use crate::ipi::{self, IpiDecision};
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
        ExitReason::ExternalInterrupt | ExitReason::InvalidGuestState | ExitReason::Other(_) => {
            vcpu.stop(
                "unexpected_exit",
                format_args!("unexpected VM exit '{}'", reason.name()),
            )
        }
    }
}

/// XSETBV: the guest selects its extended state in XCR0, which belongs to the core it
/// runs on. Values the CPU would refuse get the #GP it would raise (SDM Vol. 2D, XSETBV).
fn xsetbv(vcpu: &mut Vcpu) -> Next {
    let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xffff_ffff);
    if vcpu.regs.rcx as u32 != 0 || !valid_xcr0(value, cpu::supported_xcr0() & GUEST_XCR0) {
        return vcpu.inject_general_protection();
    }
    cpu::write_xcr0(value);
    vcpu.advance_rip()
}

/// XCR0 rules: x87 always on, only supported bits, AVX needs SSE, the three AVX-512
/// components together and only with AVX.
fn valid_xcr0(value: u64, supported: u64) -> bool {
    const X87: u64 = 1;
    const SSE: u64 = 1 << 1;
    const AVX: u64 = 1 << 2;
    const AVX512: u64 = 0b111 << 5;
    let avx512 = value & AVX512;
    value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (avx512 == 0 || (avx512 == AVX512 && value & AVX != 0))
}

/// A port the guest does not own (owned ones pass through the I/O bitmap) behaves like
/// one with no device behind it: reads return all ones, writes are dropped. Stock
/// kernels probe ports for hardware this way (Linux probes COM2..COM4, whose COM2 is
/// the hypervisor's console), so this is refusal without harm. String I/O to such a
/// port is not emulated: it is a violation.
fn io_instruction(vcpu: &mut Vcpu) -> Next {
    let io = IoAccess::decode(vcpu.read(F::ExitQualification));
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

/// CPUID leaves of the hypervisor range (Intel SDM Vol. 2A: 0x40000000-0x4fffffff are
/// reserved for software).
///
/// 0x40000000 carries the KVM signature with an empty KVM feature leaf (0x40000001 = 0):
/// a stock Linux without interrupt remapping keeps x2APIC mode only under a hypervisor it
/// knows can deliver x2APIC interrupts (`x86_init.hyper.x2apic_available`, true for KVM),
/// and switches to the xAPIC MMIO page otherwise; Tandem confines IPIs through the
/// x2APIC ICR. With no KVM features advertised, Linux uses no KVM paravirtual interface.
/// Tandem names itself in the next block, the way hypervisors offer several interfaces:
/// 0x40000100 = "TandemHV", 0x40000101 = paravirtual ABI version and the guest's id.
const COMPAT_LEAF: u32 = 0x4000_0000;
const COMPAT_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
const TANDEM_LEAF: u32 = 0x4000_0100;
const TANDEM_SIGNATURE: &[u8; 12] = b"TandemHV\0\0\0\0";

fn signature_words(signature: &[u8; 12]) -> [u32; 3] {
    core::array::from_fn(|i| {
        u32::from_le_bytes([
            signature[i * 4],
            signature[i * 4 + 1],
            signature[i * 4 + 2],
            signature[i * 4 + 3],
        ])
    })
}

fn cpuid(vcpu: &mut Vcpu) -> Next {
    let (leaf, subleaf) = (vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
    let [eax, ebx, ecx, edx] = match leaf {
        COMPAT_LEAF => {
            let [b, c, d] = signature_words(COMPAT_SIGNATURE);
            [COMPAT_LEAF + 1, b, c, d]
        }
        TANDEM_LEAF => {
            let [b, c, d] = signature_words(TANDEM_SIGNATURE);
            [TANDEM_LEAF + 1, b, c, d]
        }
        0x4000_0101 => [ABI_VERSION.to_u32(), u32::from(vcpu.guest.id), 0, 0],
        0x4000_0001..=0x4fff_ffff => [0; 4],
        1 => {
            let [a, b, c, d] = cpu::cpuid(1, 0);
            // Hide VMX (no nested virtualization) and MONITOR/MWAIT (a guest sleeping in
            // MWAIT would not exit, so the hypervisor could not see the core idle or
            // offline); set "running under a hypervisor" (CPUID.1:ECX[31], reserved for
            // this use).
            // Hide MCE and MCA too: the machine-check banks are the platform's, not a
            // partition's.
            // Thermal monitoring (EDX ACPI, TM; ECX TM2) is the platform's too.
            let hidden_ecx = (1 << 5) | (1 << 3) | (1 << 8);
            let hidden_edx = (1 << 7) | (1 << 14) | (1 << 22) | (1 << 29);
            // OSXSAVE (ECX[27]) mirrors the guest's own CR4.OSXSAVE, not the host's.
            let osxsave = if vcpu.read(F::Cr4ReadShadow) & CR4_OSXSAVE != 0 {
                1 << 27
            } else {
                0
            };
            [
                a,
                b,
                (c & !hidden_ecx & !(1 << 27)) | osxsave | (1 << 31),
                d & !hidden_edx,
            ]
        }
        6 => {
            // No digital thermal sensor or package thermal management (EAX[0], EAX[6]),
            // no APERF/MPERF (ECX[0]): platform counters, not the partition's.
            let [a, b, c, d] = cpu::cpuid(6, 0);
            // no energy-performance bias (ECX[3]): IA32_ENERGY_PERF_BIAS is the platform's.
            [a & !((1 << 0) | (1 << 6)), b, c & !((1 << 0) | (1 << 3)), d]
        }
        7 if subleaf == 0 => {
            // Hide IA32_TSC_ADJUST (EBX[1]): writing it would move the TSC the hypervisor
            // and the other guest share on that core. Hide the features whose state is
            // beyond x87/SSE/AVX in XCR0 (see leaf 0xD): MPX, AVX-512, PKU.
            let [a, b, c, d] = cpu::cpuid(7, 0);
            let hidden_ebx = (1 << 1)
                | (1 << 14)
                | (1 << 16)
                | (1 << 17)
                | (1 << 21)
                | (0b111 << 26)
                | (0b11 << 30);
            let hidden_ecx =
                (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
            [a, b & !hidden_ebx, c & !hidden_ecx, d & !0b1100]
        }
        // Extended state: x87, SSE and AVX only (SDM Vol. 1 §13.2), with the sizes of that
        // standard layout, and no XSAVES/XSAVEC (they need IA32_XSS and the compacted form).
        0xd => match subleaf {
            0 if cpu::supported_xcr0() == 0 => [0; 4],
            0 => {
                let enabled = cpu::read_xcr0() & GUEST_XCR0;
                let size = |xcr0: u64| {
                    if xcr0 & XCR0_AVX != 0 {
                        XSAVE_AREA_WITH_AVX
                    } else {
                        XSAVE_AREA_LEGACY
                    }
                };
                [
                    GUEST_XCR0 as u32 & cpu::supported_xcr0() as u32,
                    size(enabled),
                    size(GUEST_XCR0),
                    0,
                ]
            }
            1 => {
                let [a, _, _, _] = cpu::cpuid(0xd, 1);
                [a & !((1 << 1) | (1 << 3)), 0, 0, 0]
            }
            2 => cpu::cpuid(0xd, 2),
            _ => [0; 4],
        },
        // No architectural performance monitoring: the counters are not partitioned.
        0xa => [0; 4],
        // The TSC frequency as measured at boot, where guests look for it (SDM Vol. 2A,
        // CPUID leaves 15H and 16H): TSC = crystal (ECX, Hz) * EBX / EAX. An emulator's
        // model numbers need not match its TSC (Bochs's Skylake says 3.5 GHz; its TSC
        // runs at the configured instructions per second).
        0x15 => [1, 1, time::tsc_hz().min(u64::from(u32::MAX)) as u32, 0],
        0x16 => {
            let mhz = (time::tsc_hz() / 1_000_000) as u32;
            [mhz, mhz, 100, 0]
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
const IA32_EFER: u32 = 0xc000_0080;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_ID: u32 = 0x802;
const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
const CR4_OSXSAVE: u64 = 1 << 18;
/// The XCR0 components guests may enable: x87, SSE, AVX.
const GUEST_XCR0: u64 = 0b111;
const XCR0_AVX: u64 = 1 << 2;
/// XSAVE area sizes: legacy region + header (576), plus the AVX component (256 bytes).
const XSAVE_AREA_LEGACY: u32 = 576;
const XSAVE_AREA_WITH_AVX: u32 = 832;
const IA32_PLATFORM_ID: u32 = 0x17;
const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_BIOS_SIGN_ID: u32 = 0x8b;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const MISC_ENABLE_XD_DISABLE: u64 = 1 << 34;
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
        IA32_EFER if value & !EFER_ALLOWED == 0 => {
            let cr0 = guest_cr0(vcpu);
            vcpu.write(F::GuestIa32Efer, value)
                .and_then(|()| sync_long_mode(vcpu, cr0))
        }
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
/// INIT and STARTUP are emulated (the target is a core parked in the hypervisor, started in
/// real mode at the SIPI vector without the 10 ms INIT delay), other IPIs go to the
/// physical APIC ID of the target core; refusals are reported.
fn send_ipi(vcpu: &mut Vcpu, icr: u64) -> Next {
    let guest = vcpu.guest.id;
    let decision = ipi::decide(icr, guest, |core| {
        (core < MAX_CPUS).then(|| CORES.word(core))
    });
    match decision {
        IpiDecision::Send { core, icr_low } => {
            let destination = core.map_or(0, |c| u64::from(CPUS[c].apic_id()));
            LocalApic::X2Apic.forward_x2apic_icr(destination << 32 | u64::from(icr_low));
        }
        IpiDecision::Ignore => {}
        IpiDecision::Init { core } => {
            // The manager checks again, atomically: the grant may be gone since.
            let _ = CORES.init(core, guest);
        }
        IpiDecision::Startup { core, vector } => {
            // Consuming the INIT re-checks the grant in the same step; a second STARTUP
            // finds no INIT and is ignored, like a real AP already running.
            if let Ok(generation) = CORES.startup(core, guest, cpu::read_tsc()) {
                mailbox::post_start(core, guest, generation, mailbox::Start::RealMode { vector });
                wake_core(core);
            }
        }
        IpiDecision::Refuse(why) => {
            vcpu.report_refusal(
                "ipi",
                icr >> 32,
                "dropped",
                format_args!("IPI {icr:#x} ({})", why.name()),
            );
        }
    }
    vcpu.advance_rip()
}
