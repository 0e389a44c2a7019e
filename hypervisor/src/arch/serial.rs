//! The hypervisor's serial console: COM2 (COM1 belongs to the Linux guest).

use uart_16550::SerialPort;

/// I/O base of COM2.
const COM2_BASE: u16 = 0x2f8;

/// Divisor-latch value for 115200 baud (the UART's clock is 1.8432 MHz / 16).
const DIVISOR_115200: u8 = 1;

/// Programs COM2 for 115200 baud, 8N1, after `SerialPort::init` (which picks 38400):
/// emulators model the line's transmit time, and a slow log line would stretch what it
/// reports on.
pub fn set_115200_baud() {
    // SAFETY: COM2's line-control and divisor-latch registers are the hypervisor's; with
    // DLAB set, base+0/+1 are the divisor latch (16550 datasheet); no memory effects.
    unsafe {
        let mut line_control = x86_64::instructions::port::Port::<u8>::new(COM2_BASE + 3);
        let mut divisor_low = x86_64::instructions::port::Port::<u8>::new(COM2_BASE);
        let mut divisor_high = x86_64::instructions::port::Port::<u8>::new(COM2_BASE + 1);
        line_control.write(0x80); // DLAB
        divisor_low.write(DIVISOR_115200);
        divisor_high.write(0);
        line_control.write(0x03); // 8 data bits, no parity, one stop bit, DLAB off
    }
}

/// A handle on the COM2 UART. Several handles may exist (the panic path makes its
/// own); they only interleave characters, never touch memory.
pub fn com2() -> SerialPort {
    // SAFETY: 0x2f8..0x2ff are the COM2 UART's registers, owned by the hypervisor;
    // port I/O to them has no memory effects.
    unsafe { SerialPort::new(COM2_BASE) }
}
