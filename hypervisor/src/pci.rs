//! The virtual PCI bus the hypervisor shows Linux: a host bridge and the *doorbell device*, the
//! way the hypervisor wakes Linux user space (the PV agent) without a kernel module of ours.
//!
//! Linux's stock `uio_pci_generic` driver binds the doorbell device and turns its legacy
//! interrupt (INTx) into a blocking `read()` on `/dev/uioN`: each `read()` returns once an
//! interrupt came since the last one. The driver masks INTx in its interrupt handler (it sets
//! *Interrupt Disable*, command register bit 10, after seeing *Interrupt Status*, status bit 3),
//! and the agent unmasks it by writing the command register through sysfs before it waits again
//! (Linux's `Documentation/driver-api/uio-howto.rst`, "Generic PCI UIO driver"). The device has
//! no BARs, no capabilities and no DMA: its whole interface is those two bits.
//!
//! Its one state is a latched doorbell (`pending`, shown as Interrupt Status):
//! * a ring sets it, and raises the interrupt unless INTx is disabled;
//! * masking INTx (the driver's handler acknowledging the interrupt) clears it;
//! * unmasking INTx while it is set raises the interrupt again.
//!
//! So every ring is followed by at least one interrupt once the agent unmasks, and a ring
//! between the driver's mask and the agent's unmask is not lost.
//!
//! Configuration mechanism #1 (PCI Local Bus Specification 3.0 §3.2.2.3.2): a dword write to
//! port 0xCF8 selects bus, device, function and register (bit 31 enables); the data ports
//! 0xCFC..=0xCFF read or write 1, 2 or 4 bytes of the selected dword. Everything absent reads
//! as all ones and drops writes, as an empty slot does.
//!
//! Pure logic over atomics: `vcpu::exits` carries port I/O to it and delivers the interrupts
//! it asks for (`vcpu::doorbell`).

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// CONFIG_ADDRESS and the first and last CONFIG_DATA port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;
pub const CONFIG_DATA_END: u16 = 0xcff;

/// The vendor ID of both devices (`vmcall_proto::doorbell`): not one the PCI-SIG assigned
/// to anyone (Tandem's devices exist only inside its partitions), nor 0xffff ("no device").
pub const VENDOR_ID: u16 = vmcall_proto::doorbell::VENDOR_ID;
/// The host bridge (00:00.0): present because Linux's probe of configuration mechanism #1
/// looks for a host bridge on bus 0 before trusting it (`pci_sanity_check`).
pub const HOST_BRIDGE_DEVICE_ID: u16 = DOORBELL_DEVICE_ID - 1;
/// The doorbell device (00:01.0), which the agent binds to `uio_pci_generic` by these IDs.
pub const DOORBELL_DEVICE_ID: u16 = vmcall_proto::doorbell::DEVICE_ID;
pub const DOORBELL_SLOT: u8 = 1;
/// The legacy interrupt line the doorbell reports (Interrupt Line register): Linux's ISA IRQ 10
/// is IOAPIC pin 10 (no ACPI override), which the IOAPIC mediator keeps masked in the hardware
/// and delivers by IPI when the doorbell rings (`ioapic::Mediator::virtual_route`).
pub const DOORBELL_IRQ: u8 = 10;

/// Class codes (class, subclass, programming interface) in the register at 0x08's top bytes.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// "Device does not fit in any defined classes": nothing but `uio_pci_generic` (bound by ID)
/// drives it.
const CLASS_UNASSIGNED: u32 = 0xff_00_00;

const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_INTERRUPT: u16 = 1 << 3;

/// A decoded CONFIG_ADDRESS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Address {
    enabled: bool,
    bus: u8,
    device: u8,
    function: u8,
    /// Byte offset of the dword (0, 4, ..., 0xfc).
    register: u8,
    /// Bits 30:24 (reserved, or AMD's extended-register bits): set means no register of ours.
    reserved: bool,
}

impl Address {
    fn decode(value: u32) -> Self {
        Self {
            enabled: value & (1 << 31) != 0,
            reserved: value & 0x7f00_0000 != 0,
            bus: (value >> 16) as u8,
            device: ((value >> 11) & 0x1f) as u8,
            function: ((value >> 8) & 0x7) as u8,
            register: (value & 0xfc) as u8,
        }
    }
}

/// Which device an address selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    HostBridge,
    Doorbell,
    Nothing,
}

/// What the caller must do after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Effect {
    None,
    /// Raise the doorbell's interrupt (IOAPIC pin [`DOORBELL_IRQ`]).
    RaiseInterrupt,
}

/// The bus as one guest sees it: the address latch and the doorbell's state. Shared by the
/// guest's vCPUs (Linux serializes its configuration accesses with a lock of its own; the
/// doorbell may be rung from any core at any time, hence the atomics).
pub struct VirtualBus {
    address: AtomicU32,
    pending: AtomicBool,
    intx_disabled: AtomicBool,
}

impl Default for VirtualBus {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualBus {
    pub const fn new() -> Self {
        Self {
            address: AtomicU32::new(0),
            pending: AtomicBool::new(false),
            intx_disabled: AtomicBool::new(false),
        }
    }

    /// Whether `port` is one of the configuration ports.
    pub fn claims(port: u16) -> bool {
        port == CONFIG_ADDRESS || (CONFIG_DATA..=CONFIG_DATA_END).contains(&port)
    }

    /// An IN of `size` bytes (1, 2 or 4) from `port`.
    pub fn read(&self, port: u16, size: u8) -> u32 {
        if port == CONFIG_ADDRESS {
            // Only a dword access is CONFIG_ADDRESS; narrower ones reach other hardware on a
            // PC (0xcf9 is the reset control register), which is absent here.
            return if size == 4 {
                self.address.load(Ordering::Relaxed)
            } else {
                ones(size)
            };
        }
        let Some(shift) = data_shift(port, size) else {
            return ones(size);
        };
        let dword = self.read_dword(Address::decode(self.address.load(Ordering::Relaxed)));
        (dword >> shift) & ones(size)
    }

    /// An OUT of `value` (`size` bytes) to `port`.
    pub fn write(&self, port: u16, size: u8, value: u32) -> Effect {
        if port == CONFIG_ADDRESS {
            if size == 4 {
                self.address.store(value, Ordering::Relaxed);
            }
            return Effect::None;
        }
        let Some(shift) = data_shift(port, size) else {
            return Effect::None;
        };
        let address = Address::decode(self.address.load(Ordering::Relaxed));
        if self.target(address) != Target::Doorbell || address.register != 0x04 {
            // Every other register of both devices is read-only (no BARs, no ROM, the
            // Interrupt Line is the hypervisor's).
            return Effect::None;
        }
        // The command register is the dword's low half; the status half has no bit a
        // write clears (Interrupt Status is the device's).
        let mask = ones(size) << shift;
        let written = ((value << shift) & mask) as u16;
        let touches_command = mask & 0xffff != 0;
        if !touches_command {
            return Effect::None;
        }
        let keep = !(mask as u16);
        let old = self.command();
        let new = (old & keep) | (written & !keep);
        self.set_intx_disabled(new & COMMAND_INTX_DISABLE != 0)
    }

    /// The peer rang: latch it and raise the interrupt unless INTx is masked.
    pub fn ring(&self) -> Effect {
        self.pending.store(true, Ordering::SeqCst);
        if self.intx_disabled.load(Ordering::SeqCst) {
            Effect::None
        } else {
            Effect::RaiseInterrupt
        }
    }

    /// The interrupt again if a ring is latched while INTx is enabled: its interrupt found
    /// the guest's interrupt route masked (the guest was moving it), so it never reached the
    /// driver, which would have masked INTx. Asked after the guest reprograms that route.
    pub fn retrigger(&self) -> Effect {
        if self.pending() && !self.intx_disabled.load(Ordering::SeqCst) {
            Effect::RaiseInterrupt
        } else {
            Effect::None
        }
    }

    /// Whether a ring waits for the guest to take it (Interrupt Status).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    fn set_intx_disabled(&self, disabled: bool) -> Effect {
        let was = self.intx_disabled.swap(disabled, Ordering::SeqCst);
        match (was, disabled) {
            // The driver's handler masks after seeing Interrupt Status: the ring is taken.
            (false, true) => {
                self.pending.store(false, Ordering::SeqCst);
                Effect::None
            }
            // Unmasked with a ring latched meanwhile: raise it now.
            (true, false) if self.pending.load(Ordering::SeqCst) => Effect::RaiseInterrupt,
            _ => Effect::None,
        }
    }

    fn command(&self) -> u16 {
        if self.intx_disabled.load(Ordering::SeqCst) {
            COMMAND_INTX_DISABLE
        } else {
            0
        }
    }

    fn target(&self, address: Address) -> Target {
        if !address.enabled || address.reserved || address.bus != 0 || address.function != 0 {
            return Target::Nothing;
        }
        match address.device {
            0 => Target::HostBridge,
            DOORBELL_SLOT => Target::Doorbell,
            _ => Target::Nothing,
        }
    }

    fn read_dword(&self, address: Address) -> u32 {
        let (device_id, class) = match self.target(address) {
            Target::HostBridge => (HOST_BRIDGE_DEVICE_ID, CLASS_HOST_BRIDGE),
            Target::Doorbell => (DOORBELL_DEVICE_ID, CLASS_UNASSIGNED),
            Target::Nothing => return u32::MAX,
        };
        let doorbell = device_id == DOORBELL_DEVICE_ID;
        match address.register {
            0x00 => u32::from(VENDOR_ID) | u32::from(device_id) << 16,
            0x04 if doorbell => {
                let status = if self.pending() { STATUS_INTERRUPT } else { 0 };
                u32::from(self.command()) | u32::from(status) << 16
            }
            // Revision 0, then the class code.
            0x08 => class << 8,
            // Subsystem vendor and ID: the device's own.
            0x2c => u32::from(VENDOR_ID) | u32::from(device_id) << 16,
            // Interrupt Line, Interrupt Pin (1: INTA#).
            0x3c if doorbell => u32::from(DOORBELL_IRQ) | 1 << 8,
            // Header type 0, single function; no BARs, no capabilities, nothing else.
            _ => 0,
        }
    }
}

/// Where in the selected dword a data-port access of `size` bytes at `port` lands, in bits;
/// `None` for an access that crosses the dword (not a configuration access).
fn data_shift(port: u16, size: u8) -> Option<u32> {
    let offset = port.checked_sub(CONFIG_DATA)?;
    (offset + u16::from(size) <= 4 && matches!(size, 1 | 2 | 4)).then_some(u32::from(offset) * 8)
}

fn ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(bus: &VirtualBus, device: u8, register: u8) {
        let address = 1 << 31 | u32::from(device) << 11 | u32::from(register);
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, address), Effect::None);
    }

    fn read(bus: &VirtualBus, device: u8, register: u8, size: u8) -> u32 {
        select(bus, device, register & !3);
        bus.read(CONFIG_DATA + u16::from(register & 3), size)
    }

    /// Linux's `pci_check_type1`: a byte to 0xcfb, then CONFIG_ADDRESS must read back.
    #[test]
    fn linux_finds_configuration_mechanism_one_and_its_host_bridge() {
        let bus = VirtualBus::new();
        assert_eq!(bus.write(0xcfb, 1, 0x01), Effect::None);
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, 0x8000_0000), Effect::None);
        assert_eq!(bus.read(CONFIG_ADDRESS, 4), 0x8000_0000);
        // pci_sanity_check: the class word at 0x0a of 00:00.0 is a host bridge.
        assert_eq!(read(&bus, 0, 0x0a, 2), 0x0600);
        assert_eq!(read(&bus, 0, 0x00, 2), u32::from(VENDOR_ID));
    }

    #[test]
    fn the_doorbell_device_identifies_itself_and_its_interrupt() {
        let bus = VirtualBus::new();
        assert_eq!(
            read(&bus, DOORBELL_SLOT, 0, 4),
            u32::from(VENDOR_ID) | u32::from(DOORBELL_DEVICE_ID) << 16
        );
        assert_eq!(
            read(&bus, DOORBELL_SLOT, 0x0b, 1),
            0xff,
            "class: unassigned"
        );
        assert_eq!(read(&bus, DOORBELL_SLOT, 0x3c, 1), u32::from(DOORBELL_IRQ));
        assert_eq!(read(&bus, DOORBELL_SLOT, 0x3d, 1), 1, "INTA#");
        assert_eq!(read(&bus, DOORBELL_SLOT, 0x0e, 1), 0, "header type 0");
        assert_eq!(read(&bus, DOORBELL_SLOT, 0x10, 4), 0, "no BAR");
    }

    #[test]
    fn empty_slots_functions_and_buses_read_all_ones_and_ignore_writes() {
        let bus = VirtualBus::new();
        assert_eq!(read(&bus, 2, 0, 4), u32::MAX);
        assert_eq!(read(&bus, 31, 0, 2), 0xffff);
        let function_one = 1 << 31 | u32::from(DOORBELL_SLOT) << 11 | 1 << 8;
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, function_one), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 4), u32::MAX);
        let bus_one = 1 << 31 | 1 << 16;
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, bus_one), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 4), u32::MAX);
        // Disabled, or an extended register: nothing either.
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, 0), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 4), u32::MAX);
        let extended = 1 << 31 | 1 << 24;
        assert_eq!(bus.write(CONFIG_ADDRESS, 4, extended), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 4), u32::MAX);
        // A data access crossing the dword is no configuration access.
        select(&bus, 0, 0);
        assert_eq!(bus.read(CONFIG_DATA + 2, 4), u32::MAX);
    }

    #[test]
    fn writes_reach_only_the_doorbells_interrupt_disable_bit() {
        let bus = VirtualBus::new();
        select(&bus, DOORBELL_SLOT, 0x10);
        assert_eq!(bus.write(CONFIG_DATA, 4, u32::MAX), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 4), 0, "the BAR stays absent");
        select(&bus, DOORBELL_SLOT, 0x3c);
        assert_eq!(bus.write(CONFIG_DATA, 1, 5), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 1), u32::from(DOORBELL_IRQ));
        // Command: every bit but Interrupt Disable stays 0.
        select(&bus, DOORBELL_SLOT, 0x04);
        assert_eq!(bus.write(CONFIG_DATA, 2, 0xffff), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 2), u32::from(COMMAND_INTX_DISABLE));
        // The high byte alone (the agent's one-byte write) clears it.
        assert_eq!(vmcall_proto::doorbell::COMMAND_HIGH_BYTE, 5);
        assert_eq!(
            u16::from(vmcall_proto::doorbell::INTX_DISABLE_IN_HIGH_BYTE) << 8,
            COMMAND_INTX_DISABLE
        );
        assert_eq!(bus.write(CONFIG_DATA + 1, 1, 0), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 2), 0);
        // A write to the status half alone leaves the command as it is.
        assert_eq!(
            bus.write(CONFIG_DATA, 2, COMMAND_INTX_DISABLE.into()),
            Effect::None
        );
        assert_eq!(bus.write(CONFIG_DATA + 2, 2, 0), Effect::None);
        assert_eq!(bus.read(CONFIG_DATA, 2), u32::from(COMMAND_INTX_DISABLE));
    }

    /// The cycle `uio_pci_generic` and the agent go through: ring → interrupt → the driver's
    /// handler masks (taking the ring) → the agent unmasks and waits.
    #[test]
    fn a_ring_raises_one_interrupt_and_the_drivers_mask_takes_it() {
        let bus = VirtualBus::new();
        assert_eq!(bus.ring(), Effect::RaiseInterrupt);
        select(&bus, DOORBELL_SLOT, 0x04);
        assert_eq!(bus.read(CONFIG_DATA, 4) >> 16, u32::from(STATUS_INTERRUPT));
        // pci_check_and_mask_intx: Interrupt Status seen, Interrupt Disable set.
        assert_eq!(
            bus.write(CONFIG_DATA, 2, COMMAND_INTX_DISABLE.into()),
            Effect::None
        );
        assert_eq!(bus.read(CONFIG_DATA, 4) >> 16, 0, "taken");
        // The agent unmasks: nothing latched, nothing raised.
        assert_eq!(bus.write(CONFIG_DATA + 1, 1, 0), Effect::None);
    }

    #[test]
    fn a_ring_while_masked_is_raised_when_unmasked() {
        let bus = VirtualBus::new();
        select(&bus, DOORBELL_SLOT, 0x04);
        assert_eq!(
            bus.write(CONFIG_DATA, 2, COMMAND_INTX_DISABLE.into()),
            Effect::None
        );
        assert_eq!(bus.ring(), Effect::None, "masked: latched only");
        assert!(bus.pending());
        assert_eq!(bus.write(CONFIG_DATA, 2, 0), Effect::RaiseInterrupt);
        // Rings while unmasked raise each time (the driver's handler takes each).
        assert_eq!(bus.ring(), Effect::RaiseInterrupt);
    }

    #[test]
    fn a_ring_whose_interrupt_was_lost_is_raised_again_until_taken() {
        let bus = VirtualBus::new();
        assert_eq!(bus.retrigger(), Effect::None, "nothing latched");
        // Raised while the guest's IOAPIC route was masked: nobody took it.
        assert_eq!(bus.ring(), Effect::RaiseInterrupt);
        assert_eq!(bus.retrigger(), Effect::RaiseInterrupt);
        // The driver's handler takes it.
        select(&bus, DOORBELL_SLOT, 0x04);
        assert_eq!(
            bus.write(CONFIG_DATA, 2, COMMAND_INTX_DISABLE.into()),
            Effect::None
        );
        assert_eq!(bus.retrigger(), Effect::None);
        // Latched while masked: the unmask raises it, not the route.
        assert_eq!(bus.ring(), Effect::None);
        assert_eq!(bus.retrigger(), Effect::None);
    }

    /// One port access a guest may make, any port near the configuration ports, any size.
    #[derive(Clone, Debug)]
    enum Access {
        In { port: u16, size: u8 },
        Out { port: u16, size: u8, value: u32 },
        Ring,
    }

    fn access() -> impl proptest::strategy::Strategy<Value = Access> {
        use proptest::prelude::*;
        let port = 0xcf6u16..0xd02;
        let size = prop_oneof![Just(1u8), Just(2u8), Just(4u8)];
        prop_oneof![
            (port.clone(), size.clone()).prop_map(|(port, size)| Access::In { port, size }),
            (port, size, any::<u32>()).prop_map(|(port, size, value)| Access::Out {
                port,
                size,
                value
            }),
            // Addresses of bus 0's two slots, so that the devices are reached.
            (0u32..64).prop_map(|slot_register| Access::Out {
                port: CONFIG_ADDRESS,
                size: 4,
                value: 1 << 31 | (slot_register >> 5 & 1) << 11 | (slot_register & 0x1f) << 2,
            }),
            Just(Access::Ring),
        ]
    }

    proptest::proptest! {
        /// Whatever a guest does with the ports: no panic, reads only ever return `size`
        /// bytes, the interrupt is raised only for a latched ring while INTx is enabled, and
        /// a ring is never lost (latched until the driver's mask takes it).
        #[test]
        fn hostile_port_accesses_keep_the_doorbell_rules(
            accesses in proptest::collection::vec(access(), 0..200)
        ) {
            let bus = VirtualBus::new();
            for access in accesses {
                match access {
                    Access::In { port, size } => {
                        let value = bus.read(port, size);
                        proptest::prop_assert!(u64::from(value) <= u64::from(ones(size)));
                    }
                    Access::Out { port, size, value } => {
                        let was_pending = bus.pending();
                        let was_masked = bus.intx_disabled.load(Ordering::SeqCst);
                        let effect = bus.write(port, size, value);
                        let masked = bus.intx_disabled.load(Ordering::SeqCst);
                        if effect == Effect::RaiseInterrupt {
                            proptest::prop_assert!(was_pending && was_masked && !masked);
                        }
                        // Only the driver's mask (INTx newly disabled) takes a latched ring.
                        let taken = masked && !was_masked;
                        if was_pending && !taken {
                            proptest::prop_assert!(bus.pending(), "a ring was lost");
                        }
                    }
                    Access::Ring => {
                        let masked = bus.intx_disabled.load(Ordering::SeqCst);
                        let effect = bus.ring();
                        proptest::prop_assert!(bus.pending());
                        proptest::prop_assert_eq!(effect == Effect::RaiseInterrupt, !masked);
                    }
                }
            }
        }
    }
}
