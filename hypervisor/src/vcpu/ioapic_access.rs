//! The IOAPIC owner's register accesses, emulated (`crate::ioapic` decides). Its page is not
//! mapped in the owner's EPT (`guest::build`), so each access is an EPT violation: the
//! instruction at the guest's RIP is read through its page tables, decoded, and carried
//! out against the mediator. An access the decoder or the mediator does not know is a
//! violation under the guest's policy; a refused redirection entry is reported (rate-limited)
//! and the guest goes on with that entry masked in the hardware.

use vmcall_proto::hypercall::CoreState;

use super::{Next, Vcpu};
use crate::arch::ioapic::IoApicMmio;
use crate::arch::percpu::CPUS;
use crate::console;
use crate::cores::CORES;
use crate::guest::mmio_instruction::{self, MmioInstruction, MAX_INSTRUCTION_LEN};
use crate::guest::{by_id, page_walk, Guest};
use crate::ioapic::entry::Topology;
use crate::ioapic::{Mediator, Refused, Retargeted};
use crate::partition::Device;
use crate::platform::MAX_CPUS;
use crate::time;
use crate::vmx::exit::EptViolation;
use crate::vmx::vmcs::VmcsField as F;

/// The mediator, created at the owner's first access (it masks every entry then). Its lock
/// also serializes all use of the hardware's select/window register pair.
static MEDIATOR: spin::Mutex<Option<Mediator>> = spin::Mutex::new(None);

/// The cores guest `id` runs on now, as `crate::ioapic` needs them: those it owns, also one
/// it is asked to give back (`Releasing`), which runs the guest's vCPU until it parks. Linux
/// keeps such a CPU online, and may route an interrupt to it, until its offline takes the
/// CPU down. Entries aimed at it are moved off when it leaves: `vcpu::leave` parks the core
/// before [`retarget`] takes [`MEDIATOR`]'s lock, so an entry routed while the core was
/// still releasing is moved then, and one written after the park is refused.
struct GuestCores {
    id: u8,
}

impl Topology for GuestCores {
    fn current_cores(&self) -> u64 {
        (0..MAX_CPUS)
            .filter(|&c| {
                let word = CORES.word(c);
                word.owner == Some(self.id)
                    && matches!(word.state, CoreState::Owned | CoreState::Releasing)
            })
            .fold(0, |mask, c| mask | 1 << c)
    }

    fn physical_apic_id(&self, core: usize) -> u32 {
        CPUS[core].apic_id()
    }
}

/// Handles an EPT violation at `gpa` if it is the IOAPIC page of its owner; `None` if not.
pub fn emulate(vcpu: &mut Vcpu, gpa: u64) -> Option<Next> {
    let (base, size) = Device::IoApic.mmio()?;
    if !(base..base + size).contains(&gpa) || !vcpu.guest.config.devices.contains(&Device::IoApic) {
        return None;
    }
    Some(match access(vcpu, gpa - base) {
        Ok(next) => next,
        Err(why) => {
            log::error!(
                "guest '{}' cpu{}: IOAPIC access at {gpa:#x} not emulated: {why}",
                vcpu.guest.name(),
                vcpu.core
            );
            vcpu.violation("ioapic_access", gpa)
        }
    })
}

/// Why an access could not be emulated.
enum Unemulated {
    NotLongMode,
    FiveLevelPaging,
    Fetch(page_walk::WalkError),
    Decode(mmio_instruction::DecodeError),
    Direction,
    Offset(u64),
}

impl core::fmt::Display for Unemulated {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotLongMode => f.write_str("the guest is not in 64-bit mode"),
            Self::FiveLevelPaging => f.write_str("5-level paging is not supported"),
            Self::Fetch(e) => write!(f, "cannot read the instruction: {e:?}"),
            Self::Decode(e) => write!(
                f,
                "not a 32-bit MOV to or from a register or immediate: {e:?}"
            ),
            Self::Direction => f.write_str("the instruction does not match the access"),
            Self::Offset(o) => write!(f, "no register at offset {o:#x}"),
        }
    }
}

fn access(vcpu: &mut Vcpu, offset: u64) -> Result<Next, Unemulated> {
    let qualification = EptViolation::decode(vcpu.read(F::ExitQualification));
    let instruction = fetch(vcpu)?;
    if instruction.is_write() != qualification.write || qualification.fetch {
        return Err(Unemulated::Direction);
    }
    let cores = GuestCores { id: vcpu.guest.id };
    let mut hw = IoApicMmio::platform();
    let refused = {
        let mut mediator = MEDIATOR.lock();
        let mediator = mediator.get_or_insert_with(|| {
            let mut mediator = Mediator::new(&mut hw);
            if super::doorbell::has_bus(vcpu.guest) {
                mediator = mediator.with_virtual_pin(usize::from(crate::pci::DOORBELL_IRQ));
            }
            log::info!(
                "IOAPIC taken over for guest '{}': {} entries (version register {:#x}), all masked",
                vcpu.guest.name(),
                mediator.pins(),
                mediator.version()
            );
            mediator
        });
        match instruction {
            MmioInstruction::Load { destination, .. } => {
                let value = mediator
                    .read(offset, &mut hw)
                    .map_err(|e| Unemulated::Offset(e.0))?;
                // A 32-bit load zero-extends into the 64-bit register (SDM Vol. 1 §3.4.1.1).
                if let Err(next) = set_register(vcpu, destination, value.into()) {
                    return Ok(next);
                }
                None
            }
            MmioInstruction::Store { source, .. } => {
                let value = register(vcpu, source) as u32;
                mediator
                    .write(offset, value, &cores, &mut hw)
                    .map_err(|e| Unemulated::Offset(e.0))?
            }
            MmioInstruction::StoreImmediate { value, .. } => mediator
                .write(offset, value, &cores, &mut hw)
                .map_err(|e| Unemulated::Offset(e.0))?,
        }
    };
    if let Some(refused) = refused {
        report_refusal(vcpu, refused);
    }
    if instruction.is_write() && super::doorbell::has_bus(vcpu.guest) {
        // A doorbell raised while the guest had its route masked (moving it between CPUs)
        // reached no one: raise it again now that the route may be live.
        super::doorbell::deliver(super::doorbell::BUS.retrigger());
    }
    // The exit's instruction length is not defined for EPT violations (SDM Vol. 3C §28.2.5):
    // the decoder's is used.
    let rip = vcpu.read(F::GuestRip) + u64::from(instruction.length());
    Ok(match vcpu.write(F::GuestRip, rip) {
        Ok(()) => Next::Resume,
        Err(next) => next,
    })
}

/// Reads and decodes the instruction at the guest's RIP. In 64-bit mode CS has no base
/// (SDM Vol. 3A §3.4.4); the bytes are read page by page through the guest's tables.
fn fetch(vcpu: &Vcpu) -> Result<MmioInstruction, Unemulated> {
    const CS_LONG_MODE: u64 = 1 << 13;
    const CR4_LA57: u64 = 1 << 12;
    if vcpu.read(F::GuestCsAccessRights) & CS_LONG_MODE == 0 {
        return Err(Unemulated::NotLongMode);
    }
    if vcpu.read(F::GuestCr4) & CR4_LA57 != 0 {
        return Err(Unemulated::FiveLevelPaging);
    }
    let (cr3, rip) = (vcpu.read(F::GuestCr3), vcpu.read(F::GuestRip));
    let ram = &vcpu.guest.ram;
    let read_entry = |address: u64| {
        let mut bytes = [0; 8];
        ram.read(address, &mut bytes).ok()?;
        Some(u64::from_le_bytes(bytes))
    };
    let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
    let mut fetched = 0;
    while fetched < bytes.len() {
        let linear = rip.wrapping_add(fetched as u64);
        let physical = match page_walk::translate(cr3, linear, read_entry) {
            Ok(physical) => physical,
            // The instruction may end before the page that is missing: decode what there is.
            Err(_) if fetched > 0 => break,
            Err(e) => return Err(Unemulated::Fetch(e)),
        };
        let in_page = (0x1000 - (linear & 0xfff)) as usize;
        let chunk = in_page.min(bytes.len() - fetched);
        if ram
            .read(physical, &mut bytes[fetched..fetched + chunk])
            .is_err()
        {
            if fetched == 0 {
                return Err(Unemulated::Fetch(page_walk::WalkError::TableOutsideGuest {
                    address: physical,
                }));
            }
            break;
        }
        fetched += chunk;
    }
    mmio_instruction::decode(&bytes[..fetched]).map_err(Unemulated::Decode)
}

/// General-purpose register `number` (RSP is in the VMCS).
fn register(vcpu: &mut Vcpu, number: u8) -> u64 {
    match vcpu.regs.by_number(number) {
        Some(value) => *value,
        None => vcpu.read(F::GuestRsp),
    }
}

fn set_register(vcpu: &mut Vcpu, number: u8, value: u64) -> Result<(), Next> {
    match vcpu.regs.by_number(number) {
        Some(register) => {
            *register = value;
            Ok(())
        }
        None => vcpu.write(F::GuestRsp, value),
    }
}

fn report_refusal(vcpu: &Vcpu, refused: Refused) {
    // The guest's one limit on what it can make the hypervisor print (`Guest::warnings`).
    let Some(suppressed) = vcpu.guest.warnings.admit(time::now_us()) else {
        return;
    };
    let Refused {
        pin,
        entry,
        refusal,
    } = refused;
    log::warn!(
        "guest '{}' cpu{}: IOAPIC pin {pin} entry {:#x} refused ({}); masked in the hardware",
        vcpu.guest.name(),
        vcpu.core,
        entry.0,
        refusal.name()
    );
    console::marker("isolation_violation", |o| {
        o.str("guest", vcpu.guest.name())
            .u64("cpu", vcpu.core as u64)
            .str("kind", "ioapic_entry")
            .u64("pin", pin as u64)
            .hex("entry", entry.0)
            .str("reason", refusal.name())
            .str("delivery", entry.delivery_mode().name())
            .u64("vector", entry.vector().into())
            .u64("destination", entry.destination().into())
            .hex("rip", vcpu.read(F::GuestRip))
            .str("action", "refused")
            .u64("suppressed", suppressed);
    });
}

/// Raises virtual pin `pin` of the IOAPIC owner (`Mediator::virtual_route`): its vector is
/// sent to the core its entry names, as the IOAPIC would deliver an edge. Nothing happens
/// while the owner has the entry masked or has not programmed it.
pub fn raise_virtual(pin: usize) {
    let route = MEDIATOR
        .lock()
        .as_ref()
        .and_then(|mediator| mediator.virtual_route(pin));
    if let Some((core, vector)) = route {
        crate::arch::lapic::LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), vector);
    }
}

/// Core `core` has left guest `guest`: the IOAPIC entries aimed at it go to a core the guest
/// keeps, or are masked when it keeps none. Called by whoever takes a core from a guest,
/// after its vCPU has stopped.
pub fn retarget(core: usize, guest: u8) {
    let Some(owner) = by_id(guest) else { return };
    if !owner.config.devices.contains(&Device::IoApic) {
        return;
    }
    let mut mediator = MEDIATOR.lock();
    let Some(mediator) = mediator.as_mut() else {
        return;
    };
    let cores = GuestCores { id: guest };
    mediator.retarget(core, &cores, &mut IoApicMmio::platform(), |moved| {
        report_retarget(owner, moved)
    });
}

fn report_retarget(owner: &Guest, moved: Retargeted) {
    let Some(suppressed) = owner.warnings.admit(time::now_us()) else {
        return;
    };
    let name = owner.name();
    log::info!(
        "guest '{name}': IOAPIC pin {} moved off cpu{} ({})",
        moved.pin,
        moved.from,
        match moved.to {
            Some(_) => "re-targeted",
            None => "masked: the guest runs on no core",
        }
    );
    console::marker("ioapic_retargeted", |o| {
        o.str("guest", name)
            .u64("pin", moved.pin as u64)
            .u64("from", moved.from as u64);
        match moved.to {
            Some(to) => o.u64("to", to as u64),
            None => o.str("to", "masked"),
        };
        o.u64("suppressed", suppressed);
    });
}
