//! The hypervisor's serial console: COM2 (COM1 belongs to the Linux guest).

use uart_16550::SerialPort;

/// I/O base of COM2.
const COM2_BASE: u16 = 0x2f8;

/// A handle on the COM2 UART. Several handles may exist (the panic path makes its
/// own); they only interleave characters, never touch memory.
pub fn com2() -> SerialPort {
    // SAFETY: 0x2f8..0x2ff are the COM2 UART's registers, owned by the hypervisor;
    // port I/O to them has no memory effects.
    unsafe { SerialPort::new(COM2_BASE) }
}
