//! System calls from user mode (`lavender_abi`): the entry stub (`arch::user`) hands over the
//! registers; every argument is checked here before use, and every failure is an error code
//! to the caller, never a kernel fault.

use alloc::vec;
use core::fmt::Write as _;

use guest_lavender::user_output;
use lavender_abi::{encode_result, Delegation, Error, Syscall, MAX_WRITE_BYTES};

use crate::kernel::arch::user::SyscallFrame;
use crate::kernel::process::{self, Process};
use crate::kernel::{console, delegation, sched, time};

/// Console bytes queued above which a `write` waits (see `write`).
const WRITE_BACKLOG_LIMIT: usize = 4096;
/// How long such a `write` sleeps before it looks again (timer ticks wake sleepers anyway).
const WRITE_BACKLOG_WAIT_US: u64 = 1_000;
/// Longest sleep one call takes (an hour); longer requests sleep that long.
const MAX_SLEEP_US: u64 = 3_600_000_000;

/// Handles the system call in `frame`; returns RAX for the caller.
pub fn dispatch(frame: &mut SyscallFrame) -> u64 {
    let Some(owner) = sched::current_process() else {
        return encode_result(Err(Error::InvalidArgument));
    };
    let [a0, a1, a2, ..] = frame.arguments;
    if Syscall::from_number(frame.number) == Some(Syscall::Delegate) {
        // Failures are Linux errno values here (`lavender_abi::decode_delegated`).
        let result = delegation::delegate(&owner, a0);
        drop(owner);
        process::before_user_return();
        return match result {
            Ok(value) => value & (u64::MAX >> 1),
            Err(errno) => u64::from(errno).wrapping_neg(),
        };
    }
    let result = match Syscall::from_number(frame.number) {
        None => Err(Error::UnknownSyscall),
        Some(Syscall::Exit) => process::exit(owner, a0 as u32 as i32),
        Some(Syscall::ThreadExit) => {
            drop(owner);
            sched::exit_with(a0)
        }
        Some(Syscall::Write) => write(&owner, a0, a1, a2),
        Some(Syscall::ThreadSpawn) => process::spawn_thread(&owner, a0, a1, a2),
        Some(Syscall::ThreadJoin) => sched::join_thread(&owner, a0)
            .map_err(|sched::JoinError::NoSuchThread| Error::NoSuchThread),
        Some(Syscall::Yield) => {
            x86_64::instructions::interrupts::without_interrupts(sched::preempt);
            Ok(0)
        }
        Some(Syscall::Sleep) => {
            let deadline = time::now().saturating_add(time::us_to_ticks(a0.min(MAX_SLEEP_US)));
            sched::sleep_until(deadline);
            Ok(0)
        }
        Some(Syscall::Clock) => Ok(time::ticks_to_us(time::now())),
        Some(Syscall::CoreId) => Ok(u64::from(sched::current_core())),
        Some(Syscall::ProcessId) => Ok(u64::from(owner.pid())),
        Some(Syscall::WindowBuffer) => Ok(delegation::map_window_buffer(&owner)),
        Some(Syscall::Delegate) => unreachable!("handled above"),
    };
    // A thread that will not return (its process is ending) must not hold a reference.
    drop(owner);
    process::before_user_return();
    encode_result(result)
}

/// `write(stream, address, length)`: the bytes, line by line, on Lavender's console as
/// `name[pid]: text`, made safe by `user_output::sanitize`; for a process whose standard
/// streams Linux holds, a delegated `write` to the same fd there instead.
fn write(owner: &Process, stream: u64, address: u64, length: u64) -> Result<u64, Error> {
    if !matches!(stream, 1 | 2) {
        return Err(Error::InvalidArgument);
    }
    if length > MAX_WRITE_BYTES {
        return Err(Error::TooLong);
    }
    if owner.options().stdio {
        return write_to_linux(owner, stream, address, length);
    }
    let mut bytes = vec![0u8; length as usize];
    owner
        .space()
        .read(address, &mut bytes)
        .map_err(|_| Error::BadAddress)?;
    // Back-pressure: a program that writes faster than the console drains waits (sleeps)
    // while the backlog is high, so its output is never dropped and never fills the heap.
    while console::backlog() >= WRITE_BACKLOG_LIMIT {
        sched::sleep_until(time::now() + time::us_to_ticks(WRITE_BACKLOG_WAIT_US));
    }
    for line in user_output::lines(&bytes) {
        console::line(|out| {
            write!(out, "{}[{}]: ", owner.name(), owner.pid())?;
            user_output::sanitize(line, out)
        });
    }
    Ok(length)
}

/// The stream's bytes to fd `stream` of the process's Linux-side context (the launcher's own
/// stdout or stderr), as the process's own delegated `write` would send them.
fn write_to_linux(owner: &Process, stream: u64, address: u64, length: u64) -> Result<u64, Error> {
    let request = Delegation {
        number: vmcall_proto::delegation::call::WRITE,
        flags: Delegation::CONTINUATION,
        args: [stream, 0, 0],
        input: address,
        input_length: length,
        output: 0,
        output_length: 0,
    };
    // The reader is gone (a closed pipe) or Linux failed: the bytes have nowhere to go. The
    // program sees an I/O error, as it would on Linux (EPIPE).
    delegation::delegate_request(owner, &request).map_err(|_| Error::InvalidArgument)
}
