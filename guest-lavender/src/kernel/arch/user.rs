//! The boundary with user mode: `SYSCALL` entry and `SYSRET` exit, the first entry of a thread
//! into ring 3 (`IRETQ`), and each core's system-call MSRs.
//!
//! `SYSCALL` (Intel SDM Vol. 2B) does not switch stacks. The entry stub finds the running
//! thread's kernel stack through this core's [`SyscallScratch`], reached with `SWAPGS`: the
//! kernel itself never uses GS, so GS.base stays 0 everywhere else (user mode cannot change it:
//! CR4.FSGSBASE is off) and IA32_KERNEL_GS_BASE holds the scratch block's address. The stub
//! swaps GS twice around the three instructions that need it, with interrupts masked by
//! IA32_FMASK; NMIs use their own IST stack (`gdt`), so nothing runs on the user's stack.

use core::cell::UnsafeCell;

use guest_lavender::descriptors::{MAX_CORE_SLOTS, STAR, USER_CODE_SELECTOR, USER_DATA_SELECTOR};
use x86_64::registers::model_specific::{Efer, EferFlags, KernelGsBase, LStar, Msr, SFMask};
use x86_64::registers::rflags::RFlags;
use x86_64::VirtAddr;

use crate::kernel::arch::gdt;

/// What the entry stub leaves on the kernel stack, lowest address first: the call number and
/// arguments as the program passed them, then the state `SYSRET` restores.
#[repr(C)]
#[derive(Debug)]
pub struct SyscallFrame {
    pub number: u64,
    pub arguments: [u64; 6],
    pub user_rflags: u64,
    pub user_rip: u64,
    pub user_rsp: u64,
}

/// Per core: where the entry stub finds the kernel stack, and keeps the user RSP meanwhile.
#[repr(C)]
struct SyscallScratch {
    /// Top of the running user thread's kernel stack (offset 0, used by the stub).
    kernel_rsp: u64,
    /// The user RSP while the stub switches stacks (offset 8).
    user_rsp: u64,
}

struct Scratch(UnsafeCell<SyscallScratch>);

// SAFETY: a slot's scratch block is written by the core running in the slot only: by
// `set_kernel_stack` from Rust (raw pointer, no reference kept) and by the entry stub through
// GS, which never runs while Rust code on the same core is writing it (interrupts are masked in
// the stub, and `set_kernel_stack` runs with interrupts off in the scheduler).
unsafe impl Sync for Scratch {}

static SCRATCH: [Scratch; MAX_CORE_SLOTS] = [const {
    Scratch(UnsafeCell::new(SyscallScratch {
        kernel_rsp: 0,
        user_rsp: 0,
    }))
}; MAX_CORE_SLOTS];

/// RFLAGS a thread starts user mode with: IF, and bit 1, which is always set.
const USER_START_RFLAGS: u64 = 0x202;

core::arch::global_asm!(
    ".pushsection .text.syscall, \"ax\"",
    ".global lavender_syscall_entry",
    "lavender_syscall_entry:",
    "    swapgs",
    "    mov gs:[8], rsp",
    "    mov rsp, gs:[0]",
    "    push qword ptr gs:[8]",
    "    swapgs",
    // Builds `SyscallFrame` from its last field down.
    "    push rcx",
    "    push r11",
    "    push r9",
    "    push r8",
    "    push r10",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rax",
    // The kernel stack top is 16-byte aligned and ten words were pushed: `call` leaves the
    // alignment the System V ABI expects.
    "    mov rdi, rsp",
    "    cld",
    "    call {dispatch}",
    // RAX holds the result. Drop the number and arguments, restore what SYSRET needs, and
    // return zero in the argument registers so no kernel value reaches user mode.
    "    add rsp, 7 * 8",
    "    pop r11",
    "    pop rcx",
    "    xor edi, edi",
    "    xor esi, esi",
    "    xor edx, edx",
    "    xor r8d, r8d",
    "    xor r9d, r9d",
    "    xor r10d, r10d",
    "    pop rsp",
    "    sysretq",
    ".popsection",
    dispatch = sym syscall_entry,
);

core::arch::global_asm!(
    ".pushsection .text.syscall, \"ax\"",
    // lavender_enter_user(rip: RDI, rsp: RSI, first argument: RDX, second: RCX)
    ".global lavender_enter_user",
    "lavender_enter_user:",
    "    cli",
    "    push {user_ss}",
    "    push rsi",
    "    push {rflags}",
    "    push {user_cs}",
    "    push rdi",
    "    mov rdi, rdx",
    "    mov rsi, rcx",
    "    xor eax, eax",
    "    xor ebx, ebx",
    "    xor ecx, ecx",
    "    xor edx, edx",
    "    xor ebp, ebp",
    "    xor r8d, r8d",
    "    xor r9d, r9d",
    "    xor r10d, r10d",
    "    xor r11d, r11d",
    "    xor r12d, r12d",
    "    xor r13d, r13d",
    "    xor r14d, r14d",
    "    xor r15d, r15d",
    "    iretq",
    ".popsection",
    user_ss = const USER_DATA_SELECTOR as u64,
    user_cs = const USER_CODE_SELECTOR as u64,
    rflags = const USER_START_RFLAGS,
);

extern "sysv64" {
    fn lavender_syscall_entry();
    fn lavender_enter_user(rip: u64, rsp: u64, first: u64, second: u64) -> !;
}

extern "sysv64" fn syscall_entry(frame: &mut SyscallFrame) -> u64 {
    // SYSCALL entered with interrupts off (FMASK clears IF) for the stack switch above. The
    // call itself runs with them on, like any kernel code on a thread's own stack, so a long
    // one (a thread's stack allocated and zeroed, a process's memory freed) never holds up
    // this core's interrupts: a core grant or revoke, an IPI. They go off again before the
    // stub restores the user stack pointer, where an interrupt must not land.
    x86_64::instructions::interrupts::enable();
    let result = crate::kernel::syscall::dispatch(frame);
    x86_64::instructions::interrupts::disable();
    result
}

/// Turns on `SYSCALL`/`SYSRET` (EFER.SCE) on the boot core. A core Lavender starts gets SCE
/// from the trampoline, with LME and NXE, in the EFER write it makes anyway (EFER accesses
/// exit to the hypervisor, so each one costs a bring-up time).
pub fn enable_syscall_on_boot_core() {
    // SAFETY: setting SCE enables the SYSCALL/SYSRET instructions and changes nothing else;
    // the other EFER bits are kept.
    unsafe { Efer::update(|flags| flags.insert(EferFlags::SYSTEM_CALL_EXTENSIONS)) };
}

/// Sets up `SYSCALL` on this core (slot `slot`): the selectors, the entry point, the RFLAGS
/// bits to clear on entry, and the scratch block for the stack switch. (EFER.SCE: see
/// [`enable_syscall_on_boot_core`].)
pub fn init_core(slot: usize) {
    // IF (no interrupt before the stack switch), TF, DF (the ABI's direction), AC.
    let masked = RFlags::INTERRUPT_FLAG
        | RFlags::TRAP_FLAG
        | RFlags::DIRECTION_FLAG
        | RFlags::ALIGNMENT_CHECK;
    let scratch = SCRATCH[slot].0.get() as u64;
    // SAFETY: the values follow the SDM's contract for SYSCALL/SYSRET: STAR names the GDT's
    // kernel and user selectors (`descriptors::STAR`, checked against the layout by a unit
    // test), LSTAR a canonical kernel address holding the entry stub, and KERNEL_GS_BASE this
    // slot's static scratch block, which the stub reaches only between its SWAPGS pairs.
    unsafe {
        Msr::new(0xc000_0081).write(STAR);
        LStar::write(VirtAddr::new(lavender_syscall_entry as *const () as u64));
        SFMask::write(masked);
        KernelGsBase::write(VirtAddr::new(scratch));
    }
}

/// Makes `top` the kernel stack this core switches to when its user thread enters the kernel:
/// by `SYSCALL` (the scratch block) and by interrupt or exception (TSS.RSP0).
pub fn set_kernel_stack(slot: usize, top: u64) {
    // SAFETY: this is the slot's own core, with interrupts off (the scheduler calls this), so
    // the entry stub cannot be reading the block; no reference to it exists.
    unsafe { (*SCRATCH[slot].0.get()).kernel_rsp = top };
    gdt::set_kernel_stack(slot, top);
}

/// Leaves the kernel for user mode at `rip` with stack `rsp` and RDI, RSI = `first`, `second`
/// (every other general register zero, interrupts on). The calling thread's kernel stack is
/// abandoned: the thread comes back to the kernel only by system call or interrupt, at the
/// top of that stack.
pub fn enter(rip: u64, rsp: u64, first: u64, second: u64) -> ! {
    // SAFETY: the caller (process) passes a `rip` and `rsp` inside the user window, checked,
    // so canonical (IRETQ to a non-canonical RIP would fault in the kernel); the thread's
    // address space is current and its kernel stack is in TSS.RSP0 (the scheduler set both
    // when it switched to the thread), so the first interrupt in user mode lands correctly.
    unsafe { lavender_enter_user(rip, rsp, first, second) }
}
