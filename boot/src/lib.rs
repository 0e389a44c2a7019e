//! Early boot of the Tandem hypervisor image.
//!
//! * The **multiboot2 header** GRUB 2 looks for (Multiboot2 spec §3.1.1).
//! * `_start`, the **32-bit entry** GRUB jumps to in protected mode with paging off
//!   (EAX = multiboot2 magic, EBX = physical address of the boot information). It
//!   identity-maps the first 4 GiB with 2 MiB pages, turns on long mode (Intel SDM
//!   Vol. 3A §10.8.5 "Initializing IA-32e Mode") and calls the hypervisor's
//!   `hv_boot_main(magic, info)` on a boot stack.
//! * The **AP trampoline**: real-mode code that an application processor runs after a
//!   STARTUP IPI (SDM Vol. 3A §9.4.4). It is copied below 1 MiB at run time, switches
//!   16 -> 32 -> 64 bit, reuses the BSP's page tables and jumps to a Rust entry with a
//!   per-core stack.
//!
//! Everything here runs before Rust can; the assembly is the whole of it. The one
//! Rust function that touches memory directly ([`install_ap_trampoline`]) is `unsafe`
//! and says why it is sound.
#![no_std]

/// Physical address the AP trampoline is copied to. A STARTUP IPI starts the AP in
/// real mode at `vector << 12` (SDM Vol. 3A §9.4.4.1), so it must be 4 KiB aligned and
/// below 1 MiB; 0x8000 lies in conventional memory every PC BIOS leaves free.
pub const AP_TRAMPOLINE_BASE: usize = 0x8000;

/// Size of the boot stack the BSP runs on (for good: core 0 never switches stacks).
/// Building a Linux guest needs more than 64 KiB, and an overflow runs silently into the
/// page tables just below (the top entries of `boot_pd`: the IOAPIC's page), hence the margin.
#[cfg(target_os = "none")]
const BOOT_STACK_SIZE: usize = 256 * 1024;

/// The multiboot2 magic the boot loader passes in EAX (Multiboot2 spec §3.3).
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

// The assembly is built for the bare-metal target only: on the host (unit tests of the
// workspace) its `_start` would clash with the C runtime's.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .set MB2_MAGIC, 0xe85250d6
    .set MB2_ARCH_I386, 0

    .section .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header_start
    .long -(MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header_start))
    /* end tag */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
    .balign 16
boot_stack_bottom:
    .skip {boot_stack_size}
boot_stack_top:

    .section .rodata.boot, "a"
    .balign 16
    /* Flat GDT for long mode: 0x08 = 64-bit code, 0x10 = data (SDM Vol. 3A §3.4.5). */
boot_gdt64:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt64_end:
    .global boot_gdt64_pointer
boot_gdt64_pointer:
    .short boot_gdt64_end - boot_gdt64 - 1
    .quad boot_gdt64

msg_no_long_mode:
    .asciz "[hv] FATAL: this CPU has no 64-bit long mode; the Tandem hypervisor needs x86-64 with VMX. Halting.\r\n"

    .section .text.boot32, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl $boot_stack_top, %esp
    /* Keep the loader's magic and info pointer; CPUID clobbers EAX..EDX. */
    movl %eax, %edi
    movl %ebx, %esi

    /* Long mode available? CPUID.80000001H:EDX[29] (SDM Vol. 2A, CPUID). */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb no_long_mode
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx
    jnc no_long_mode

    /* Identity map 0..4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs. */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax              /* present | writable | 2 MiB page */
    movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    /* CR4.PAE, CR3, EFER.LME, then CR0.PG activates IA-32e mode (SDM Vol. 3A §10.8.5). */
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0

    lgdt boot_gdt64_pointer
    ljmp $0x08, $long_mode_start

no_long_mode:
    movl $msg_no_long_mode, %esi
3:
    movb (%esi), %bl
    testb %bl, %bl
    jz 6f
    movl $100000, %ecx
4:
    movw $0x2fd, %dx             /* COM2 line status: wait for an empty transmitter */
    inb %dx, %al
    testb $0x20, %al
    jnz 5f
    loop 4b
5:
    movw $0x2f8, %dx
    movb %bl, %al
    outb %al, %dx
    incl %esi
    jmp 3b
6:
    cli
    hlt
    jmp 6b

    .code64
long_mode_start:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    /* Upper halves of the GPRs are undefined after the mode switch: zero-extend. */
    movl %edi, %edi
    movl %esi, %esi
    call hv_boot_main
7:
    cli
    hlt
    jmp 7b

    /* ---------------------------------------------------------------------- */
    /* AP trampoline: copied to AP_TRAMPOLINE_BASE, entered in real mode at   */
    /* CS:IP = (BASE >> 4):0. Addresses are computed relative to its base.    */
    /* ---------------------------------------------------------------------- */
    .section .rodata.ap_trampoline, "a"
    .set TRAMP, {tramp_base}
    .balign 4096
    .global ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_pointer - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(TRAMP + ap_protected_mode - ap_trampoline_start)

    .code32
ap_protected_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl (TRAMP + ap_param_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(TRAMP + ap_long_mode - ap_trampoline_start)

    .code64
ap_long_mode:
    movq (TRAMP + ap_param_stack_top - ap_trampoline_start), %rsp
    /* Switch to the hypervisor's own GDT so the low page can be reused. */
    lgdt boot_gdt64_pointer
    leaq 8f(%rip), %rax
    pushq $0x08
    pushq %rax
    lretq
8:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq (TRAMP + ap_param_cpu_index - ap_trampoline_start), %rdi
    movq (TRAMP + ap_param_entry - ap_trampoline_start), %rax
    call *%rax
9:
    cli
    hlt
    jmp 9b

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
    .quad 0x00af9a000000ffff     /* 0x18: 64-bit code */
ap_gdt_end:
ap_gdt_pointer:
    .short ap_gdt_end - ap_gdt - 1
    .long TRAMP + ap_gdt - ap_trampoline_start

    /* Launch parameters, filled in by install_ap_trampoline (layout = ApLaunch). */
    .balign 8
    .global ap_trampoline_params
ap_trampoline_params:
ap_param_cr3:       .quad 0
ap_param_stack_top: .quad 0
ap_param_entry:     .quad 0
ap_param_cpu_index: .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
    .text
"#,
    boot_stack_size = const BOOT_STACK_SIZE,
    tramp_base = const AP_TRAMPOLINE_BASE,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_params: u8;
    static ap_trampoline_end: u8;
}

/// What an application processor needs to enter the hypervisor.
/// Field order matches `ap_trampoline_params` in the assembly above.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ApLaunch {
    /// Physical address of the PML4 the AP switches to (the BSP's).
    pub cr3: u64,
    /// Top of the AP's own stack (16-byte aligned).
    pub stack_top: u64,
    /// 64-bit entry, called with the CPU index in RDI on the stack above.
    pub entry: extern "C" fn(cpu_index: u64) -> !,
    /// Index of the CPU being started, in the hypervisor's per-CPU table.
    pub cpu_index: u64,
}

/// Copies the AP trampoline to [`AP_TRAMPOLINE_BASE`] with `launch` as its parameters
/// and returns the STARTUP IPI vector that makes an AP execute it.
///
/// # Safety
/// The page at `AP_TRAMPOLINE_BASE` must be identity-mapped, writable, hold nothing
/// anyone still needs, and no AP may be running the trampoline while it is rewritten
/// (start APs one at a time and wait for each to leave it).
#[cfg(target_os = "none")]
pub unsafe fn install_ap_trampoline(launch: &ApLaunch) -> u8 {
    // SAFETY: the three symbols are labels of one contiguous section emitted above,
    // in order start <= params < end, so the offsets are in bounds and non-negative.
    let (start, params_offset, len) = unsafe {
        let start = &raw const ap_trampoline_start;
        let params = &raw const ap_trampoline_params;
        let end = &raw const ap_trampoline_end;
        (
            start,
            params.offset_from(start) as usize,
            end.offset_from(start) as usize,
        )
    };
    let destination = AP_TRAMPOLINE_BASE as *mut u8;
    // SAFETY: the caller guarantees the destination page is free, mapped and not in use;
    // the trampoline is far smaller than a page (asserted below in debug builds), and the
    // parameter block is 8-byte aligned inside it (`.balign 8` above).
    unsafe {
        debug_assert!(len <= 4096);
        core::ptr::copy_nonoverlapping(start, destination, len);
        core::ptr::write_volatile(destination.add(params_offset).cast::<ApLaunch>(), *launch);
    }
    (AP_TRAMPOLINE_BASE >> 12) as u8
}
