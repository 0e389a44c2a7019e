//! Privileged registers and instructions of the current core.

use core::arch::asm;

use x86_64::instructions::{hlt, interrupts};
use x86_64::registers::control::Cr2;

/// Stops this core for good: interrupts off, then `HLT` forever. Each `HLT` is a VM exit the
/// hypervisor observes (idle accounting); with IF = 0 only an NMI or a hypervisor event could
/// resume it, and the loop halts again.
pub fn halt_forever() -> ! {
    interrupts::disable();
    loop {
        hlt();
    }
}

/// CR2: the linear address of the last page fault (Intel SDM Vol. 3A §2.5).
pub fn page_fault_address() -> u64 {
    Cr2::read_raw()
}

/// The task register's selector (`STR`), which names this core's TSS and so its slot.
pub fn task_register() -> u16 {
    let selector: u16;
    // SAFETY: `STR` only copies the task register's selector into a general register; it reads
    // no memory and is allowed at CPL 0 (and not prevented by UMIP at CPL 0).
    unsafe {
        asm!("str {0:x}", out(reg) selector, options(nomem, nostack, preserves_flags));
    }
    selector
}
