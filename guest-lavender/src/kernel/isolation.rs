//! The isolation test (`test=isolation` on the command line): Lavender attacks what it must not
//! reach — memory outside its partition, and cores it does not own (an IPI, and a release that
//! asks the hypervisor to interrupt one) — and reports what the hypervisor let through. A
//! refused access comes back as #GP (the hypervisor's "fault" policy), which the probe's
//! recovery point turns into the outcome "faulted"; a refused hypercall returns its status.
//! Under the "stop" policy Lavender simply stops at the first attack.
//!
//! With `ioapic=APIC_ID` and the IOAPIC in its partition, Lavender also programs
//! redirection entries that would interrupt another partition's core (`APIC_ID`), the
//! hypervisor's cores, or run the hypervisor's exception handlers. Its writes complete (the
//! hypervisor emulates the IOAPIC); the hypervisor must keep each entry masked in the
//! hardware and report it. Then it sends IPIs with exception vectors (16..31) to its own
//! core, to that core, to the hypervisor's and to itself by the self shorthand: the
//! hypervisor must drop each and report it.

use guest_lavender::cmdline::IsolationPlan;
use log::{info, warn};
use vmcall_proto::bootinfo::BootInfo;
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::Wake;

use crate::kernel::arch::{apic, hypercall, probe};
use crate::kernel::console;
use crate::kernel::memory;
use crate::kernel::trap::ProbeOutcome;

/// Bytes each memory attack touches.
const ATTACK_BYTES: u64 = 8;
/// Written by the write attack: "LAVENDER" in ASCII, easy to spot in a memory dump.
const WRITE_PATTERN: u64 = u64::from_le_bytes(*b"LAVENDER");
/// Vector of the attack IPI: any valid fixed vector (16..=255) works; 0xE0 is unused by Lavender.
const ATTACK_IPI_VECTOR: u8 = 0xE0;
/// ICR level bit: "assert", required for fixed delivery (Intel SDM Vol. 3A, "Interrupt Command
/// Register (ICR)"). Delivery mode fixed (000b), physical destination, no shorthand: all zero.
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
/// In x2APIC mode the destination x2APIC ID is ICR bits 63:32 (SDM Vol. 3A, "ICR Operation in
/// x2APIC Mode").
const ICR_DESTINATION_SHIFT: u32 = 32;

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
    Ipi,
    /// `CORE_RELEASE` of Lavender's own core asking the hypervisor to interrupt a core
    /// Lavender does not own: the hypervisor must refuse the whole call.
    ReleaseWake,
    /// One redirection entry written to the IOAPIC.
    IoApic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Ipi => "ipi",
            Self::ReleaseWake => "release_wake",
            Self::IoApic => "ioapic",
        }
    }
}

/// Runs the attacks of `plan` in a fixed order (read, write, IPI) and reports each one.
pub fn run(plan: IsolationPlan, boot_info: &BootInfo) {
    info!("isolation test: {} attack(s)", plan.attack_count());
    let mut performed = 0;
    if let Some(address) = plan.read {
        performed += usize::from(attack_read(address));
    }
    if let Some(address) = plan.write {
        performed += usize::from(attack_write(address, boot_info));
    }
    if let Some(apic_id) = plan.ipi {
        attack_ipi(apic_id);
        attack_release_wake(apic_id, boot_info.boot_core());
        performed += 2;
    }
    if let Some(victim) = plan.ioapic {
        performed += attack_ioapic(victim, boot_info.boot_core());
        performed += attack_exception_ipis(victim, boot_info.boot_core());
    }
    console::marker("isolation_done", |o| {
        o.u64("attacks", performed as u64);
    });
}

/// Reads 8 bytes at `address`. Returns whether the attack was performed.
fn attack_read(address: u64) -> bool {
    if !prepare(Kind::Read, address) {
        return false;
    }
    report(Kind::Read, address, probe::read_u64(address));
    true
}

/// Writes [`WRITE_PATTERN`] at `address`, unless that is Lavender's own memory (which the
/// write would corrupt). Returns whether the attack was performed.
fn attack_write(address: u64, boot_info: &BootInfo) -> bool {
    if memory::is_owned(boot_info, address, ATTACK_BYTES) {
        skip(Kind::Write, address, "target is Lavender's own memory");
        return false;
    }
    if !prepare(Kind::Write, address) {
        return false;
    }
    report(
        Kind::Write,
        address,
        probe::write_u64(address, WRITE_PATTERN),
    );
    true
}

/// Maps the target in Lavender's page tables, so the access reaches the hypervisor's EPT
/// instead of faulting in Lavender's own paging.
fn prepare(kind: Kind, address: u64) -> bool {
    match memory::map_probe_target(address, ATTACK_BYTES) {
        Ok(added) => {
            info!(
                "isolation: mapped {added} page(s) for the {} attack at {address:#x}",
                kind.name()
            );
            true
        }
        Err(error) => {
            warn!("isolation: cannot map {address:#x}: {error:?}");
            skip(kind, address, "cannot map the target");
            false
        }
    }
}

fn attack_ipi(apic_id: u32) {
    let icr = u64::from(apic_id) << ICR_DESTINATION_SHIFT
        | ICR_LEVEL_ASSERT
        | u64::from(ATTACK_IPI_VECTOR);
    report(Kind::Ipi, u64::from(apic_id), probe::write_x2apic_icr(icr));
}

/// Releases the boot core (Lavender's only one at this point) asking for an interrupt to
/// core `target` once it is parked. The hypervisor must refuse: were the call accepted, it
/// would not return and Lavender would stop here, which the isolation scenario would see.
fn attack_release_wake(target: u32, boot_core: CoreId) {
    let Some(core) = CoreId::new(u64::from(target)) else {
        skip(Kind::ReleaseWake, u64::from(target), "no such core");
        return;
    };
    let wake = Wake {
        core,
        vector: ATTACK_IPI_VECTOR,
    };
    let failure = hypercall::release_this_core(boot_core, Some(wake));
    info!("isolation: release_wake {target:#x} refused: {failure:?}");
    console::marker("isolation_attack", |o| {
        o.str("kind", Kind::ReleaseWake.name())
            .hex("target", u64::from(target))
            .str("outcome", "refused")
            .display("status", &format_args!("{failure:?}"));
    });
}

fn report(kind: Kind, target: u64, outcome: ProbeOutcome) {
    match outcome {
        ProbeOutcome::Completed(_) => info!("isolation: {} {target:#x} completed", kind.name()),
        ProbeOutcome::Faulted { error_code } => {
            info!(
                "isolation: {} {target:#x} faulted (#GP, error code {error_code:#x})",
                kind.name()
            )
        }
    }
    console::marker("isolation_attack", |o| {
        o.str("kind", kind.name()).hex("target", target);
        match outcome {
            ProbeOutcome::Completed(value) => {
                o.str("outcome", "completed");
                if matches!(kind, Kind::Read) {
                    o.hex("value", value);
                }
            }
            ProbeOutcome::Faulted { error_code } => {
                o.str("outcome", "faulted").hex("error_code", error_code);
            }
        }
    });
}

fn skip(kind: Kind, address: u64, reason: &str) {
    warn!(
        "isolation: {} attack on {address:#x} skipped: {reason}",
        kind.name()
    );
    console::marker("isolation_attack", |o| {
        o.str("kind", kind.name())
            .hex("target", address)
            .str("outcome", "skipped")
            .str("reason", reason);
    });
}

/// The IOAPIC's register page (82093AA datasheet §3.1): IOREGSEL selects a register, IOWIN
/// reads or writes it. The address is the one every PC uses, and Tandem's configuration names.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = IOAPIC_BASE;
const IOWIN: u64 = IOAPIC_BASE + 0x10;
/// The pin the PIT's IRQ 0 is wired to on PCs (the MADT's usual override).
const ATTACK_PIN: u8 = 2;
/// Redirection-entry fields (82093AA §3.2.4).
const DELIVERY_NMI: u64 = 0b100 << 8;
const DELIVERY_INIT: u64 = 0b101 << 8;
const LOGICAL_DESTINATION: u64 = 1 << 11;
const ENTRY_MASKED: u32 = 1 << 16;
/// An exception vector (#MC): on a core in the hypervisor it would run its handler.
const EXCEPTION_VECTOR: u64 = 0x12;
/// The lowest and highest exception vectors an APIC delivers (it refuses 0..15 itself, Intel
/// SDM Vol. 3A §11.5.3).
const FIRST_LEGAL_EXCEPTION_VECTOR: u64 = 0x10;
const LAST_EXCEPTION_VECTOR: u64 = 0x1f;
/// ICR destination shorthand "self" (bits 19:18 = 01b).
const ICR_SHORTHAND_SELF: u64 = 1 << 18;
/// The hypervisor's wake IPI vector, and the core it keeps for itself.
const HYPERVISOR_WAKE_VECTOR: u64 = 0xf0;
const HYPERVISOR_CORE: u64 = 0;

fn redirection_entry(low: u64, destination: u64) -> u64 {
    low | destination << 56
}

/// Programs [`ATTACK_PIN`] with one forbidden entry after another, each unmasked, and masks
/// the pin again at the end. Returns how many entries were written.
fn attack_ioapic(victim: u32, boot_core: CoreId) -> usize {
    if let Err(error) = memory::map_probe_target(IOAPIC_BASE, 0x20) {
        warn!("isolation: cannot map the IOAPIC: {error:?}");
        skip(Kind::IoApic, IOAPIC_BASE, "cannot map the IOAPIC");
        return 0;
    }
    let victim = u64::from(victim);
    let own = boot_core.index() as u64;
    let entries = [
        ("init_to_victim", redirection_entry(DELIVERY_INIT, victim)),
        (
            "fixed_to_victim",
            redirection_entry(u64::from(ATTACK_IPI_VECTOR), victim),
        ),
        (
            "exception_vector_to_self",
            redirection_entry(EXCEPTION_VECTOR, own),
        ),
        (
            "exception_vector_to_victim",
            redirection_entry(FIRST_LEGAL_EXCEPTION_VECTOR, victim),
        ),
        (
            "exception_vector_to_hypervisor",
            redirection_entry(LAST_EXCEPTION_VECTOR, HYPERVISOR_CORE),
        ),
        (
            "nmi_to_hypervisor",
            redirection_entry(DELIVERY_NMI, HYPERVISOR_CORE),
        ),
        (
            "wake_vector_to_hypervisor",
            redirection_entry(HYPERVISOR_WAKE_VECTOR, HYPERVISOR_CORE),
        ),
        (
            "logical_broadcast",
            redirection_entry(LOGICAL_DESTINATION | u64::from(ATTACK_IPI_VECTOR), 0xff),
        ),
    ];
    for (name, entry) in entries {
        let outcome = write_entry(ATTACK_PIN, entry);
        let read_back = read_entry_low(ATTACK_PIN);
        info!("isolation: ioapic {name} (entry {entry:#x}): {outcome:?}, reads back {read_back:?}");
        console::marker("isolation_attack", |o| {
            o.str("kind", Kind::IoApic.name())
                .str("name", name)
                .u64("pin", ATTACK_PIN.into())
                .hex("entry", entry);
            match outcome {
                ProbeOutcome::Completed(_) => o.str("outcome", "completed"),
                ProbeOutcome::Faulted { error_code } => {
                    o.str("outcome", "faulted").hex("error_code", error_code)
                }
            };
            if let ProbeOutcome::Completed(low) = read_back {
                o.hex("read_back_low", low);
            }
        });
    }
    let _ = ioapic_write(redirection_register(ATTACK_PIN), ENTRY_MASKED);
    entries.len()
}

/// Sends fixed IPIs with exception vectors through the ICR: to Lavender's own core, to
/// `victim` (another partition's), to the hypervisor's core, and to itself by the self
/// shorthand. Each write completes (the hypervisor emulates the ICR); the hypervisor must
/// drop and report each one. Returns how many were sent.
fn attack_exception_ipis(victim: u32, boot_core: CoreId) -> usize {
    let own = boot_core.index() as u64;
    let physical =
        |vector: u64, core: u64| core << ICR_DESTINATION_SHIFT | ICR_LEVEL_ASSERT | vector;
    let ipis = [
        ("exception_ipi_to_self", physical(EXCEPTION_VECTOR, own)),
        (
            "exception_ipi_to_victim",
            physical(LAST_EXCEPTION_VECTOR, u64::from(victim)),
        ),
        (
            "exception_ipi_to_hypervisor",
            physical(FIRST_LEGAL_EXCEPTION_VECTOR, HYPERVISOR_CORE),
        ),
        (
            "exception_self_ipi",
            ICR_SHORTHAND_SELF | ICR_LEVEL_ASSERT | EXCEPTION_VECTOR,
        ),
    ];
    for (name, icr) in ipis {
        let outcome = probe::write_x2apic_icr(icr);
        info!("isolation: {name} (ICR {icr:#x}): {outcome:?}");
        console::marker("isolation_attack", |o| {
            o.str("kind", Kind::Ipi.name())
                .str("name", name)
                .hex("icr", icr);
            match outcome {
                ProbeOutcome::Completed(_) => o.str("outcome", "completed"),
                ProbeOutcome::Faulted { error_code } => {
                    o.str("outcome", "faulted").hex("error_code", error_code)
                }
            };
        });
    }
    ipis.len()
}

fn redirection_register(pin: u8) -> u32 {
    0x10 + 2 * u32::from(pin)
}

/// Writes a whole entry as a careful driver would: masked first, then the destination, then
/// the low half as wanted. Returns the first refused step, or the last completed one.
fn write_entry(pin: u8, entry: u64) -> ProbeOutcome {
    let low = redirection_register(pin);
    let steps = [
        (low, ENTRY_MASKED),
        (low + 1, (entry >> 32) as u32),
        (low, entry as u32),
    ];
    let mut outcome = ProbeOutcome::Completed(0);
    for (register, value) in steps {
        outcome = ioapic_write(register, value);
        if matches!(outcome, ProbeOutcome::Faulted { .. }) {
            break;
        }
    }
    outcome
}

fn ioapic_write(register: u32, value: u32) -> ProbeOutcome {
    match probe::write_u32(IOREGSEL, register) {
        ProbeOutcome::Completed(_) => probe::write_u32(IOWIN, value),
        faulted => faulted,
    }
}

fn read_entry_low(pin: u8) -> ProbeOutcome {
    match probe::write_u32(IOREGSEL, redirection_register(pin)) {
        ProbeOutcome::Completed(_) => probe::read_u32(IOWIN),
        faulted => faulted,
    }
}

/// The secret `test=leave_traces` writes ("SECRET!!" plus the register number).
const TRACE_SECRET: u64 = u64::from_le_bytes(*b"SECRET!!");
/// The vector the armed TSC-deadline timer would raise; Lavender uses no such vector.
const TRACE_TIMER_VECTOR: u8 = 0xE1;
/// The vector left pending by a self-IPI: #MC's, which the hypervisor's IDT would run as a
/// machine check if it took it as one.
const TRACE_PENDING_VECTOR: u8 = 0x12;
/// TSC ticks from now to the armed deadline: long after the core is gone, soon enough to fire
/// while the next guest runs on it if nobody disarms it.
const TRACE_DEADLINE_TICKS: u64 = 20_000_000;

/// `test=leave_traces`: leaves secrets in the boot core's XMM, debug registers and CR2, blocks
/// its APIC (TPR = 0xff) with an exception vector pending and a TSC-deadline timer armed, then
/// gives the core back to the hypervisor. The core must reach its next guest with none of it.
/// Does not return.
pub fn leave_traces(boot_info: &BootInfo) -> ! {
    let core = boot_info.boot_core();
    crate::kernel::smp::enable_apic(core);
    let deadline = crate::kernel::arch::cpu::read_tsc() + TRACE_DEADLINE_TICKS;
    console::marker("traces_left", |o| {
        o.u64("core", core.index() as u64)
            .hex("secret", TRACE_SECRET)
            .u64("tpr", 0xff)
            .u64("timer_vector", TRACE_TIMER_VECTOR.into())
            .u64("pending_vector", TRACE_PENDING_VECTOR.into())
            .u64("tsc_deadline", deadline);
    });
    // The core leaves inside the release call: send the queued lines now.
    console::flush(|| true);
    crate::kernel::arch::traces::leave(TRACE_SECRET);
    apic::block_and_arm_deadline(TRACE_PENDING_VECTOR, TRACE_TIMER_VECTOR, deadline);
    let failure = hypercall::release_this_core(core, None);
    console::emergency_marker("traces_release_refused", |o| {
        o.display("failure", &format_args!("{failure:?}"));
    });
    crate::kernel::arch::cpu::halt_forever()
}
