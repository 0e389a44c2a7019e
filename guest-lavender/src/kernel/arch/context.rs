//! Kernel thread contexts: stacks and the context switch.
//!
//! A switched-out thread's registers live on its own stack; its [`Context`] keeps only the
//! stack pointer. `lavender_context_switch` pushes the callee-saved registers (the System V
//! ABI's RBX, RBP, R12-R15; the caller has saved the rest), stores RSP in the old context,
//! loads the new one's and pops the same registers back. A new thread's stack is prepared to
//! look like a switched-out one whose return address is `lavender_thread_start`.
//!
//! A core that leaves while a thread runs switches from that thread to a frame built at the top
//! of a fresh stack, whose return address is `lavender_leave_start`: the way out skips the idle
//! loop it will never run again.

use alloc::boxed::Box;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_lavender::forced_thread::Resume;

use super::idt::ExceptionFrame;

core::arch::global_asm!(
    ".pushsection .text.context, \"ax\"",
    // lavender_context_switch(from: RDI = &from.saved_rsp, to: RSI = to's saved RSP)
    ".global lavender_context_switch",
    "lavender_context_switch:",
    "    push rbp",
    "    push rbx",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rdi], rsp",
    "    mov rsp, rsi",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    ret",
    // The first `ret` into a frame built by `leave` lands here, on a fresh stack, with the
    // slot in R12 and the thread in R13 (popped from that frame).
    ".global lavender_leave_start",
    "lavender_leave_start:",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    mov rdi, r12",
    "    mov rsi, r13",
    "    call lavender_leave_entry",
    "    ud2",
    // The first `ret` into a new thread lands here with RSP at the top word of its stack.
    // Align RSP for the call as the System V ABI requires and end frame-pointer walks.
    // The first `ret` into a frame built by `prepare_resume` lands here, with RSP at an
    // interrupt frame holding the registers of a thread that ran on a core taken by force:
    // the scheduler's bookkeeping of the switch runs first (with the frame as argument, on
    // an aligned stack below it), then the interrupt path's way out restores the registers
    // and `IRETQ`s to where the thread was.
    ".global lavender_resume_start",
    "lavender_resume_start:",
    "    mov rbx, rsp",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call lavender_resume_entry",
    "    mov rsp, rbx",
    "    jmp lavender_exception_return",
    ".global lavender_thread_start",
    "lavender_thread_start:",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    call lavender_thread_entry",
    "    ud2",
    ".popsection",
);

extern "sysv64" {
    fn lavender_context_switch(from: *const AtomicU64, to_rsp: u64);
    fn lavender_leave_start();
    fn lavender_resume_start();
    fn lavender_thread_start();
}

/// Called on a new thread's stack by `lavender_thread_start`.
#[no_mangle]
extern "sysv64" fn lavender_thread_entry() -> ! {
    crate::kernel::sched::thread_main()
}

/// Called by `lavender_resume_start` on the stack of a thread resumed from a forced core.
#[no_mangle]
extern "sysv64" fn lavender_resume_entry(frame: &mut ExceptionFrame) {
    crate::kernel::sched::resumed(frame.came_from_user_mode());
}

/// Called on the fresh stack by `lavender_leave_start`.
#[no_mangle]
extern "sysv64" fn lavender_leave_entry(slot: u64, thread: u64) -> ! {
    crate::kernel::sched::left_thread(slot as usize, thread as u16)
}

/// Registers the switch pushes: RBP, RBX, R12, R13, R14, R15.
const SAVED_REGISTERS: usize = 6;

/// 16 bytes, 16-byte aligned: the unit stacks are made of, so a stack's top is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct StackChunk([u64; 2]);

/// Written at the lowest address of every stack: a thread that overflows its stack overwrites
/// it first, and the scheduler finds out at the thread's next switch.
const CANARY: [u64; 2] = [0x4c41_5645_4e44_4552, 0x5354_4143_4b45_4e44];

/// A kernel stack on the heap. Its memory is not initialised (only the canary is written): only
/// the thread running on it reads and writes it, through RSP, each slot after storing to it.
/// Zeroing 32 KiB held every thread's start up some 275 µs under Bochs (a 16-byte store per
/// chunk, 50 instructions per microsecond).
pub struct Stack(Box<[MaybeUninit<StackChunk>]>);

impl Stack {
    /// A stack of `bytes` (rounded up to 16) with the canary at its bottom.
    pub fn new(bytes: usize) -> Self {
        let mut chunks = Box::new_uninit_slice(bytes.div_ceil(16).max(8));
        chunks[0].write(StackChunk(CANARY));
        Self(chunks)
    }

    /// Whether the canary at the bottom is untouched (no overflow seen yet).
    pub fn intact(&self) -> bool {
        // SAFETY: chunk 0 was written with the canary when the stack was made; a thread that
        // overflowed stored other bytes there, initialised all the same.
        unsafe { self.0[0].assume_init_read() }.0 == CANARY
    }

    /// The lowest byte above the canary.
    pub fn bottom(&self) -> u64 {
        self.0.as_ptr() as u64 + 16
    }

    /// One past the highest byte, 16-byte aligned.
    pub fn top(&self) -> u64 {
        self.0.as_ptr_range().end as u64
    }

    /// Stores `value` in the stack's 8-byte word number `at` (0 at the bottom).
    fn write_word(&mut self, at: usize, value: u64) {
        assert!(at < self.0.len() * 2, "stack word {at} out of range");
        // SAFETY: word `at` lies inside this stack's chunks (checked above), which this
        // exclusive borrow makes ours; a chunk is two naturally aligned u64 words.
        unsafe { self.0.as_mut_ptr().cast::<u64>().add(at).write(value) };
    }
}

/// The saved stack pointer of a thread (or of a core's idle loop) that is not running.
pub struct Context {
    saved_rsp: AtomicU64,
}

impl Context {
    pub const fn new() -> Self {
        Self {
            saved_rsp: AtomicU64::new(0),
        }
    }

    /// Makes this context start a new thread on `stack`: the first switch to it "returns" into
    /// `lavender_thread_start` with the stack's top word as its frame.
    pub fn prepare(&self, stack: &mut Stack) {
        let top = stack.top();
        let frame = start_frame(lavender_thread_start, [0; 2]);
        let words = stack.0.len() * 2;
        for (index, value) in frame.into_iter().enumerate() {
            stack.write_word(words - FRAME_WORDS + index, value);
        }
        let rsp = top - 8 * FRAME_WORDS as u64;
        self.saved_rsp.store(rsp, Ordering::Release);
    }
}

impl Context {
    /// Makes this context resume a thread from a forced core's registers ([`Resume`]): the
    /// interrupt frame goes just below `resume.frame_top` on `stack`, the thread's own, under it
    /// a switch frame whose return address is `lavender_resume_start`, so the next switch to
    /// this context returns from an interrupt into the thread. `false` (nothing written) when
    /// the frames do not fit between the stack's canary and its top.
    ///
    /// Contract (kept by `kernel::sched`): the thread is not running on any core and no
    /// context switch to it is in progress.
    pub fn prepare_resume(&self, stack: &mut Stack, resume: &Resume) -> bool {
        let switch = start_frame(lavender_resume_start, [0; 2]);
        // The switch frame's top word (a zero "return address" for stack walkers) is not
        // needed here: the interrupt frame sits right above the return address.
        let switch = &switch[..FRAME_WORDS - 1];
        let base = stack.0.as_ptr() as u64;
        let words = switch.len() + resume.frame.len();
        let Some(low) = resume.frame_top.checked_sub(8 * words as u64) else {
            return false;
        };
        // Above the canary's chunk, at or below the top, 8-byte aligned.
        if low < base + 16 || resume.frame_top > stack.top() || low % 8 != 0 {
            return false;
        }
        let first = ((low - base) / 8) as usize;
        for (index, value) in switch.iter().chain(&resume.frame).enumerate() {
            stack.write_word(first + index, *value);
        }
        self.saved_rsp.store(low, Ordering::Release);
        true
    }
}

/// Words of a frame that `lavender_context_switch` "returns" into at the top of a fresh stack:
/// the saved registers, the return address and a zero word above it.
const FRAME_WORDS: usize = SAVED_REGISTERS + 2;

/// Such a frame, lowest address first: R15, R14, R13, R12, RBX, RBP (all zero but R12 and R13,
/// which carry `arguments` to `start`), `start` as the return address, then a zero "return
/// address" above it, for stack walkers.
fn start_frame(start: unsafe extern "sysv64" fn(), arguments: [u64; 2]) -> [u64; FRAME_WORDS] {
    let [r12, r13] = arguments;
    [0, 0, r13, r12, 0, 0, start as *const () as u64, 0]
}

/// Saves the running code's context in `from` and continues `to`. Returns when some core
/// switches back to `from`.
///
/// Contract (kept by `kernel::sched`, the only caller): interrupts are off; `from` is the
/// context of the code running now on this core; `to` is not running on any core and was
/// either prepared with [`Context::prepare`] or saved by an earlier switch, and its stack is
/// still allocated.
pub fn switch(from: &Context, to: &Context) {
    let to_rsp = to.saved_rsp.load(Ordering::Acquire);
    // SAFETY: by the contract above `to_rsp` points at a frame this module built or saved,
    // on a live stack no other core runs on, so popping six registers and returning resumes
    // exactly that code; `from.saved_rsp` is a live atomic the asm writes once with a plain
    // aligned store (atomic on x86-64). The asm preserves every callee-saved register, and
    // the caller-saved ones are declared clobbered by the `extern "sysv64"` call.
    unsafe { lavender_context_switch(&from.saved_rsp, to_rsp) };
}

/// Saves the running thread's context in `from`, like [`switch`], but continues on the stack
/// ending at `stack_top` in `sched::left_thread(slot, thread)`, which never returns. Returns,
/// like [`switch`], when some core switches back to `from`.
///
/// Contract (kept by `kernel::sched`): interrupts are off; `from` is the context of the code
/// running now on this core (thread `thread`), which nothing resumes before
/// `sched::left_thread` queues it; `stack_top` is the 16-byte aligned top of a live stack
/// that no code uses any more (the leaving core's idle stack: its idle loop never runs again).
pub fn leave(from: &Context, stack_top: u64, slot: usize, thread: u16) {
    let frame = start_frame(lavender_leave_start, [slot as u64, u64::from(thread)]);
    let to_rsp = stack_top - 8 * frame.len() as u64;
    // SAFETY: by the contract above `stack_top` is the aligned top of a live stack nothing
    // uses, so the eight words below it are ours to write, and switching to them runs
    // `lavender_leave_start` there; `from.saved_rsp` is written once, as in `switch`, and the
    // saved frame resumes exactly the caller when a later switch returns into it.
    unsafe {
        core::ptr::copy_nonoverlapping(frame.as_ptr(), to_rsp as *mut u64, frame.len());
        lavender_context_switch(&from.saved_rsp, to_rsp);
    }
}
