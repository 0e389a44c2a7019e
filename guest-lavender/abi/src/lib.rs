//! The system-call ABI between the Lavender kernel and its user programs (ring 3).
//!
//! **Instruction and registers.** A program enters the kernel with `SYSCALL` (Intel SDM
//! Vol. 2B, "SYSCALL"): the call number in RAX, up to six arguments in RDI, RSI, RDX, R10,
//! R8, R9 (R10 instead of RCX, which `SYSCALL` overwrites with the return address). The result
//! comes back in RAX. The kernel preserves RBX, RBP, RSP and R12-R15; it returns zero in RDI,
//! RSI, RDX, R8, R9 and R10 (so no kernel value leaks to user mode), and RCX and R11 hold what
//! `SYSCALL` put there (return address and RFLAGS).
//!
//! **Results.** A value below 2^63 is a success; `-(error code)` is a failure
//! ([`decode_result`]).
//!
//! **Address space.** Every process has its own page tables. User mode owns
//! `USER_BASE..USER_END` (PML4 slot 1, 512 GiB to 1 TiB); everything else is the kernel's and
//! not accessible from ring 3. Every pointer a program passes must lie in that window, mapped
//! and user-accessible (writable too when the kernel writes through it), or the call fails with
//! [`Error::BadAddress`]; the kernel never dereferences a user pointer directly.
//!
//! **Program entry.** The image (a static position-independent ELF) is loaded at
//! [`IMAGE_BASE`]. The first thread starts at its entry point with RSP = [`MAIN_STACK_TOP`]
//! minus the argument string (16-byte aligned), RDI = the address of the argument string
//! (UTF-8, not NUL-terminated) and RSI = its length. A thread made by [`Syscall::ThreadSpawn`]
//! starts at the given entry with RSP = the given stack top and RDI = the given argument.
#![no_std]

/// First byte user mode may use: PML4 slot 1 (the kernel lives in slot 0).
pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
/// One past the last byte user mode may use (end of PML4 slot 1).
pub const USER_END: u64 = 0x0000_0100_0000_0000;
/// Where the kernel loads a program image.
pub const IMAGE_BASE: u64 = USER_BASE;
/// Top of the first thread's stack; the page above it stays unmapped as a guard.
pub const MAIN_STACK_TOP: u64 = USER_END - 0x1000;
/// Size of the first thread's stack.
pub const MAIN_STACK_BYTES: u64 = 64 * 1024;
/// Most bytes one [`Syscall::Write`] takes; longer writes fail with [`Error::TooLong`].
pub const MAX_WRITE_BYTES: u64 = 4096;
/// Longest argument string the kernel passes to a program.
pub const MAX_ARGUMENT_BYTES: usize = 1024;

/// System-call numbers (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Syscall {
    /// `exit(status)`: ends the whole process; its other threads stop at their next kernel
    /// entry. Does not return.
    Exit = 0,
    /// `write(stream, address, length)`: one line (or part of one) to the console, tagged with
    /// the process. Stream 1 is standard output, 2 standard error. Returns the bytes taken.
    Write = 1,
    /// `thread_spawn(entry, stack_top, argument)`: a new thread of this process. The stack
    /// must be 16-byte aligned, inside the user window and mapped writable. Returns its id.
    ThreadSpawn = 2,
    /// `thread_exit(value)`: ends the calling thread; `value` goes to its joiner. Does not
    /// return.
    ThreadExit = 3,
    /// `thread_join(id)`: waits until thread `id` of this process ends; returns its value.
    /// Each thread can be joined once.
    ThreadJoin = 4,
    /// `yield()`: lets another thread run.
    Yield = 5,
    /// `sleep(microseconds)`: blocks for at least that long (the scheduler's tick is the
    /// granularity).
    Sleep = 6,
    /// `clock()`: microseconds since Lavender booted (TSC time).
    Clock = 7,
    /// `core_id()`: the hypervisor's index of the core the caller runs on.
    CoreId = 8,
    /// `process_id()`: the caller's process id.
    ProcessId = 9,
}

impl Syscall {
    pub const ALL: [Syscall; 10] = [
        Syscall::Exit,
        Syscall::Write,
        Syscall::ThreadSpawn,
        Syscall::ThreadExit,
        Syscall::ThreadJoin,
        Syscall::Yield,
        Syscall::Sleep,
        Syscall::Clock,
        Syscall::CoreId,
        Syscall::ProcessId,
    ];

    /// The call numbered `number`, if there is one.
    pub fn from_number(number: u64) -> Option<Syscall> {
        Self::ALL.into_iter().find(|call| *call as u64 == number)
    }
}

/// Why a system call failed (returned as `-(code)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Error {
    /// RAX names no system call.
    UnknownSyscall = 1,
    /// A pointer is outside the user window, unmapped, or not writable where it must be.
    BadAddress = 2,
    /// An argument is out of its range (bad stream, misaligned stack, ...).
    InvalidArgument = 3,
    /// No thread could be created (the kernel's thread table is full).
    NoThreads = 4,
    /// No joinable thread with this id in this process.
    NoSuchThread = 5,
    /// A write longer than [`MAX_WRITE_BYTES`].
    TooLong = 6,
}

impl Error {
    pub const ALL: [Error; 6] = [
        Error::UnknownSyscall,
        Error::BadAddress,
        Error::InvalidArgument,
        Error::NoThreads,
        Error::NoSuchThread,
        Error::TooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Error::UnknownSyscall => "unknown system call",
            Error::BadAddress => "bad address",
            Error::InvalidArgument => "invalid argument",
            Error::NoThreads => "no thread available",
            Error::NoSuchThread => "no such thread",
            Error::TooLong => "too long",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the kernel puts in RAX for `result`.
pub fn encode_result(result: Result<u64, Error>) -> u64 {
    match result {
        Ok(value) => value & (u64::MAX >> 1),
        Err(error) => (error as u64).wrapping_neg(),
    }
}

/// What RAX after a system call means. A negative value that names no [`Error`] (a kernel
/// newer than the program) reads as [`Error::InvalidArgument`].
pub fn decode_result(rax: u64) -> Result<u64, Error> {
    if rax >> 63 == 0 {
        return Ok(rax);
    }
    let code = rax.wrapping_neg();
    Err(Error::ALL
        .into_iter()
        .find(|error| *error as u64 == code)
        .unwrap_or(Error::InvalidArgument))
}

/// Whether `start..start + length` lies inside the user window (empty ranges included).
pub fn in_user_window(start: u64, length: u64) -> bool {
    start >= USER_BASE && start.checked_add(length).is_some_and(|end| end <= USER_END)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip() {
        for value in [0, 1, 17_984, u64::MAX >> 1] {
            assert_eq!(decode_result(encode_result(Ok(value))), Ok(value));
        }
        for error in Error::ALL {
            assert_eq!(decode_result(encode_result(Err(error))), Err(error));
        }
        assert_eq!(decode_result(u64::MAX - 99), Err(Error::InvalidArgument));
    }

    #[test]
    fn syscall_numbers_are_unique_and_dense() {
        for (index, call) in Syscall::ALL.into_iter().enumerate() {
            assert_eq!(call as u64, index as u64);
            assert_eq!(Syscall::from_number(index as u64), Some(call));
        }
        assert_eq!(Syscall::from_number(Syscall::ALL.len() as u64), None);
        assert_eq!(Syscall::from_number(u64::MAX), None);
    }

    #[test]
    fn the_user_window() {
        assert!(in_user_window(USER_BASE, 0));
        assert!(in_user_window(USER_END - 8, 8));
        assert!(!in_user_window(USER_END - 8, 9));
        assert!(!in_user_window(USER_BASE - 1, 1));
        assert!(!in_user_window(0x20_0000, 16), "kernel memory");
        assert!(!in_user_window(u64::MAX - 3, 8), "wraps around");
        const { assert!(MAIN_STACK_TOP % 16 == 0 && MAIN_STACK_TOP < USER_END) };
        assert!(in_user_window(
            MAIN_STACK_TOP - MAIN_STACK_BYTES,
            MAIN_STACK_BYTES
        ));
    }
}
