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

/// Opens a one-instruction window for pending interrupts, then masks them again. `STI` delays
/// recognition by one instruction (Intel SDM Vol. 2B, STI), hence the `NOP` inside the window.
pub fn accept_pending_interrupts() {
    // SAFETY: only toggles IF around a NOP; the interrupt handlers that may run in the window
    // are the kernel's own and return to the instruction after it.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
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

/// The time-stamp counter (Intel SDM Vol. 3B §18.17). `RDTSC` does not exit to the hypervisor.
pub fn read_tsc() -> u64 {
    // SAFETY: `RDTSC` only reads the counter into EDX:EAX; CR4.TSD is clear, so it is allowed
    // at any privilege level.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `CPUID` leaf `leaf`, subleaf 0: (EAX, EBX, ECX, EDX).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let result = core::arch::x86_64::__cpuid_count(leaf, 0);
    (result.eax, result.ebx, result.ecx, result.edx)
}

/// Stops this core without a trace the hypervisor could see: interrupts off, then a busy loop
/// (`PAUSE` does not exit). Only an NMI takes the core away. For the fault tests only.
pub fn spin_forever() -> ! {
    interrupts::disable();
    loop {
        core::hint::spin_loop();
    }
}

/// Crashes the guest on purpose (the fault tests): with an IDT of limit 0 the breakpoint
/// cannot be delivered, nor the #GP that raises, nor the double fault after it: a triple
/// fault (Intel SDM Vol. 3A §6.15, "Interrupt 8"), which in a guest is a VM exit.
pub fn triple_fault() -> ! {
    interrupts::disable();
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::zero(),
    };
    // SAFETY: the guest is meant to die here: after this IDT no interrupt or exception can
    // be delivered, and the `INT3` right after makes the core triple-fault, which exits to the
    // hypervisor; nothing after it runs.
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        asm!("int3", options(nomem, nostack));
    }
    loop {
        core::hint::spin_loop();
    }
}
