//! Bulk copies and fills of memory Rust does not own alone: a process's pages (its other threads
//! may write them meanwhile) and the data window Linux shares (the agent writes it).
//!
//! One `REP MOVSQ` for the whole words, one `REP MOVSB` for the tail (Intel SDM Vol. 2B,
//! MOVS/REP). Two reasons for a string instruction rather than a loop: the copy is opaque to
//! the compiler, so bytes that change under it are no data race in Rust's model, only some
//! value of each byte; and an emulator counts each iteration of a string instruction as one
//! instruction, eight bytes at a time, where a byte loop costs four or more per byte (Bochs
//! runs 50 instructions per microsecond of virtual time).

use core::arch::asm;

use vmcall_proto::region::{BufferRef, DataWindow, WindowError};

/// Copies `len` bytes from `source` to `destination`.
///
/// # Safety
/// `source..source + len` must be readable and `destination..destination + len` writable
/// memory that no Rust reference covers while the copy runs, and the two must not overlap.
pub unsafe fn copy_bytes(destination: *mut u8, source: *const u8, len: usize) {
    // SAFETY: the caller vouches for both ranges; the string instructions touch exactly
    // them (RCX counts, RSI/RDI advance upwards: DF is clear, as the System V ABI requires at
    // every call and every kernel entry keeps it).
    unsafe {
        asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) len % 8,
            inout("rcx") len / 8 => _,
            inout("rsi") source => _,
            inout("rdi") destination => _,
            options(nostack, preserves_flags),
        );
    }
}

/// Zeroes `len` bytes at `destination` (`REP STOSQ`, then `REP STOSB` for the tail).
///
/// # Safety
/// `destination..destination + len` must be writable memory that no Rust reference covers
/// while it runs.
pub unsafe fn zero_bytes(destination: *mut u8, len: usize) {
    // SAFETY: the caller vouches for the range; the string instructions store exactly RCX
    // units upwards from RDI (DF is clear, as for `copy_bytes`).
    unsafe {
        asm!(
            "rep stosq",
            "mov rcx, {tail}",
            "rep stosb",
            tail = in(reg) len % 8,
            inout("rcx") len / 8 => _,
            inout("rdi") destination => _,
            in("rax") 0u64,
            options(nostack, preserves_flags),
        );
    }
}

/// Zeroes `buffer` of the data window shared with Linux.
pub fn zero_window(window: &DataWindow<'_>, buffer: BufferRef) -> Result<(), WindowError> {
    if buffer.len == 0 {
        return Ok(());
    }
    let (bytes, len) = window.raw_parts(buffer)?;
    // SAFETY: `raw_parts` checked `buffer` lies inside the window, which Rust code reaches
    // only through atomics and these string instructions, never references.
    unsafe { zero_bytes(bytes, len) };
    Ok(())
}

/// Copies `buffer` of the data window shared with Linux into `out` (as long as `buffer`).
pub fn read_window(
    window: &DataWindow<'_>,
    buffer: BufferRef,
    out: &mut [u8],
) -> Result<(), WindowError> {
    if buffer.len == 0 {
        return Ok(());
    }
    let (bytes, len) = window.raw_parts(buffer)?;
    assert_eq!(
        len,
        out.len(),
        "read_window: the buffer and `out` differ in length"
    );
    // SAFETY: `raw_parts` checked `buffer` lies inside the window, which Rust code reaches
    // only through atomics and these string instructions; `out` is borrowed mutably here and
    // is `len` bytes long; the two cannot overlap (the window is not Lavender's heap).
    unsafe { copy_bytes(out.as_mut_ptr(), bytes.cast_const(), len) };
    Ok(())
}
