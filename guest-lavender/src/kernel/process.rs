//! Processes: a user program loaded into an address space of its own, with one or more user
//! threads. Loading (ELF segments, relocations, the first thread's stack and arguments),
//! thread creation for `thread_spawn`, and the end of a process: by `exit`, or killed by a
//! fault in user mode. When the last thread of a process has switched out, its memory is freed
//! and a `process_exit` marker reports its status.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use guest_lavender::elf::{ElfError, ElfImage};
use lavender_abi::{
    in_user_window, Error, IMAGE_BASE, MAIN_STACK_BYTES, MAIN_STACK_TOP, MAX_ARGUMENT_BYTES,
};
use log::{error, info};

use crate::kernel::arch::address_space::{AddressSpace, SpaceError};
use crate::kernel::arch::heap;
use crate::kernel::sched::{self, ThreadId, UserStart};
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, memory, time};

include!(concat!(env!("OUT_DIR"), "/user_programs.rs"));

const PAGE: u64 = 4096;

static NEXT_PID: AtomicU32 = AtomicU32::new(1);

pub struct Process {
    pid: u32,
    name: &'static str,
    space: AddressSpace,
    /// Set once the process is ending: its threads stop at their next kernel entry.
    exiting: AtomicBool,
    status: AtomicI32,
    /// The exception that killed it, if one did (vector + 1; 0 = none).
    killed_by: AtomicU32,
    /// Threads not yet retired (running, runnable or blocked).
    live: AtomicUsize,
    threads_created: AtomicU64,
    /// Exited threads waiting for their joiner.
    zombies: IrqMutex<Vec<ThreadId>>,
    started_at: u64,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The root of its page tables.
    pub fn root(&self) -> u64 {
        self.space.root()
    }

    pub fn space(&self) -> &AddressSpace {
        &self.space
    }
}

/// Why a program could not be started.
#[derive(Debug)]
pub enum SpawnError {
    NoSuchProgram,
    BadImage(ElfError),
    Memory(SpaceError),
    ArgumentsTooLong,
    NoThread,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchProgram => {
                write!(f, "no such program (built in:")?;
                for name in programs() {
                    write!(f, " {name}")?;
                }
                write!(f, ")")
            }
            Self::BadImage(error) => write!(f, "bad program image: {error}"),
            Self::Memory(error) => write!(f, "building its address space: {error}"),
            Self::ArgumentsTooLong => write!(f, "arguments longer than {MAX_ARGUMENT_BYTES} bytes"),
            Self::NoThread => write!(f, "no thread available"),
        }
    }
}

/// Names of the programs built into the image.
pub fn programs() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(name, _)| *name)
}

/// Starts program `name` with argument string `args`; returns its process id.
pub fn spawn(name: &str, args: &str) -> Result<u32, SpawnError> {
    let (name, elf) = PROGRAMS
        .iter()
        .find(|(program, _)| *program == name)
        .ok_or(SpawnError::NoSuchProgram)?;
    if args.len() > MAX_ARGUMENT_BYTES {
        return Err(SpawnError::ArgumentsTooLong);
    }
    let image = ElfImage::parse(elf).map_err(SpawnError::BadImage)?;
    let mut space = AddressSpace::new().map_err(SpawnError::Memory)?;
    let frames_before = memory::free_frames();
    load(&image, &mut space).map_err(SpawnError::Memory)?;
    let (rsp, args_address) = build_stack(&mut space, args).map_err(SpawnError::Memory)?;
    let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
    let process = Arc::new(Process {
        pid,
        name,
        space,
        exiting: AtomicBool::new(false),
        status: AtomicI32::new(0),
        killed_by: AtomicU32::new(0),
        live: AtomicUsize::new(1),
        threads_created: AtomicU64::new(1),
        zombies: IrqMutex::new(Vec::new()),
        started_at: time::now(),
    });
    let pages = frames_before.saturating_sub(memory::free_frames());
    let start = UserStart {
        rip: IMAGE_BASE + image.entry(),
        rsp,
        arguments: [args_address, args.len() as u64],
    };
    info!(
        "process {pid}: {name} {args:?} ({} KiB image, {pages} pages)",
        elf.len() / 1024
    );
    console::marker("process_start", |o| {
        o.u64("pid", u64::from(pid))
            .str("name", name)
            .str("args", args)
            .u64("pages", pages as u64);
    });
    // The first thread is not joinable: the process ends with it or after it.
    sched::spawn_user(process, start, false).ok_or(SpawnError::NoThread)?;
    Ok(pid)
}

/// Maps and fills the image's segments at `IMAGE_BASE` and applies its relocations.
fn load(image: &ElfImage<'_>, space: &mut AddressSpace) -> Result<(), SpaceError> {
    let bytes = image.bytes();
    for segment in image.segments() {
        let start = IMAGE_BASE + segment.address;
        let end = start + segment.memory_size;
        let mut page = start & !(PAGE - 1);
        while page < end {
            space.map_page(page, segment.writable, segment.executable)?;
            page += PAGE;
        }
        // Pages are zeroed when mapped, which covers the part past the file's bytes (.bss).
        space
            .load(start, &bytes[segment.file.clone()])
            .map_err(|error| SpaceError::NotUserPage(error.0))?;
    }
    for relocation in image.relocations() {
        let value = IMAGE_BASE + relocation.addend;
        space
            .load(IMAGE_BASE + relocation.offset, &value.to_le_bytes())
            .map_err(|error| SpaceError::NotUserPage(error.0))?;
    }
    Ok(())
}

/// Maps the first thread's stack and copies the argument string to its top. Returns the
/// initial RSP (16-byte aligned, below the string) and the string's address.
fn build_stack(space: &mut AddressSpace, args: &str) -> Result<(u64, u64), SpaceError> {
    let mut page = MAIN_STACK_TOP - MAIN_STACK_BYTES;
    while page < MAIN_STACK_TOP {
        space.map_page(page, true, false)?;
        page += PAGE;
    }
    let address = MAIN_STACK_TOP - args.len() as u64;
    space
        .load(address, args.as_bytes())
        .map_err(|error| SpaceError::NotUserPage(error.0))?;
    Ok((address & !15, address))
}

/// `thread_spawn`: a new joinable thread of `owner` at `rip` on the stack ending at `rsp`.
pub fn spawn_thread(owner: &Arc<Process>, rip: u64, rsp: u64, argument: u64) -> Result<u64, Error> {
    let space = owner.space();
    // The entry must be mapped user memory (IRETQ to a bad RIP would fault in the kernel); a
    // mapped but non-executable one faults in user mode and only kills the process.
    if space.translate(rip, false).is_none() {
        return Err(Error::BadAddress);
    }
    if rsp % 16 != 0 || !in_user_window(rsp - 16, 16) {
        return Err(Error::InvalidArgument);
    }
    if space.translate(rsp - 8, true).is_none() {
        return Err(Error::BadAddress);
    }
    if owner.exiting.load(Ordering::Acquire) {
        return Err(Error::NoThreads);
    }
    // Counted before it exists, so the process cannot look ended while it starts.
    owner.live.fetch_add(1, Ordering::AcqRel);
    let start = UserStart {
        rip,
        rsp,
        arguments: [argument, 0],
    };
    match sched::spawn_user(owner.clone(), start, true) {
        Some(id) => {
            owner.threads_created.fetch_add(1, Ordering::Relaxed);
            Ok(id)
        }
        None => {
            // The caller is live, so this never drops the count to zero.
            owner.live.fetch_sub(1, Ordering::AcqRel);
            Err(Error::NoThreads)
        }
    }
}

/// Starts the end of `owner` with `status` (the first call wins): its threads stop at their
/// next kernel entry.
fn begin_exit(owner: &Process, status: i32) {
    if owner
        .exiting
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        owner.status.store(status, Ordering::Release);
    }
}

/// `exit`: ends the whole process; the calling thread ends now.
pub fn exit(owner: Arc<Process>, status: i32) -> ! {
    begin_exit(&owner, status);
    drop(owner);
    sched::exit_with(0)
}

/// A fault in user mode (exception `vector` at `rip`): reports it, kills the process with status
/// 128 + vector (the Unix convention for a death by signal) and ends the faulting thread.
pub fn kill_for_fault(vector: u8, name: &str, rip: u64, address: u64) -> ! {
    let Some(owner) = sched::current_process() else {
        unreachable!("a fault in user mode without a user thread")
    };
    error!(
        "process {} ({}): {name} at {rip:#x} (address {address:#x}); killed",
        owner.pid, owner.name
    );
    console::marker("process_fault", |o| {
        o.u64("pid", u64::from(owner.pid))
            .str("name", owner.name)
            .str("exception", name)
            .hex("rip", rip)
            .hex("address", address);
    });
    owner
        .killed_by
        .compare_exchange(
            0,
            u32::from(vector) + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .ok();
    begin_exit(&owner, 128 + i32::from(vector));
    drop(owner);
    sched::exit_with(0)
}

/// Called before returning to user mode (after a system call or an interrupt that came from
/// user mode): a thread of an ending process ends here instead.
pub fn before_user_return() {
    let ending =
        sched::current_process().is_some_and(|owner| owner.exiting.load(Ordering::Acquire));
    if ending {
        sched::exit_with(0);
    }
}

/// A thread of `owner` has exited and switched out (from `sched`, interrupts off). A joinable
/// one waits as a zombie; the last one ends the process.
pub fn thread_retired(owner: &Arc<Process>, thread: ThreadId, joinable: bool) {
    if joinable {
        owner.zombies.lock().push(thread);
    }
    if owner.live.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let status = owner.status.load(Ordering::Acquire);
    let runtime_us = time::ticks_to_us(time::now().wrapping_sub(owner.started_at));
    let killed_by = owner.killed_by.load(Ordering::Acquire);
    // Kernel-wide: threads moved off leaving cores and taken by idle ones, so far.
    let counters = sched::counters();
    info!(
        "process {} ({}) exited with status {status} after {runtime_us} us",
        owner.pid, owner.name
    );
    console::marker("process_exit", |o| {
        o.u64("pid", u64::from(owner.pid))
            .str("name", owner.name)
            .i64("status", i64::from(status))
            .u64("threads", owner.threads_created.load(Ordering::Relaxed))
            .u64("runtime_us", runtime_us)
            .u64("kernel_threads_created", counters.created)
            .u64("kernel_threads_exited", counters.exited)
            .u64("migrated", counters.migrated)
            .u64("stolen", counters.stolen)
            .u64("heap_used", heap::used() as u64);
        if killed_by != 0 {
            o.str(
                "killed_by",
                guest_lavender::exceptions::mnemonic((killed_by - 1) as u8),
            );
        }
    });
    crate::kernel::delegation::process_exited(owner.pid, status);
    // Nobody is left to join the zombies.
    let zombies = core::mem::take(&mut *owner.zombies.lock());
    for zombie in zombies {
        sched::release(zombie);
    }
}

/// `thread` was joined: it is no zombie any more (the joiner releases it).
pub fn thread_joined(owner: &Process, thread: ThreadId) {
    owner.zombies.lock().retain(|zombie| *zombie != thread);
}
