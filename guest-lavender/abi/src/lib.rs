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
/// Where [`Syscall::WindowBuffer`] maps the process's bulk extent of the shared data window:
/// half-way into the user window, far from the image and the stacks.
pub const WINDOW_BUFFER_BASE: u64 = USER_BASE + (USER_END - USER_BASE) / 2;
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
    /// `delegate(request)`: runs a file system call on Linux for this process (see
    /// [`Delegation`]). Unlike the other calls, a failure is `-(Linux errno)`: decode it with
    /// [`decode_delegated`].
    Delegate = 10,
    /// `window_buffer()`: maps this process's bulk extent of the data window Lavender shares
    /// with Linux at [`WINDOW_BUFFER_BASE`], readable and writable, and returns its
    /// length; 0 when there is none (no window shared with Linux, one too small for bulk
    /// extents, or no connection free). A delegated call whose buffer lies inside it (8-byte
    /// aligned) moves no bytes through the kernel: Linux reads or writes them in place. It
    /// holds nothing of another process (zeroed when one mapped it before). A later call
    /// returns the same mapping.
    WindowBuffer = 11,
}

impl Syscall {
    pub const ALL: [Syscall; 12] = [
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
        Syscall::Delegate,
        Syscall::WindowBuffer,
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

/// What [`Syscall::Delegate`]'s one argument points to (64 bytes, little-endian, 8-aligned).
///
/// `number` is a Linux x86-64 system-call number of the delegated set (`vmcall_proto`'s
/// `delegation::call`), `args` its scalar arguments. `input` (paths, data to write) is
/// copied to Linux; Linux writes at most `output_length` bytes to `output` (read data, stat
/// records, directory entries) and the call returns how many. One call moves at most
/// [`MAX_DELEGATED_BYTES`] in each direction; longer reads and writes are done in part (the
/// returned count says how much), longer paths fail with `ENAMETOOLONG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delegation {
    pub number: u32,
    /// Bit 0: continuation (keep this process's Linux-side context after the call).
    pub flags: u32,
    pub args: [u64; 3],
    pub input: u64,
    pub input_length: u64,
    pub output: u64,
    pub output_length: u64,
}

impl Delegation {
    pub const SIZE: usize = 64;
    pub const CONTINUATION: u32 = 1;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&self.number.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        let words = [
            self.args[0],
            self.args[1],
            self.args[2],
            self.input,
            self.input_length,
            self.output,
            self.output_length,
        ];
        for (chunk, word) in out[8..].chunks_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        let word = |index: usize| {
            let mut value = [0u8; 8];
            value.copy_from_slice(&bytes[8 + 8 * index..16 + 8 * index]);
            u64::from_le_bytes(value)
        };
        Self {
            number: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            flags: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            args: [word(0), word(1), word(2)],
            input: word(3),
            input_length: word(4),
            output: word(5),
            output_length: word(6),
        }
    }
}

/// Most bytes one delegated call moves each way (a lower limit: the kernel may take more).
pub const MAX_DELEGATED_BYTES: u64 = 16 * 1024;

/// What RAX after [`Syscall::Delegate`] means: a value, or the Linux errno (1..=4095).
pub fn decode_delegated(rax: u64) -> Result<u64, u16> {
    let signed = rax as i64;
    if signed >= 0 {
        Ok(rax)
    } else if signed >= -4095 {
        Err(signed.unsigned_abs() as u16)
    } else {
        Err(5) // EIO: not a result the kernel gives
    }
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
    fn delegation_round_trips() {
        let request = Delegation {
            number: 257,
            flags: Delegation::CONTINUATION,
            args: [0o101, 0o644, 3],
            input: USER_BASE + 8,
            input_length: 12,
            output: USER_BASE + 4096,
            output_length: 4096,
        };
        assert_eq!(Delegation::from_bytes(&request.to_bytes()), request);
        assert_eq!(decode_delegated(17), Ok(17));
        assert_eq!(decode_delegated(2u64.wrapping_neg()), Err(2));
        assert_eq!(decode_delegated(5000u64.wrapping_neg()), Err(5));
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
