//! A virtual CPU: one guest running on one physical core. Sets up the VMCS, enters the
//! guest, and handles each VM exit on purpose (see `exits`); anything unexpected stops
//! that guest with a diagnostic and parks the core, never the hypervisor.

mod exits;
mod hypercalls;
pub mod setup;

use log::{error, info};

use crate::arch::cpu;
use crate::arch::descriptors::{HostTables, WAKE_VECTOR};
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::{self, CPUS};
use crate::arch::vmx::{self, FixedBits, GuestRegisters};
use crate::console;
use crate::guest::{Guest, GuestState};
use crate::partition::ViolationPolicy;
use crate::platform::MAX_CPUS;
use crate::vmx::exit::{ExitCounters, ExitReason};
use crate::vmx::vmcs::{entry, VmcsField as F};

/// Exit counts per physical core (the per-guest ones are in `Guest::exits`).
pub static CORE_EXITS: [ExitCounters; MAX_CPUS] = [const { ExitCounters::new() }; MAX_CPUS];

/// What to do after an exit was handled.
pub enum Next {
    Resume,
    /// Leave the guest for good on this core.
    Park,
}

pub struct Vcpu {
    pub guest: &'static Guest,
    pub core: usize,
    pub regs: GuestRegisters,
    fixed: FixedBits,
}

impl Vcpu {
    fn read(&self, field: F) -> u64 {
        vmx::vmread(field)
    }

    /// Writes a guest or control field; a failure means the VMCS is broken, so the guest
    /// is stopped.
    fn write(&mut self, field: F, value: u64) -> Result<(), Next> {
        vmx::vmwrite(field, value)
            .map_err(|e| self.stop("vmwrite_failed", format_args!("VMWRITE {field:?}: {e}")))
    }

    /// Skips the instruction that exited (its length is in the VMCS, SDM Vol. 3C §28.2.5).
    fn advance_rip(&mut self) -> Next {
        let rip = self.read(F::GuestRip) + self.read(F::ExitInstructionLength);
        match self.write(F::GuestRip, rip) {
            Ok(()) => Next::Resume,
            Err(next) => next,
        }
    }

    /// Delivers #GP(0) at the current instruction on the next entry (SDM Vol. 3C §27.6).
    fn inject_general_protection(&mut self) -> Next {
        const VECTOR_GP: u64 = 13;
        const TYPE_HARDWARE_EXCEPTION: u64 = 3 << 8;
        const DELIVER_ERROR_CODE: u64 = 1 << 11;
        const VALID: u64 = 1 << 31;
        let info = VECTOR_GP | TYPE_HARDWARE_EXCEPTION | DELIVER_ERROR_CODE | VALID;
        match self
            .write(F::EntryInterruptionInfo, info)
            .and_then(|()| self.write(F::EntryExceptionErrorCode, 0))
        {
            Ok(()) => Next::Resume,
            Err(next) => next,
        }
    }

    /// The guest's current privilege level: DPL of SS (SDM Vol. 3A §5.5).
    fn cpl(&self) -> u8 {
        ((self.read(F::GuestSsAccessRights) >> 5) & 3) as u8
    }

    /// The guest touched something outside its partition: report it and apply the
    /// guest's policy. `target` names what was touched.
    fn violation(&mut self, kind: &str, target: u64) -> Next {
        let policy = self.guest.config.on_violation;
        let rip = self.read(F::GuestRip);
        let action = match policy {
            ViolationPolicy::Stop => "stopped",
            ViolationPolicy::Fault => "fault_injected",
        };
        error!(
            "guest '{}' cpu{}: {kind} of {target:#x} at RIP {rip:#x} refused ({action})",
            self.guest.name(),
            self.core
        );
        console::marker("isolation_violation", |o| {
            o.str("guest", self.guest.name())
                .u64("cpu", self.core as u64)
                .str("kind", kind)
                .hex("target", target)
                .hex("rip", rip)
                .str("action", action);
        });
        match policy {
            ViolationPolicy::Stop => {
                self.stop("isolation_violation", format_args!("{kind} of {target:#x}"))
            }
            ViolationPolicy::Fault => self.inject_general_protection(),
        }
    }

    /// Stops the guest: a diagnostic with the exit's context, then every core of the
    /// guest parks (the others notice at their next exit).
    fn stop(&self, code: &str, detail: core::fmt::Arguments) -> Next {
        let reason = self.read(F::ExitReason);
        let (qualification, rip, gpa) = (
            self.read(F::ExitQualification),
            self.read(F::GuestRip),
            self.read(F::GuestPhysicalAddress),
        );
        error!(
            "guest '{}' stopped on cpu{}: {detail} (exit reason {}, qualification {qualification:#x}, RIP {rip:#x}, GPA {gpa:#x})",
            self.guest.name(),
            self.core,
            reason & 0xffff
        );
        console::marker("guest_stopped", |o| {
            o.str("guest", self.guest.name())
                .u64("cpu", self.core as u64)
                .str("code", code)
                .display("detail", &detail)
                .u64("exit_reason", reason & 0xffff)
                .str("exit_name", ExitReason::from_basic(reason as u16).name())
                .hex("qualification", qualification)
                .hex("rip", rip)
                .hex("gpa", gpa);
        });
        self.guest.set_state(GuestState::Stopped);
        Next::Park
    }
}

/// Tells the monitor on the BSP that a guest changed state.
fn notify_monitor() {
    LocalApic::X2Apic.send_fixed(CPUS[0].apic_id(), WAKE_VECTOR);
}

/// Runs `guest`'s boot vCPU on this core (CPU `core`) until the guest halts or stops.
pub fn run(guest: &'static Guest, core: usize, host: &HostTables) -> ! {
    let prepared = vmx::read_capabilities()
        .ok()
        .zip(vmx::fixed_bits())
        .ok_or("VMX capabilities unreadable")
        .and_then(|(caps, fixed)| {
            let region = percpu::claim_vmcs_region(core).ok_or("VMCS region already in use")?;
            let revision = crate::vmx::caps::VmxFeatures::decode(&caps).vmcs_revision;
            region
                .make_current_vmcs(revision)
                .map_err(|_| "VMCLEAR/VMPTRLD failed")?;
            Ok((caps, fixed))
        });
    let (caps, fixed) = match prepared {
        Ok(ready) => ready,
        Err(why) => park_after_setup_failure(guest, core, &why),
    };
    if let Err(e) = setup::configure(guest, &caps, &fixed, host) {
        park_after_setup_failure(guest, core, &e);
    }
    let mut vcpu = Vcpu {
        guest,
        core,
        regs: GuestRegisters {
            rdi: guest.entry.rdi,
            ..Default::default()
        },
        fixed,
    };
    info!(
        "guest '{}': entering at {:#x} on cpu{core}",
        guest.name(),
        guest.entry.rip
    );
    console::marker("guest_started", |o| {
        o.str("guest", guest.name())
            .u64("cpu", core as u64)
            .hex("rip", guest.entry.rip);
    });
    let mut launched = false;
    loop {
        if guest.state() != GuestState::Running {
            break;
        }
        if let Err(e) = vmx::enter_guest(&mut vcpu.regs, launched) {
            vcpu.stop("vm_entry_failed", format_args!("VM entry failed: {e}"));
            break;
        }
        launched = true;
        let raw = vcpu.read(F::ExitReason);
        let reason = ExitReason::from_basic(raw as u16);
        guest.exits.count(reason);
        CORE_EXITS[core].count(reason);
        // Bit 31: the VM entry itself failed (SDM Vol. 3C §28.8); the guest never ran.
        let next = if raw & (1 << 31) != 0 {
            vcpu.stop(
                "vm_entry_failed",
                format_args!("VM entry failed checking guest state ({})", reason.name()),
            )
        } else {
            exits::handle(&mut vcpu, reason)
        };
        if let Next::Park = next {
            break;
        }
    }
    notify_monitor();
    cpu::halt_forever()
}

fn park_after_setup_failure(guest: &Guest, core: usize, why: &dyn core::fmt::Display) -> ! {
    error!(
        "guest '{}': cannot set up its vCPU on cpu{core}: {why}",
        guest.name()
    );
    console::marker("guest_stopped", |o| {
        o.str("guest", guest.name())
            .u64("cpu", core as u64)
            .str("code", "vcpu_setup_failed")
            .display("detail", why);
    });
    guest.set_state(GuestState::Stopped);
    notify_monitor();
    cpu::halt_forever()
}

/// EFER.LMA follows CR0.PG while EFER.LME is set, and the IA-32e-mode-guest entry
/// control must match it (SDM Vol. 3C §27.3.1.1).
fn sync_long_mode(vcpu: &mut Vcpu, cr0: u64) -> Result<(), Next> {
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    const CR0_PG: u64 = 1 << 31;
    let efer = vcpu.read(F::GuestIa32Efer);
    let long_mode = efer & EFER_LME != 0 && cr0 & CR0_PG != 0;
    let efer = if long_mode {
        efer | EFER_LMA
    } else {
        efer & !EFER_LMA
    };
    vcpu.write(F::GuestIa32Efer, efer)?;
    let controls = vcpu.read(F::EntryControls);
    let ia32e = u64::from(entry::IA32E_MODE_GUEST);
    vcpu.write(
        F::EntryControls,
        if long_mode {
            controls | ia32e
        } else {
            controls & !ia32e
        },
    )
}
