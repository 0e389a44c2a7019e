//! The system calls (see [`lavender_abi`] for the register convention), one function each.

use core::arch::asm;

use lavender_abi::{decode_result, Error, Syscall};

/// Enters the kernel with system call `number` and up to three arguments; returns RAX.
fn raw_number(number: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let rax: u64;
    // SAFETY: SYSCALL enters the Lavender kernel, which validates every argument (pointers
    // included) and preserves RBX, RBP, RSP and R12-R15 (lavender_abi). Every register it
    // may change is declared as an output here, and without `nomem` the compiler assumes the
    // call reads and writes memory, as `write` and `thread_spawn` do.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => rax,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => _,
            lateout("r10") _,
            lateout("r8") _,
            lateout("r9") _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    rax
}

fn raw(call: Syscall, a0: u64, a1: u64, a2: u64) -> u64 {
    raw_number(call as u64, a0, a1, a2)
}

fn call(call: Syscall, a0: u64, a1: u64, a2: u64) -> Result<u64, Error> {
    decode_result(raw(call, a0, a1, a2))
}

/// System call `number` with three arguments, whatever they are: for programs that test the
/// kernel's checks (the `hostile` program).
pub fn raw_call(number: u64, a0: u64, a1: u64, a2: u64) -> Result<u64, Error> {
    decode_result(raw_number(number, a0, a1, a2))
}

/// Ends the process with `status`.
pub fn exit(status: i32) -> ! {
    raw(Syscall::Exit, status as u32 as u64, 0, 0);
    unreachable!("exit returned")
}

/// Writes `bytes` to `stream` (1 = standard output, 2 = standard error).
pub fn write(stream: u64, bytes: &[u8]) -> Result<u64, Error> {
    call(
        Syscall::Write,
        stream,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
    )
}

/// A new thread at `entry` on the stack whose top is `stack_top`, with `argument` in RDI.
/// (Programs use [`crate::thread::spawn`], which manages the stacks.)
pub fn thread_spawn(entry: u64, stack_top: u64, argument: u64) -> Result<u64, Error> {
    call(Syscall::ThreadSpawn, entry, stack_top, argument)
}

/// Ends the calling thread with `value` for its joiner.
pub fn thread_exit(value: u64) -> ! {
    raw(Syscall::ThreadExit, value, 0, 0);
    unreachable!("thread_exit returned")
}

/// Waits for thread `id` to end; its value.
pub(crate) fn thread_join(id: u64) -> Result<u64, Error> {
    call(Syscall::ThreadJoin, id, 0, 0)
}

pub fn yield_now() {
    raw(Syscall::Yield, 0, 0, 0);
}

/// Blocks for at least `microseconds`.
pub fn sleep_us(microseconds: u64) {
    raw(Syscall::Sleep, microseconds, 0, 0);
}

/// Microseconds since Lavender booted.
pub fn clock_us() -> u64 {
    raw(Syscall::Clock, 0, 0, 0)
}

/// The time-stamp counter (Intel SDM Vol. 3B §18.17): the host's, which Linux reads alike
/// (the hypervisor does not offset it), so a time Lavender sends Linux can compare.
pub fn tsc() -> u64 {
    // SAFETY: `RDTSC` only reads the counter into EDX:EAX; Lavender keeps CR4.TSD clear, so
    // user mode may execute it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The hypervisor's index of the core this thread runs on right now.
pub fn core_id() -> u64 {
    raw(Syscall::CoreId, 0, 0, 0)
}

pub fn process_id() -> u64 {
    raw(Syscall::ProcessId, 0, 0, 0)
}

/// `window_buffer()`: maps this process's bulk extent of the window shared with Linux at
/// [`lavender_abi::WINDOW_BUFFER_BASE`]; its length, 0 when there is none. Programs use
/// [`crate::fs::WindowBuffer`].
pub fn window_buffer() -> u64 {
    raw(Syscall::WindowBuffer, 0, 0, 0)
}

/// `delegate(request)`: a file system call run by Linux (see [`lavender_abi::Delegation`]);
/// its value or the Linux errno. Programs use [`crate::fs`].
pub fn delegate(request: &lavender_abi::Delegation) -> Result<u64, u16> {
    let bytes = request.to_bytes();
    lavender_abi::decode_delegated(raw(Syscall::Delegate, bytes.as_ptr() as u64, 0, 0))
}
