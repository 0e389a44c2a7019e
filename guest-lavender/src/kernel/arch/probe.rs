//! Probes: single instructions that may be refused by the hypervisor, with a way back.
//!
//! Each probe is a tiny assembly function whose one risky instruction carries a global label.
//! Before calling it, the caller arms the recovery point of its core (`kernel::trap`) with that
//! label and the shared fault exit. If the hypervisor refuses the access and injects #GP at that
//! instruction, the #GP handler resumes at the fault exit instead of halting (an exception
//! table, in the manner of Linux's `_ASM_EXTABLE`), and the probe returns "faulted". No probe
//! touches the stack before its risky instruction, so the exit's `ret` returns to the caller.

use crate::kernel::trap::{self, ProbeOutcome};

core::arch::global_asm!(
    ".pushsection .text.probes, \"ax\"",
    // read_u64(address: RDI) -> (value: RAX, faulted: RDX)
    ".global lavender_probe_read_u64",
    "lavender_probe_read_u64:",
    "    xor edx, edx",
    ".global lavender_probe_read_u64_access",
    "lavender_probe_read_u64_access:",
    "    mov rax, qword ptr [rdi]",
    "    ret",
    // write_u64(address: RDI, value: RSI) -> (0: RAX, faulted: RDX)
    ".global lavender_probe_write_u64",
    "lavender_probe_write_u64:",
    "    xor eax, eax",
    "    xor edx, edx",
    ".global lavender_probe_write_u64_access",
    "lavender_probe_write_u64_access:",
    "    mov qword ptr [rdi], rsi",
    "    ret",
    // read_u32(address: RDI) -> (value: RAX, faulted: RDX): a 32-bit device register.
    ".global lavender_probe_read_u32",
    "lavender_probe_read_u32:",
    "    xor edx, edx",
    ".global lavender_probe_read_u32_access",
    "lavender_probe_read_u32_access:",
    "    mov eax, dword ptr [rdi]",
    "    ret",
    // write_u32(address: RDI, value: RSI) -> (0: RAX, faulted: RDX)
    ".global lavender_probe_write_u32",
    "lavender_probe_write_u32:",
    "    xor eax, eax",
    "    xor edx, edx",
    ".global lavender_probe_write_u32_access",
    "lavender_probe_write_u32_access:",
    "    mov dword ptr [rdi], esi",
    "    ret",
    // write_msr(index: RDI, value: RSI) -> (0: RAX, faulted: RDX). WRMSR takes the index in
    // ECX and the value in EDX:EAX (Intel SDM Vol. 2B, WRMSR).
    ".global lavender_probe_write_msr",
    "lavender_probe_write_msr:",
    "    mov ecx, edi",
    "    mov eax, esi",
    "    mov rdx, rsi",
    "    shr rdx, 32",
    ".global lavender_probe_write_msr_access",
    "lavender_probe_write_msr_access:",
    "    wrmsr",
    "    xor eax, eax",
    "    xor edx, edx",
    "    ret",
    // Where a recovered #GP resumes: (0: RAX, faulted = 1: RDX).
    ".global lavender_probe_fault_exit",
    "lavender_probe_fault_exit:",
    "    xor eax, eax",
    "    mov edx, 1",
    "    ret",
    ".popsection",
);

/// What a probe function returns in RAX:RDX (a two-word `repr(C)` struct is returned in that
/// register pair by the System V ABI).
#[repr(C)]
struct RawOutcome {
    value: u64,
    faulted: u64,
}

extern "sysv64" {
    fn lavender_probe_read_u64(address: u64) -> RawOutcome;
    fn lavender_probe_write_u64(address: u64, value: u64) -> RawOutcome;
    fn lavender_probe_read_u32(address: u64) -> RawOutcome;
    fn lavender_probe_write_u32(address: u64, value: u64) -> RawOutcome;
    fn lavender_probe_write_msr(index: u64, value: u64) -> RawOutcome;
    static lavender_probe_read_u64_access: u8;
    static lavender_probe_write_u64_access: u8;
    static lavender_probe_read_u32_access: u8;
    static lavender_probe_write_u32_access: u8;
    static lavender_probe_write_msr_access: u8;
    static lavender_probe_fault_exit: u8;
}

/// Runs `probe` with this core's recovery point armed for the instruction at `access`.
fn armed(access: *const u8, probe: impl FnOnce() -> RawOutcome) -> ProbeOutcome {
    let guard = trap::arm_recovery(access as u64, (&raw const lavender_probe_fault_exit) as u64);
    let raw = probe();
    let error_code = guard.disarm();
    if raw.faulted == 0 {
        ProbeOutcome::Completed(raw.value)
    } else {
        ProbeOutcome::Faulted { error_code }
    }
}

/// Reads 8 bytes at `address`.
///
/// The caller must have mapped `address..address + 8` (a missing mapping is a #PF, which is
/// not recovered). Reading memory that Rust code also writes at the same time would be a data
/// race, which is why this is meant for memory outside Lavender's own.
pub fn read_u64(address: u64) -> ProbeOutcome {
    armed(&raw const lavender_probe_read_u64_access, || {
        // SAFETY: the probe is one 8-byte load from `address`, which the caller mapped; if the
        // hypervisor refuses it, the armed recovery point turns the #GP into a return. A load
        // changes no state Rust relies on.
        unsafe { lavender_probe_read_u64(address) }
    })
}

/// Writes `value` to the 8 bytes at `address`, which must be mapped and must not be memory any
/// Rust object lives in (see `kernel::isolation`, which only aims at memory Lavender does not own).
pub fn write_u64(address: u64, value: u64) -> ProbeOutcome {
    armed(&raw const lavender_probe_write_u64_access, || {
        // SAFETY: the caller guarantees `address..address + 8` is mapped and outside every range
        // Lavender owns, so the store cannot corrupt a Rust object; a refused store is recovered.
        unsafe { lavender_probe_write_u64(address, value) }
    })
}

/// Reads the 32-bit register at `address` (device memory, e.g. the IOAPIC's window), which
/// the caller mapped.
pub fn read_u32(address: u64) -> ProbeOutcome {
    armed(&raw const lavender_probe_read_u32_access, || {
        // SAFETY: one 4-byte load from `address`, which the caller mapped and which is no Rust
        // object; a refused load is recovered.
        unsafe { lavender_probe_read_u32(address) }
    })
}

/// Writes the 32-bit register at `address`, which the caller mapped and which must not be
/// memory any Rust object lives in (device registers, see `kernel::isolation`).
pub fn write_u32(address: u64, value: u32) -> ProbeOutcome {
    armed(&raw const lavender_probe_write_u32_access, || {
        // SAFETY: the caller guarantees `address..address + 4` is mapped and no Rust object, so
        // the store cannot corrupt one; a refused store is recovered.
        unsafe { lavender_probe_write_u32(address, value.into()) }
    })
}

/// The x2APIC interrupt command register (Intel SDM Vol. 3A, "x2APIC Register Address Space").
const X2APIC_ICR_MSR: u64 = 0x830;

/// Writes `value` to the x2APIC ICR, sending an IPI; the hypervisor intercepts these writes.
pub fn write_x2apic_icr(value: u64) -> ProbeOutcome {
    armed(&raw const lavender_probe_write_msr_access, || {
        // SAFETY: writing the ICR sends an IPI and changes no state the kernel's memory safety
        // depends on (with IF = 0 an IPI Lavender receives stays pending); a refused write
        // (#GP) is recovered.
        unsafe { lavender_probe_write_msr(X2APIC_ICR_MSR, value) }
    })
}
