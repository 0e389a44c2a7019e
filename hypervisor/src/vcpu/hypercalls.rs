//! VMCALL: the hypercalls of `vmcall_proto::hypercall`, with the register convention and
//! the privilege rules documented there. Every argument is untrusted.

use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::{
    hello_reply, ConsoleChunk, CoreOwnership, CoreState, Hypercall, Privilege, Status,
};
use vmcall_proto::version::ABI_VERSION;

use super::{Next, Vcpu};
use crate::console;
use crate::guest::ownership;
use crate::platform::MAX_CPUS;

pub fn dispatch(vcpu: &mut Vcpu) -> Next {
    let status = match Hypercall::try_from(vcpu.regs.rax) {
        Err(status) => status,
        Ok(call) if !permitted(call, vcpu.cpl()) => Status::PermissionDenied,
        Ok(call) => execute(vcpu, call),
    };
    vcpu.regs.rax = status as u64;
    vcpu.advance_rip()
}

/// Kernel calls from CPL 3 need the holder token, which this hypervisor does not issue
/// yet: they are refused. Test hooks are off.
fn permitted(call: Hypercall, cpl: u8) -> bool {
    match call.privilege() {
        Privilege::Any => true,
        Privilege::Kernel | Privilege::Test => cpl == 0,
    }
}

fn execute(vcpu: &mut Vcpu, call: Hypercall) -> Status {
    match call {
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
                    guest.console.write(chunk.as_bytes(), |line| {
                        console::guest_line(guest.name(), line)
                    });
                    Status::Ok
                }
                Err(status) => status,
            }
        }
        Hypercall::QueryCore => {
            let Some(core) = CoreId::new(vcpu.regs.rdi).filter(|c| c.index() < MAX_CPUS) else {
                return Status::InvalidCore;
            };
            let owner = ownership::owner(core.index());
            let state = if owner.is_some() {
                CoreState::Owned
            } else {
                CoreState::Parked
            };
            vcpu.regs.rdi = CoreOwnership { core, state, owner }.to_u64();
            vcpu.regs.rsi = ownership::cores_of(vcpu.guest.id);
            Status::Ok
        }
        // Core moves, doorbells and load reports arrive with the core-scheduling work.
        Hypercall::Doorbell
        | Hypercall::WaitDoorbell
        | Hypercall::CoreRelease
        | Hypercall::CoreRequest
        | Hypercall::LoadReportKick
        | Hypercall::TestGrantCore
        | Hypercall::TestRevokeCore => Status::NotSupported,
    }
}
