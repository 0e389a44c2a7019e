//! Lavender's processes as Linux manages them (`vmctl exec/ps/kill/stop/cont`): the table of
//! live processes and of the last ones that ended, and the commands of the control connection
//! (`ProcessCommand`, decoded by `kernel::delegation`, which owns the connection).
//!
//! * `Exec` starts a program: one built into the image by name, or (`ExecFlags::IMAGE`) an ELF
//!   file Linux put in the control connection's part of the data window. The file is copied
//!   out of the window first (Linux could change it while it is parsed) and validated by
//!   `guest_lavender::elf` (magic, class, machine, position independence, every segment and
//!   relocation inside the user window) before anything is built. Its `cores` is the most
//!   cores the process's threads run on at once (the scheduler keeps to it); 0 or more than
//!   Lavender may hold is refused (`EINVAL`). The reply is the new pid.
//! * `Signal` kills (status 128 + 9), stops or continues a process; a state change is
//!   announced by a notification (`kernel::delegation::notify`).
//! * `List` answers one `ProcessListEntry` per live process and per recently ended one (the
//!   last [`ENDED_KEPT`], with their final status), then the reply with their count. Each
//!   list also prints a `lavender_memory` marker on Lavender's console (free frames, live
//!   processes, kernel threads alive): what a long run compares to find a lost page or thread.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use lavender_abi::MAX_ARGUMENT_BYTES;
use log::warn;
use vmcall_proto::delegation::errno;
use vmcall_proto::message::{
    ExecFlags, ListedState, ProcessAction, ProcessCommand, ProcessListEntry, ProcessState,
};
use vmcall_proto::region::{BufferRef, DataWindow};

use crate::kernel::arch::heap;
use crate::kernel::delegation;
use crate::kernel::memory;
use crate::kernel::process::{self, Options, Process, SpawnError};
use crate::kernel::sched;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, smp, time};

/// Ended processes kept for `List` (their final state and figures).
const ENDED_KEPT: usize = 8;
/// Longest program name kept (a path's last component).
const NAME_BYTES: usize = 64;
/// The signal `kill` sends (SIGKILL: status 137, as a shell shows it).
const SIGKILL: u8 = 9;
/// The signal an interrupt sends (SIGINT: status 130, what Ctrl-C makes of a local process).
const SIGINT: u8 = 2;

/// Figures of a process that ended.
#[derive(Clone)]
struct Ended {
    pid: u32,
    name: String,
    cores: u16,
    ran_on: u64,
    status: i32,
    cpu_us: u64,
    calls: u64,
}

static LIVE: IrqMutex<Vec<Arc<Process>>> = IrqMutex::new(Vec::new());
static ENDED: IrqMutex<VecDeque<Ended>> = IrqMutex::new(VecDeque::new());

/// `process` was built and is about to run.
pub fn started(process: &Arc<Process>) {
    LIVE.lock().push(process.clone());
}

/// A process that never ran (its first thread could not be made) leaves the table.
pub fn forget(pid: u32) {
    LIVE.lock().retain(|live| live.pid() != pid);
}

/// `process` ended with `status` (its last thread retired).
pub fn ended(process: &Process, status: i32) {
    LIVE.lock().retain(|live| live.pid() != process.pid());
    let mut ended = ENDED.lock();
    if ended.len() == ENDED_KEPT {
        ended.pop_front();
    }
    ended.push_back(Ended {
        pid: process.pid(),
        name: String::from(process.name()),
        cores: process.options().cores,
        ran_on: process.cores_ran_on(),
        status,
        cpu_us: process.cpu_us(),
        calls: process.calls(),
    });
}

/// A process that made a delegated call this recently is in a phase of I/O (µs): a call
/// takes some 0.1 to 5 ms under Bochs.
const IO_RECENT_US: u64 = 10_000;

/// What the live processes may use of Lavender's cores ([`thread_counts`]).
#[derive(Clone, Copy, Debug)]
pub struct ThreadCounts {
    /// How many threads they may run at once now: each process counts for the most threads
    /// it had at once (a job that joined its workers between two phases of work starts as
    /// many again), one limited to `n` cores for at most `n`; except one that joined some of
    /// its workers and is in a phase of delegated I/O (it made a delegated call in the last
    /// [`IO_RECENT_US`]): it counts for the threads it has that are not in a delegated call
    /// (those wait on Linux and need no core), so the cores its workers ran on are offered
    /// at once. The policies give such a core back to the pool when nobody else wants it,
    /// and the job's next phase of work asks for it again and has it back within a sampling
    /// period. (A job whose threads all live, one of them waiting a moment on a delegated
    /// call, counts them all.)
    pub usable: u32,
    /// How many threads they have run at once at most, a limited process counting for no
    /// more than its core limit: the cores all of Lavender's live work has used at most.
    /// Cores beyond them, none of its live work has used: the work that ran on them has
    /// ended (a load report says such an offer is final).
    pub peak: u32,
}

/// The live processes' [`ThreadCounts`] at TSC `now`, from one look at the table; `None`
/// while the table is in use (the caller may hold it: a load report from a thread's spawn).
pub fn thread_counts(now: u64) -> Option<ThreadCounts> {
    let live = LIVE.try_lock()?;
    let recent = time::us_to_ticks(IO_RECENT_US);
    let zero = ThreadCounts { usable: 0, peak: 0 };
    Some(live.iter().fold(zero, |all, p| {
        let (most, threads) = (p.most_threads(), p.live_threads());
        let usable = if threads < most && p.called_within(recent, now) {
            threads.saturating_sub(p.threads_in_calls())
        } else {
            most
        };
        ThreadCounts {
            usable: all.usable.saturating_add(within_limit(p, usable)),
            peak: all.peak.saturating_add(within_limit(p, most)),
        }
    }))
}

/// `threads` of process `p`, counting no more than its core limit (if it has one).
fn within_limit(p: &Process, threads: usize) -> u32 {
    let threads = u32::try_from(threads).unwrap_or(u32::MAX);
    match u32::from(p.options().cores) {
        0 => threads,
        limit => threads.min(limit),
    }
}

fn find(pid: u32) -> Option<Arc<Process>> {
    LIVE.lock().iter().find(|live| live.pid() == pid).cloned()
}

/// Runs `command`, read from the ring at TSC `read_tsc`; its reply value or an errno. `send`
/// takes each encoded list entry.
pub fn command(
    window: &DataWindow<'static>,
    command: ProcessCommand,
    read_tsc: u64,
    send: &mut dyn FnMut(&[u8]),
) -> Result<u64, u16> {
    match command {
        ProcessCommand::Exec {
            cores,
            flags,
            program,
            arguments,
            ..
        } => exec(window, cores, flags, program, arguments, read_tsc).map(u64::from),
        ProcessCommand::Signal {
            process, action, ..
        } => signal(process, action).map(|()| 0),
        ProcessCommand::List { request_id } => Ok(list(request_id, send)),
    }
}

fn exec(
    window: &DataWindow<'static>,
    cores: u16,
    flags: ExecFlags,
    program: BufferRef,
    arguments: BufferRef,
    read_tsc: u64,
) -> Result<u32, u16> {
    let mut args = [0u8; MAX_ARGUMENT_BYTES];
    let args = args.get_mut(..arguments.len as usize).ok_or(errno::E2BIG)?;
    window.read(arguments, args).map_err(|_| errno::EFAULT)?;
    for byte in args.iter_mut().filter(|byte| **byte == 0) {
        *byte = b' ';
    }
    let args = core::str::from_utf8(args).map_err(|_| errno::EINVAL)?;
    if cores == 0 || usize::from(cores) > smp::cores_allowed() {
        warn!(
            "exec from Linux refused: {cores} cores asked, Lavender may hold {}",
            smp::cores_allowed()
        );
        return Err(errno::EINVAL);
    }
    let options = Options {
        cores,
        stdio: flags.contains(ExecFlags::STDIO),
        requested_tsc: Some(read_tsc),
    };
    let result = if flags.contains(ExecFlags::IMAGE) {
        // The name is the first argument's last path component, which Linux puts first.
        let (name, args) = split_name(args);
        let mut image = vec![0u8; program.len as usize];
        crate::kernel::arch::copy::read_window(window, program, &mut image)
            .map_err(|_| errno::EFAULT)?;
        process::spawn_image(name, &image, args, options)
    } else {
        let mut name = [0u8; NAME_BYTES];
        let name = name
            .get_mut(..program.len as usize)
            .ok_or(errno::ENAMETOOLONG)?;
        window.read(program, name).map_err(|_| errno::EFAULT)?;
        let name = core::str::from_utf8(name).map_err(|_| errno::EINVAL)?;
        process::spawn_with(name, args, options)
    };
    result.map_err(|problem| {
        warn!("exec from Linux refused: {problem}");
        console::marker("process_spawn_failed", |o| {
            o.str("name", "(from linux)").display("error", &problem);
        });
        match problem {
            SpawnError::NoSuchProgram => errno::ENOENT,
            SpawnError::ArgumentsTooLong => errno::E2BIG,
            SpawnError::NoThread => errno::EAGAIN,
            SpawnError::BadImage(_) => ENOEXEC,
            SpawnError::Memory(_) => errno::ENOMEM,
        }
    })
}

/// Linux's `ENOEXEC` ("Exec format error").
const ENOEXEC: u16 = 8;

/// `name args...` (the argument string of an image exec) into the name, cut to
/// [`NAME_BYTES`], and the program's own arguments.
fn split_name(args: &str) -> (&str, &str) {
    let (name, rest) = args.split_once(' ').unwrap_or((args, ""));
    let mut end = name.len().min(NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    (&name[..end], rest)
}

fn signal(pid: u32, action: ProcessAction) -> Result<(), u16> {
    const ESRCH: u16 = 3;
    let process = find(pid).ok_or(ESRCH)?;
    match action {
        ProcessAction::Kill => process::kill(&process, SIGKILL),
        ProcessAction::Interrupt => process::kill(&process, SIGINT),
        ProcessAction::Stop => {
            if process::set_stopped(&process, true) {
                delegation::notify_before_reply(pid, ProcessState::Stopped);
            }
        }
        ProcessAction::Continue => {
            if process::set_stopped(&process, false) {
                delegation::notify_before_reply(pid, ProcessState::Continued);
            }
        }
    }
    Ok(())
}

/// Sends an entry per live and per kept ended process; returns how many.
fn list(request_id: u64, send: &mut dyn FnMut(&[u8])) -> u64 {
    let mut entries: Vec<ProcessListEntry> = LIVE
        .lock()
        .iter()
        .map(|live| ProcessListEntry {
            request_id,
            process: live.pid(),
            state: if live.is_stopped() {
                ListedState::Stopped
            } else {
                ListedState::Running
            },
            cores: live.options().cores,
            threads: live.live_threads() as u32,
            status: 0,
            cpu_us: live.cpu_us(),
            calls: live.calls(),
            ran_on: live.cores_ran_on(),
            name: ProcessListEntry::name_field(live.name()),
        })
        .collect();
    entries.extend(ENDED.lock().iter().map(|ended| ProcessListEntry {
        request_id,
        process: ended.pid,
        state: ListedState::Exited,
        cores: ended.cores,
        threads: 0,
        status: ended.status,
        cpu_us: ended.cpu_us,
        calls: ended.calls,
        ran_on: ended.ran_on,
        name: ProcessListEntry::name_field(&ended.name),
    }));
    let live = LIVE.lock().len();
    let threads = sched::counters();
    console::marker("lavender_memory", |o| {
        o.u64("free_frames", memory::free_frames() as u64)
            .u64("live_processes", live as u64)
            .u64("threads_alive", threads.created - threads.exited)
            .u64("heap_used", heap::used() as u64);
    });
    let mut bytes = [0u8; ProcessListEntry::ENCODED_LEN];
    for entry in &entries {
        if let Ok(len) = entry.encode(&mut bytes) {
            send(&bytes[..len]);
        }
    }
    entries.len() as u64
}
