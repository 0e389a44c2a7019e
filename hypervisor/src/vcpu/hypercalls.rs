//! VMCALL: the hypercalls of `vmcall_proto::hypercall`, with the register convention and
//! the privilege rules documented there. Every argument is untrusted.

use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{
    hello_reply, panic_text, ConsoleChunk, CoreOwnership, CoreRelease, ForcedStateRequest,
    Hypercall, PanicMessage, Status, Wake, PANIC_MESSAGE_MAX,
};
use vmcall_proto::version::ABI_VERSION;

use super::{End, Next, Vcpu};
use crate::cores::{Reason, Requester, Stage, CORES};
use crate::guest::{GuestPhysicalMemory, GuestState};
use crate::platform::MAX_CPUS;
use crate::{console, faults};

pub fn dispatch(vcpu: &mut Vcpu) -> Next {
    let outcome = match Hypercall::try_from(vcpu.regs.rax) {
        Err(status) => Ok(status),
        Ok(call) if !permitted(call, vcpu.cpl(), vcpu.regs.r9, holder_token(vcpu)) => {
            Ok(Status::PermissionDenied)
        }
        Ok(call) => execute(vcpu, call),
    };
    match outcome {
        Ok(status) => {
            vcpu.regs.rax = status as u64;
            vcpu.advance_rip()
        }
        Err(next) => next,
    }
}

/// `CORE_RELEASE` on the core being released: the vCPU ends here and the core goes back
/// to the hypervisor's pool. The call does not return to the guest. The core is parked here,
/// as soon as the call is found valid: the rest of the vCPU's end (the exit's accounting,
/// the scrub) is the hypervisor's own work, which the release need not wait for (a grant of
/// the core only posts to its mailbox, read after that work). A wake it asks for (an
/// interrupt to another of its running cores, for the threads it handed there) is checked
/// here and sent once the core is scrubbed ([`super::core_loop`]).
fn core_release(vcpu: &mut Vcpu) -> Result<Status, Next> {
    let core = vcpu.core;
    CORES.stamp(core, Stage::ReleaseCalled, crate::arch::cpu::read_tsc());
    let r = &vcpu.regs;
    let release = match CoreRelease::from_args([r.rdi, r.rsi, r.rdx, r.r10, r.r8]) {
        Ok(release) => release,
        Err(status) => return Ok(status),
    };
    if release.core.index() != core {
        // Releasing another core (the Linux agent's case) comes with Linux hotplug.
        return Ok(Status::InvalidArgument);
    }
    let guest = vcpu.guest.id;
    if let Some(wake) = release.wake {
        if wake.core.index() == core {
            return Ok(Status::InvalidArgument);
        }
        if !may_wake(guest, wake) {
            vcpu.report_refusal(
                "release_wake",
                None,
                wake.core.index() as u64,
                "refused",
                format_args!(
                    "CORE_RELEASE asking to wake {} with vector {:#x}, not its running core,",
                    wake.core, wake.vector
                ),
            );
            return Ok(Status::NotOwner);
        }
    }
    // Parking checks, in the same step, that the caller's vCPU runs on the core.
    let now = crate::arch::cpu::read_tsc();
    if CORES
        .park(core, guest, Requester::Guest, Reason::Released, now)
        .is_err()
    {
        return Ok(Status::NotOwner);
    }
    log::debug!("guest '{}' released cpu{core}", vcpu.guest.name());
    Err(Next::Park(End::Released { wake: release.wake }))
}

/// `PANIC`: the guest's kernel panicked and says why. The message is copied out of the
/// guest's RAM and checked before anything is printed; a bad one is refused and the guest
/// runs on (it may call again without it). A good one stops the guest like a triple fault:
/// `guest_stopped` with code `panic` and the message, every other core of the guest kicked
/// out, and `faults::poll` reports it down and tells its peers once its cores are parked.
fn panic(vcpu: &mut Vcpu) -> Result<Status, Next> {
    let r = &vcpu.regs;
    let message = match PanicMessage::from_args([r.rdi, r.rsi, r.rdx, r.r10, r.r8]) {
        Ok(message) => message,
        Err(status) => return Ok(status),
    };
    let mut buffer = [0u8; PANIC_MESSAGE_MAX];
    let bytes = &mut buffer[..message.len];
    if !bytes.is_empty() && vcpu.guest.ram.read(message.address, bytes).is_err() {
        return Ok(Status::InvalidArgument);
    }
    let text = match panic_text(bytes) {
        Ok(text) => text,
        Err(status) => return Ok(status),
    };
    // Another core of the guest stopped it first (it panicked too): that one reported it.
    if vcpu.guest.state() != GuestState::Running {
        return Err(Next::Park(End::Stopped));
    }
    Err(vcpu.stop("panic", format_args!("{text}")))
}

/// `FORCED_STATE`: copies the registers kept for a core taken from this guest by force into
/// the guest's buffer, once.
fn forced_state(vcpu: &Vcpu) -> Status {
    let r = &vcpu.regs;
    let request = match ForcedStateRequest::from_args([r.rdi, r.rsi, r.rdx, r.r10, r.r8]) {
        Ok(request) => request,
        Err(status) => return status,
    };
    if request.core.index() >= MAX_CPUS {
        return Status::InvalidCore;
    }
    let ram = &vcpu.guest.ram;
    let delivered = faults::hand_over_forced_state(vcpu.guest.id, request.core.index(), |state| {
        ram.write(request.buffer, &state.to_bytes())
    });
    match delivered {
        Some(Ok(())) => Status::Ok,
        Some(Err(_)) => Status::InvalidArgument,
        None => Status::NotOwner,
    }
}

/// Whether guest `guest` may have `wake` sent: only to a core running that guest, with an
/// interrupt vector, since an interrupt must not reach a parked core or another guest's,
/// nor raise an exception vector.
pub fn may_wake(guest: u8, wake: Wake) -> bool {
    let target = wake.core.index();
    target < MAX_CPUS
        && wake.vector >= crate::ipi::FIRST_INTERRUPT_VECTOR
        && CORES.runs(target, guest)
}

/// The guest's holder token (0: it has none), published only in its control region.
fn holder_token(vcpu: &Vcpu) -> u64 {
    vcpu.guest.control.as_ref().map_or(0, |c| c.holder_token)
}

/// Kernel calls are open to CPL 0, and to CPL 3 only with the guest's holder token in R9
/// (never when the guest has none). Test hooks are off.
fn permitted(call: Hypercall, cpl: u8, presented: u64, token: u64) -> bool {
    call.privilege().allows(cpl, presented, token, false)
}

fn execute(vcpu: &mut Vcpu, call: Hypercall) -> Result<Status, Next> {
    Ok(match call {
        Hypercall::Hello => {
            vcpu.regs.rdi = hello_reply(vcpu.regs.rdi);
            vcpu.regs.rsi = ABI_VERSION.to_u32().into();
            Status::Ok
        }
        Hypercall::ConsoleWrite => {
            let r = &vcpu.regs;
            match ConsoleChunk::from_args([r.rdi, r.rsi, r.rdx, r.r10, r.r8]) {
                Ok(chunk) => {
                    let guest = vcpu.guest;
                    let bytes = chunk.as_bytes();
                    // At most the line begun, these bytes, and a "[name] " tag and newline for
                    // every line they can end.
                    let most = guest.console.pending_len()
                        + bytes.len()
                        + (bytes.len() + 1) * (guest.name().len() + 4);
                    if console::has_room_for(most) {
                        guest
                            .console
                            .write(bytes, |line| console::guest_line(guest.name(), line));
                        Status::Ok
                    } else {
                        Status::Busy
                    }
                }
                Err(status) => status,
            }
        }
        Hypercall::QueryCore => {
            let Some(core) = CoreId::new(vcpu.regs.rdi).filter(|c| c.index() < MAX_CPUS) else {
                return Ok(Status::InvalidCore);
            };
            let word = CORES.word(core.index());
            let (state, owner) = (word.state, word.owner);
            vcpu.regs.rdi = CoreOwnership { core, state, owner }.to_u64();
            vcpu.regs.rsi = CORES.cores_of(vcpu.guest.id);
            Status::Ok
        }
        Hypercall::CoreRelease => return core_release(vcpu),
        Hypercall::CoreMove => {
            let r = &vcpu.regs;
            match crate::moves::request(vcpu.guest.id, r.rdi, r.rsi, r.rdx, r.r10) {
                Ok(id) => {
                    vcpu.regs.rdi = id.into();
                    Status::Ok
                }
                Err(status) => status,
            }
        }
        Hypercall::Stats => match vcpu.regs.rdi {
            0 | 1 => {
                vcpu.regs.rdi = crate::stats_page::request(vcpu.regs.rdi == 1);
                Status::Ok
            }
            _ => Status::InvalidArgument,
        },
        Hypercall::SetPolicy => crate::policy_engine::request(vcpu.regs.rdi, vcpu.regs.rsi),
        Hypercall::Panic => return panic(vcpu),
        Hypercall::ForcedState => forced_state(vcpu),
        // Rate-limited: each kick asks for a pass of the monitor (an IPI when core 0 is its
        // own). Past the limit the report waits on its ring for the monitor's next pass.
        Hypercall::LoadReportKick => match vcpu.guest.kicks.admit(crate::time::now_us()) {
            Some(_) => {
                crate::monitor::wake();
                Status::Ok
            }
            None => Status::Busy,
        },
        // Doorbells between guests are not built; a guest asks for cores in its load reports
        // (the cooperative policy), so `CORE_REQUEST` stays reserved.
        Hypercall::Doorbell => super::doorbell::ring(vcpu.guest, vcpu.regs.rdi),
        Hypercall::WaitDoorbell
        | Hypercall::CoreRequest
        | Hypercall::TestGrantCore
        | Hypercall::TestRevokeCore => Status::NotSupported,
    })
}
