//! The hypercalls the kernel makes, as safe functions (one per call, so no caller can reach
//! `CoreRelease` or another call with side effects by accident).

use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{
    vmcall, ConsoleChunk, CoreRelease, ForcedState, ForcedStateRequest, Hypercall,
    HypercallFailure, HypercallResult, PanicMessage, Status, Wake, FORCED_STATE_BYTES,
};

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

/// `Doorbell`: wakes the guest that shares the region at guest-physical `region` with Lavender
/// (it sleeps on one of that region's rings).
pub fn doorbell(region: u64) -> Result<(), HypercallFailure> {
    // SAFETY: as in `console_write`: Lavender runs only as a Tandem guest at CPL 0, where
    // VMCALL is defined and needs no token. `region` is only a number the hypervisor looks up
    // among the regions Lavender shares; the call reads and writes no guest memory and only
    // sends the peer an interrupt.
    unsafe { vmcall(Hypercall::Doorbell, [region, 0, 0, 0, 0], 0) }.map(|_| ())
}

/// `LoadReportKick`: a fresh load report is on the ring; arbitrate now.
pub fn load_report_kick() -> Result<(), HypercallFailure> {
    // SAFETY: as in `console_write`; the call has no arguments and touches no guest memory.
    unsafe { vmcall(Hypercall::LoadReportKick, [0; 5], 0) }.map(|_| ())
}

/// `CoreRelease` on the core itself: the hypervisor sends `wake` (if any), takes the core back
/// and the call does not return. It returns only with the hypervisor's refusal.
pub fn release_this_core(core: CoreId, wake: Option<Wake>) -> HypercallFailure {
    let args = CoreRelease { core, wake }.to_args();
    // SAFETY: as in `console_write`. The caller (`kernel::smp`) has taken this core out of
    // scheduling, left its threads (saved contexts) in its closed run queue for the cores that
    // stay, stopped its timer and marked the slot released, so nothing is lost when the vCPU
    // stops inside the call; `wake` only asks the hypervisor, which checks it, for an interrupt.
    match unsafe { vmcall(Hypercall::CoreRelease, args, 0) } {
        Ok(_) => HypercallFailure::Status(Status::Ok),
        Err(failure) => failure,
    }
}

/// `Panic`: reports this kernel's panic with `message`; the hypervisor stops the guest and the
/// call does not return. It returns only with the hypervisor's refusal (a message it will not
/// print, or no hypervisor at all).
pub fn report_panic(message: &[u8]) -> HypercallFailure {
    // Lavender's kernel memory is identity-mapped: a virtual address is the guest-physical one.
    let args = PanicMessage {
        address: message.as_ptr() as u64,
        len: message.len(),
    }
    .to_args();
    // SAFETY: as in `console_write`; the hypervisor only reads the `message.len()` bytes at
    // `message`, which are live for the call, and stops the guest (every core) if it accepts.
    match unsafe { vmcall(Hypercall::Panic, args, 0) } {
        Ok(_) => HypercallFailure::Status(Status::Ok),
        Err(failure) => failure,
    }
}

/// `ForcedState`: the registers `core` had when the hypervisor took it by force (readable
/// once, after its `Taken` event).
pub fn forced_state(core: CoreId) -> Result<ForcedState, HypercallFailure> {
    let mut buffer = [0u8; FORCED_STATE_BYTES];
    // Identity-mapped, as in `report_panic`.
    let args = ForcedStateRequest {
        core,
        buffer: buffer.as_mut_ptr() as u64,
    }
    .to_args();
    // SAFETY: as in `console_write`; the hypervisor writes at most `FORCED_STATE_BYTES` bytes
    // at `buffer`, a local array of exactly that size that outlives the call, and nothing
    // else. The asm is not `nomem`, so the compiler reads `buffer` after it.
    unsafe { vmcall(Hypercall::ForcedState, args, 0) }?;
    Ok(ForcedState::from_bytes(&buffer))
}
