//! The doorbell into Linux: a device on the virtual PCI bus the hypervisor shows Linux, driven
//! by Linux's stock `uio_pci_generic` (the agent binds it by these IDs through the driver's
//! `new_id`). Each `read()` of its `/dev/uioN` returns once it has rung since the last one;
//! the agent unmasks it first by clearing *Interrupt Disable* (bit 10 of the PCI command
//! register, byte [`COMMAND_HIGH_BYTE`] of the device's sysfs `config` file). Peers ring it
//! with the `DOORBELL` hypercall.

/// Not an ID the PCI-SIG assigned to anyone: the device exists only inside a Tandem partition.
pub const VENDOR_ID: u16 = 0x7464;
/// The doorbell device (slot 1 of bus 0); the host bridge in slot 0 is `DEVICE_ID - 1`.
pub const DEVICE_ID: u16 = 0x0002;
/// Offset of the command register's high byte in configuration space.
pub const COMMAND_HIGH_BYTE: u64 = 5;
/// *Interrupt Disable* within that byte (command bit 10).
pub const INTX_DISABLE_IN_HIGH_BYTE: u8 = 1 << 2;
