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

/// Depth of the 16550's transmit FIFO, which `SerialPort::init` turns on (FCR 0xC7).
pub const TX_FIFO_BYTES: usize = 16;
/// Time the line takes for one byte at 115200 baud, 8N1 (10 bits): 86.8 µs, rounded up.
pub const BYTE_US: u64 = 87;

/// Line-status register of COM2, and its THRE bit: with the FIFO on, set once the transmit
/// FIFO is empty (16550 datasheet, LSR bit 5).
const COM2_LSR: u16 = COM2_BASE + 5;
const LSR_THRE: u8 = 1 << 5;

/// Whether COM2's transmit FIFO is empty, so that [`com2_fill_fifo`] may write a burst.
pub fn com2_tx_empty() -> bool {
    // SAFETY: reading COM2's line-status register has no side effect on the transmitter
    // (it clears only receive error bits, which nobody reads here); no memory effects.
    let status = unsafe { x86_64::instructions::port::Port::<u8>::new(COM2_LSR).read() };
    status & LSR_THRE != 0
}

/// Writes `bytes` (at most [`TX_FIFO_BYTES`]) into COM2's transmit FIFO without waiting.
/// Call it only when [`com2_tx_empty`] said the FIFO is empty: bytes beyond its room are
/// lost.
pub fn com2_fill_fifo(bytes: &[u8]) {
    debug_assert!(bytes.len() <= TX_FIFO_BYTES);
    let mut data = x86_64::instructions::port::Port::<u8>::new(COM2_BASE);
    for &byte in bytes.iter().take(TX_FIFO_BYTES) {
        // SAFETY: COM2's transmit holding register (base+0, DLAB off) is the hypervisor's;
        // writing it queues a byte on the line; no memory effects.
        unsafe { data.write(byte) };
    }
}

/// A handle on the COM2 UART. Several handles may exist (the panic path makes its
/// own); they only interleave characters, never touch memory.
pub fn com2() -> SerialPort {
    // SAFETY: 0x2f8..0x2ff are the COM2 UART's registers, owned by the hypervisor;
    // port I/O to them has no memory effects.
    unsafe { SerialPort::new(COM2_BASE) }
}
