//! The AP start-up trampoline: real mode -> protected mode -> long mode, then Lavender's Rust
//! AP entry (Intel SDM Vol. 3A §9.9, "Mode Switching": §9.9.1 to protected mode, §10.8.5
//! "Initializing IA-32e Mode").
//!
//! The code below is a template in `.rodata`: it is never run where it is linked.
//! `prepare_page` copies it once to a page below 1 MiB, patches the position-dependent fields
//! ([`guest_lavender::trampoline::patch`]) and makes the page executable in Lavender's page
//! tables (the AP turns paging on while running from that page); `install` writes the
//! per-start fields before each bring-up ([`guest_lavender::trampoline::start_fields`]).
//!
//! At `lavender_trampoline_start` the core is in real mode with `CS = page >> 4`, `IP = 0`.
//! EBX keeps the page's linear address throughout, so every field is reached relative to it.

use guest_lavender::trampoline::{self, Offsets, Params, PatchError};

use crate::kernel::arch::paging;

core::arch::global_asm!(
    ".pushsection .rodata.trampoline, \"a\"",
    ".p2align 12",
    ".global lavender_trampoline_start",
    "lavender_trampoline_start:",
    ".code16",
    "    cli",
    "    cld",
    "    xorl %ebx, %ebx",
    "    movw %cs, %bx",
    "    movw %bx, %ds",
    "    shll $4, %ebx",
    // After reset or INIT, CR0 has CD and NW set (SDM Vol. 3A §9.1.1, Table 9-1): turn
    // caching on, and set PE. The far jump through `far32` (patched: the linear address of the
    // 32-bit code, selector 0x08) loads CS from the trampoline's GDT.
    "    lgdtl lavender_trampoline_gdtr - lavender_trampoline_start",
    "    movl %cr0, %eax",
    "    andl $0x9fffffff, %eax",
    "    orl $1, %eax",
    "    movl %eax, %cr0",
    "    ljmpl *lavender_trampoline_far32 - lavender_trampoline_start",
    ".code32",
    ".global lavender_trampoline_protected",
    "lavender_trampoline_protected:",
    "    movw ${data}, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    // IA-32e needs CR4.PAE, CR3, EFER.LME, then CR0.PG (SDM Vol. 3A §10.8.5). EFER.NXE too:
    // Lavender's page tables set NX, a reserved bit while NXE is clear. And EFER.SCE, for
    // user mode's SYSCALL: set here, it costs the core no second EFER write. EFER is written
    // whole, not read first: every EFER access is a VM exit, and no other bit is wanted.
    "    movl %cr4, %eax",
    "    orl $0x20, %eax",
    "    movl %eax, %cr4",
    "    movl (lavender_trampoline_cr3 - lavender_trampoline_start)(%ebx), %eax",
    "    movl %eax, %cr3",
    "    movl $0xc0000080, %ecx",
    "    movl $0x901, %eax",
    "    xorl %edx, %edx",
    "    wrmsr",
    "    movl %cr0, %eax",
    "    orl $0x80000000, %eax",
    "    movl %eax, %cr0",
    "    ljmpl *(lavender_trampoline_far64 - lavender_trampoline_start)(%ebx)",
    ".code64",
    ".global lavender_trampoline_long",
    "lavender_trampoline_long:",
    // The upper halves of the registers are undefined after the switch (SDM Vol. 1 §3.4.1.1).
    "    movl %ebx, %ebx",
    "    movq (lavender_trampoline_stack - lavender_trampoline_start)(%rbx), %rsp",
    "    movq (lavender_trampoline_argument - lavender_trampoline_start)(%rbx), %rdi",
    "    xorl %ebp, %ebp",
    "    jmpq *(lavender_trampoline_entry - lavender_trampoline_start)(%rbx)",
    // The trampoline's GDT: null, 32-bit code, data, 64-bit code (SDM Vol. 3A §3.4.5).
    ".p2align 3",
    ".global lavender_trampoline_gdt",
    "lavender_trampoline_gdt:",
    "    .quad 0",
    "    .quad 0x00cf9a000000ffff",
    "    .quad 0x00cf92000000ffff",
    "    .quad 0x00af9a000000ffff",
    ".global lavender_trampoline_gdtr",
    "lavender_trampoline_gdtr:",
    "    .word 4 * 8 - 1",
    "    .long 0",
    ".global lavender_trampoline_far32",
    "lavender_trampoline_far32:",
    "    .long 0",
    "    .word 0",
    ".global lavender_trampoline_far64",
    "lavender_trampoline_far64:",
    "    .long 0",
    "    .word 0",
    ".p2align 3",
    ".global lavender_trampoline_cr3",
    "lavender_trampoline_cr3:",
    "    .quad 0",
    ".global lavender_trampoline_stack",
    "lavender_trampoline_stack:",
    "    .quad 0",
    ".global lavender_trampoline_entry",
    "lavender_trampoline_entry:",
    "    .quad 0",
    ".global lavender_trampoline_argument",
    "lavender_trampoline_argument:",
    "    .quad 0",
    ".global lavender_trampoline_end",
    "lavender_trampoline_end:",
    ".popsection",
    data = const trampoline::DATA_SELECTOR,
    options(att_syntax),
);

extern "C" {
    static lavender_trampoline_start: u8;
    static lavender_trampoline_protected: u8;
    static lavender_trampoline_long: u8;
    static lavender_trampoline_gdt: u8;
    static lavender_trampoline_gdtr: u8;
    static lavender_trampoline_far32: u8;
    static lavender_trampoline_far64: u8;
    static lavender_trampoline_cr3: u8;
    static lavender_trampoline_stack: u8;
    static lavender_trampoline_entry: u8;
    static lavender_trampoline_argument: u8;
    static lavender_trampoline_end: u8;
}

/// The Rust entry of a started core, reached by the trampoline's last jump with the argument
/// `install` was given.
extern "sysv64" fn lavender_ap_entry(slot: u64) -> ! {
    crate::kernel::smp::ap_main(slot as usize)
}

fn offsets() -> Offsets {
    let start = (&raw const lavender_trampoline_start) as usize;
    let at = |label: *const u8| label as usize - start;
    Offsets {
        gdt: at(&raw const lavender_trampoline_gdt),
        gdtr: at(&raw const lavender_trampoline_gdtr),
        protected: at(&raw const lavender_trampoline_protected),
        far32: at(&raw const lavender_trampoline_far32),
        long: at(&raw const lavender_trampoline_long),
        far64: at(&raw const lavender_trampoline_far64),
        cr3: at(&raw const lavender_trampoline_cr3),
        stack: at(&raw const lavender_trampoline_stack),
        entry: at(&raw const lavender_trampoline_entry),
        argument: at(&raw const lavender_trampoline_argument),
        len: at(&raw const lavender_trampoline_end),
    }
}

#[derive(Clone, Copy, Debug)]
pub enum InstallError {
    Patch(PatchError),
    Map(paging::MapError),
}

impl core::fmt::Display for InstallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Patch(problem) => write!(f, "cannot patch the trampoline: {problem:?}"),
            Self::Map(problem) => write!(f, "cannot map the trampoline page: {problem:?}"),
        }
    }
}

/// Makes `page` (reserved for the trampoline at boot) executable and writes the trampoline
/// into it, patched for the page and Lavender's Rust AP entry. Once, at boot.
pub fn prepare_page(page: u64) -> Result<(), InstallError> {
    paging::make_executable(page).map_err(InstallError::Map)?;
    let offsets = offsets();
    let mut image = [0u8; trampoline::PAGE as usize];
    let len = offsets.len.min(image.len());
    // SAFETY: `lavender_trampoline_start..lavender_trampoline_end` is the template emitted
    // above in `.rodata` (`len` bytes, clamped to a page), initialized and never written.
    let template =
        unsafe { core::slice::from_raw_parts(&raw const lavender_trampoline_start, len) };
    image[..len].copy_from_slice(template);
    let entry = lavender_ap_entry as *const () as u64;
    trampoline::patch(&mut image, page, &offsets, entry).map_err(InstallError::Patch)?;
    // SAFETY: `page` was taken from the frame allocator at boot for the trampoline alone, is
    // identity-mapped and writable, and holds no Rust object; no core runs from it yet.
    unsafe {
        core::ptr::copy_nonoverlapping(image.as_ptr(), page as usize as *mut u8, image.len());
    }
    Ok(())
}

/// Sets the prepared trampoline in `page` up for a core that will enter Lavender's Rust AP
/// entry for slot `slot` on the stack ending at `stack_top`: only the page tables, the stack
/// and the argument change from one start to the next.
pub fn install(page: u64, slot: usize, stack_top: u64) -> Result<(), InstallError> {
    let params = Params {
        cr3: paging::root(),
        stack_top,
        argument: slot as u64,
    };
    let fields = trampoline::start_fields(&offsets(), &params).map_err(InstallError::Patch)?;
    for (offset, value) in fields {
        // SAFETY: `page` holds the trampoline `prepare_page` wrote (identity-mapped, writable,
        // no Rust object in it) and `start_fields` checked that `offset + 8` lies inside the
        // image. No core runs from the page now: one bring-up at a time (`smp::IN_FLIGHT`),
        // and the caller starts the core after these stores, which become visible in program
        // order (SDM Vol. 3A §10.2.2) before the later ICR write of the STARTUP IPI.
        unsafe {
            core::ptr::write_unaligned((page as usize + offset) as *mut u64, value);
        }
    }
    Ok(())
}
