//! Program entry and panics. The kernel starts the first thread at `_start` with the argument
//! string in RDI/RSI (lavender_abi, "Program entry"); `main!` names the function it runs.

use core::fmt::Write as _;

core::arch::global_asm!(
    ".pushsection .text._start, \"ax\"",
    ".global _start",
    "_start:",
    // RSP is 16-byte aligned here; the call leaves the alignment the System V ABI expects.
    "    xor ebp, ebp",
    "    call {start}",
    "    ud2",
    ".popsection",
    start = sym start,
);

extern "Rust" {
    /// Defined by the program with `lavender_user::main!`.
    fn lavender_program_main(args: &str) -> i32;
}

extern "sysv64" fn start(address: *const u8, length: usize) -> ! {
    // SAFETY: the kernel passes the address and length of the argument string it copied into
    // this process's memory, which stays mapped and unchanged for the process's life
    // (lavender_abi, "Program entry"); it is at most MAX_ARGUMENT_BYTES long.
    let bytes = unsafe { core::slice::from_raw_parts(address, length) };
    let args = core::str::from_utf8(bytes).unwrap_or("");
    // SAFETY: `main!` defines this function with exactly this signature.
    let status = unsafe { lavender_program_main(args) };
    crate::sys::exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut writer = crate::io::LineWriter::new(|bytes| {
        let _ = crate::sys::write(2, bytes);
    });
    let _ = writeln!(writer, "panic: {info}");
    drop(writer);
    crate::sys::exit(101)
}
