//! Port I/O for the legacy devices the hypervisor drives itself (the PIT for
//! calibration). The serial console goes through the `uart_16550` crate.

use x86_64::instructions::port::Port;

/// I/O ports of the 8254 PIT and the port-B control register (speaker gate).
pub const PIT_CHANNEL2_DATA: u16 = 0x42;
pub const PIT_COMMAND: u16 = 0x43;
pub const PORT_B_CONTROL: u16 = 0x61;
/// Interrupt-mask registers of the two 8259 PICs.
pub const PIC_MASTER_MASK: u16 = 0x21;
pub const PIC_SLAVE_MASK: u16 = 0xa1;

/// Masks every line of both 8259 PICs. The BIOS leaves them delivering the PIT tick as
/// vector 8, which a 64-bit IDT takes for #DF; the hypervisor uses local-APIC IPIs
/// only, and a guest that owns the PIC programs it itself.
pub fn mask_legacy_pic() {
    write_u8(PIC_MASTER_MASK, 0xff);
    write_u8(PIC_SLAVE_MASK, 0xff);
}

/// The hypervisor's own legacy ports; nothing else may be passed to these helpers,
/// so no guest-owned device is ever touched through them.
fn is_hypervisor_port(port: u16) -> bool {
    matches!(
        port,
        PIT_CHANNEL2_DATA | PIT_COMMAND | PORT_B_CONTROL | PIC_MASTER_MASK | PIC_SLAVE_MASK
    )
}

pub fn read_u8(port: u16) -> u8 {
    assert!(
        is_hypervisor_port(port),
        "port {port:#x} is not the hypervisor's"
    );
    // SAFETY: reading the PIT / port B has no memory effects; the assert keeps this
    // to the hypervisor's own devices.
    unsafe { Port::<u8>::new(port).read() }
}

pub fn write_u8(port: u16, value: u8) {
    assert!(
        is_hypervisor_port(port),
        "port {port:#x} is not the hypervisor's"
    );
    // SAFETY: programming PIT channel 2 / the speaker gate has no memory effects; the
    // assert keeps this to the hypervisor's own devices.
    unsafe { Port::<u8>::new(port).write(value) }
}
