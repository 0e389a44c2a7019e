//! The hypercalls the kernel makes, as safe functions (one per call, so no caller can reach
//! `CoreRelease` or another call with side effects by accident).

use vmcall_proto::hypercall::{vmcall, ConsoleChunk, Hypercall, HypercallFailure, HypercallResult};

/// `ConsoleWrite`: hands up to 32 bytes to the hypervisor console.
pub fn console_write(chunk: ConsoleChunk) -> Result<(), HypercallFailure> {
    // SAFETY: Lavender only runs as a Tandem guest (VMX non-root), where VMCALL is defined;
    // `ConsoleWrite` passes its bytes in registers and changes nothing in guest memory. Lavender
    // runs at CPL 0, so no holder token is needed (R9 = 0).
    unsafe { vmcall(Hypercall::ConsoleWrite, chunk.to_args(), 0) }.map(|_| ())
}

/// `Hello`: the ABI round trip. Returns RDI and RSI as the hypervisor set them.
pub fn hello(argument: u64) -> Result<HypercallResult, HypercallFailure> {
    // SAFETY: as in `console_write`; `Hello` only reads its argument register.
    unsafe { vmcall(Hypercall::Hello, [argument, 0, 0, 0, 0], 0) }
}
