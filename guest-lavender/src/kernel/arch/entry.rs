//! `_start`: the first instruction the hypervisor runs, and the link-time image bounds.
//!
//! Entry state (the contract with the hypervisor): 64-bit mode, CPL 0, IF = 0, paging on with an
//! identity map of guest-physical memory, RDI = guest-physical address of the boot-info page,
//! RSP = top of a 16-byte aligned boot stack, no IDT. `_start` only clears `.bss` and calls
//! `kernel_main(boot_info_gpa)`, so nothing here can fault before Rust installs its IDT.

core::arch::global_asm!(
    // `.text.entry` is placed first in `.text` by linker.ld.
    ".pushsection .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    // `rep stosb` uses RDI, RCX and AL: keep the boot-info address in RSI meanwhile.
    "    mov rsi, rdi",
    // Clear `.bss`. The ELF loader should already have zeroed it (p_memsz > p_filesz), but the
    // kernel's statics must not depend on how the image was loaded.
    "    cld",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    rep stosb",
    // kernel_main(boot_info_gpa). RSP is 16-byte aligned here, so after `call` pushes the
    // return address the callee sees RSP + 8 aligned, as the System V ABI requires. A zero RBP
    // ends frame-pointer walks.
    "    mov rdi, rsi",
    "    xor ebp, ebp",
    "    call kernel_main",
    // kernel_main never returns; trap if it ever did.
    "    ud2",
    ".popsection",
);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Guest-physical (= virtual) bounds of the loaded image, `start..end`, from linker.ld.
pub fn image_range() -> (u64, u64) {
    // Only the symbols' addresses are taken; their "contents" are never read.
    (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    )
}
