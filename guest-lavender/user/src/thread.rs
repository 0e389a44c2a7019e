//! Threads of this process. A thread runs `fn(u64) -> u64` on a stack from a fixed pool (the
//! program has no heap); [`JoinHandle::join`] waits for it, returns its value and gives the
//! stack back.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lavender_abi::Error;

use crate::sys;

/// Most threads (besides the first) alive at once.
pub const MAX_THREADS: usize = 64;
const STACK_BYTES: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; STACK_BYTES]>);

// SAFETY: a stack is only ever used as raw memory by the one thread it is lent to; Rust code
// here only takes its address.
unsafe impl Sync for Stack {}

static STACKS: [Stack; MAX_THREADS] =
    [const { Stack(UnsafeCell::new([0; STACK_BYTES])) }; MAX_THREADS];
static LENT: [AtomicBool; MAX_THREADS] = [const { AtomicBool::new(false) }; MAX_THREADS];
/// What each stack's thread runs: the function's address and its argument.
static START: [(AtomicU64, AtomicU64); MAX_THREADS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_THREADS];

core::arch::global_asm!(
    ".pushsection .text.lavender_thread_entry, \"ax\"",
    ".global lavender_thread_entry",
    // The kernel starts a new thread here with RSP = the stack top (16-byte aligned) and the
    // stack's index in RDI.
    "lavender_thread_entry:",
    "    xor ebp, ebp",
    "    call {run}",
    "    ud2",
    ".popsection",
    run = sym run,
);

extern "sysv64" {
    fn lavender_thread_entry();
}

extern "sysv64" fn run(stack: u64) -> ! {
    let (function, argument) = &START[stack as usize % MAX_THREADS];
    let function = function.load(Ordering::Acquire);
    // SAFETY: `spawn` stored a `fn(u64) -> u64` in this slot before starting the thread
    // (Release, paired with the Acquire above); fn pointers and u64 have the same size.
    let function: fn(u64) -> u64 = unsafe { core::mem::transmute(function as usize) };
    sys::thread_exit(function(argument.load(Ordering::Relaxed)))
}

/// A started thread; [`JoinHandle::join`] it to get its value and free its stack.
#[must_use = "a thread that is never joined keeps its stack"]
pub struct JoinHandle {
    id: u64,
    stack: usize,
}

impl JoinHandle {
    /// The kernel's id of the thread.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the thread to end and returns its value.
    pub fn join(self) -> Result<u64, Error> {
        let value = sys::thread_join(self.id)?;
        // The thread has exited: nothing runs on its stack any more.
        LENT[self.stack].store(false, Ordering::Release);
        Ok(value)
    }
}

/// Starts a thread running `function(argument)`.
pub fn spawn(function: fn(u64) -> u64, argument: u64) -> Result<JoinHandle, Error> {
    let stack = LENT
        .iter()
        .position(|lent| {
            lent.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
        .ok_or(Error::NoThreads)?;
    START[stack].1.store(argument, Ordering::Relaxed);
    START[stack]
        .0
        .store(function as *const () as u64, Ordering::Release);
    let top = STACKS[stack].0.get() as u64 + STACK_BYTES as u64;
    match sys::thread_spawn(lavender_thread_entry as *const () as u64, top, stack as u64) {
        Ok(id) => Ok(JoinHandle { id, stack }),
        Err(error) => {
            LENT[stack].store(false, Ordering::Release);
            Err(error)
        }
    }
}
