//! Processes: a user program loaded into an address space of its own, with one or more user
//! threads. Loading (ELF segments, relocations, the first thread's stack and arguments),
//! thread creation for `thread_spawn`, and the end of a process: by `exit`, or killed by a
//! fault in user mode or by Linux (`kernel::jobs`). A process can be stopped and continued:
//! its threads park at their next kernel entry. When the last thread of a process has switched
//! out, its memory is freed, a `process_exit` marker reports its status and Linux hears of it.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use guest_lavender::elf::{ElfError, ElfImage};
use guest_lavender::placement;
use lavender_abi::{
    in_user_window, Error, IMAGE_BASE, MAIN_STACK_BYTES, MAIN_STACK_TOP, MAX_ARGUMENT_BYTES,
};
use log::{error, info};
use vmcall_proto::message::ProcessState;

use crate::kernel::arch::address_space::{AddressSpace, SpaceError};
use crate::kernel::arch::heap;
use crate::kernel::sched::{self, ThreadId, UserStart};
use crate::kernel::sync::IrqMutex;
use crate::kernel::{console, jobs, memory, time};

include!(concat!(env!("OUT_DIR"), "/user_programs.rs"));

const PAGE: u64 = 4096;

static NEXT_PID: AtomicU32 = AtomicU32::new(1);

/// A thread of a process in a delegated call ([`Process::count_call`]), until it drops.
pub struct InCall<'a>(&'a Process);

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.in_calls.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Process {
    pid: u32,
    name: String,
    space: AddressSpace,
    /// How it was started (cores it may use, whether Linux holds its standard streams).
    options: Options,
    /// Set by Linux's `stop`, cleared by `continue`: its threads park at their next kernel
    /// entry while it is set.
    stopped: AtomicBool,
    /// The Unix signal that ended it, if one did (a fault's, or Linux's kill): 0 = none.
    signal: AtomicU8,
    /// TSC ticks its threads ran (charged by the scheduler at each switch).
    cpu_ticks: AtomicU64,
    /// Delegated calls it made.
    calls: AtomicU64,
    /// The TSC when its last delegated call was made (0: none yet).
    last_call_at: AtomicU64,
    /// Its threads in a delegated call now (waiting on Linux).
    in_calls: AtomicUsize,
    /// The scheduler's slots its threads may run on (bit per slot; at most `options.cores`
    /// of them online, see `guest_lavender::placement`); written only by the scheduler.
    slots: AtomicU32,
    /// The cores its threads ran on (bit per core index), for `vmctl ps`.
    ran_on: AtomicU64,
    /// Set once the process is ending: its threads stop at their next kernel entry.
    exiting: AtomicBool,
    status: AtomicI32,
    /// The exception that killed it, if one did (vector + 1; 0 = none).
    killed_by: AtomicU32,
    /// Threads not yet retired (running, runnable or blocked).
    live: AtomicUsize,
    /// The most threads it had at once.
    most_live: AtomicUsize,
    threads_created: AtomicU64,
    /// Exited threads waiting for their joiner.
    zombies: IrqMutex<Vec<ThreadId>>,
    /// The TSC when it was built (loaded, its first thread not yet made).
    started_at: u64,
    /// The TSC when its first thread first entered user mode (0: not yet).
    first_user_tsc: AtomicU64,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn options(&self) -> Options {
        self.options
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn is_exiting(&self) -> bool {
        self.exiting.load(Ordering::Acquire)
    }

    /// Threads not yet retired.
    pub fn live_threads(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The most threads it had at once: a job that joins its workers between two phases of
    /// work starts as many again.
    pub fn most_threads(&self) -> usize {
        self.most_live.load(Ordering::Relaxed)
    }

    /// A thread of it is about to enter user mode for the first time: the first such time
    /// is kept (the process's first instruction).
    pub fn note_first_user(&self) {
        let _ = self.first_user_tsc.compare_exchange(
            0,
            time::now(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// CPU time its threads used so far, in µs.
    pub fn cpu_us(&self) -> u64 {
        time::ticks_to_us(self.cpu_ticks.load(Ordering::Relaxed))
    }

    /// Adds `ticks` its thread just ran; not while it is stopped, so that the checks of its
    /// parked threads do not count.
    pub fn charge(&self, ticks: u64) {
        if !self.is_stopped() {
            self.cpu_ticks.fetch_add(ticks, Ordering::Relaxed);
        }
    }

    /// Delegated calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Whether it made a delegated call in the `ticks` before `now` (TSC).
    pub fn called_within(&self, ticks: u64, now: u64) -> bool {
        let at = self.last_call_at.load(Ordering::Relaxed);
        at != 0 && now.saturating_sub(at) <= ticks
    }

    /// Counts a delegated call one of its threads makes: the thread is in it (waiting on
    /// Linux) until the returned guard drops.
    pub fn count_call(&self) -> InCall<'_> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.last_call_at.store(time::now(), Ordering::Relaxed);
        self.in_calls.fetch_add(1, Ordering::Relaxed);
        InCall(self)
    }

    /// Its threads in a delegated call now.
    pub fn threads_in_calls(&self) -> usize {
        self.in_calls.load(Ordering::Relaxed)
    }

    /// The slots one of its threads may be placed on or taken by, of the `online` ones; and,
    /// if it is limited to a number of cores and holds fewer online, the online slots it holds
    /// (placing the thread may claim another, for good: [`placement::place_claim`]).
    pub fn permitted_slots(&self, online: u32) -> (u32, Option<u32>) {
        let limit = u32::from(self.options.cores);
        let held = self.slots.load(Ordering::Acquire);
        let claiming = held & online;
        (
            placement::permitted(limit, held, online),
            (limit != 0 && claiming.count_ones() < limit).then_some(claiming),
        )
    }

    /// Records that one of its threads runs on `slot`; `false` (nothing recorded) if that
    /// would put it on more online slots than its core limit.
    pub fn claim_slot(&self, slot: usize, online: u32) -> bool {
        let limit = u32::from(self.options.cores);
        let mut held = self.slots.load(Ordering::Acquire);
        loop {
            let Some(new) = placement::claim(limit, held, online, slot) else {
                return false;
            };
            if new == held {
                return true;
            }
            match self
                .slots
                .compare_exchange_weak(held, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    sched::pin_slots(new & !held, held & !new);
                    return true;
                }
                Err(now) => held = now,
            }
        }
    }

    /// Gives up the slots it holds (its last thread has retired).
    fn release_slots(&self) {
        sched::pin_slots(0, self.slots.swap(0, Ordering::AcqRel));
    }

    /// One of its threads starts running on core `core`.
    pub fn ran_on(&self, core: u32) {
        self.ran_on.fetch_or(1 << (core % 64), Ordering::Relaxed);
    }

    /// The cores its threads ran on so far (bit per core index).
    pub fn cores_ran_on(&self) -> u64 {
        self.ran_on.load(Ordering::Relaxed)
    }

    /// The root of its page tables.
    pub fn root(&self) -> u64 {
        self.space.root()
    }

    pub fn space(&self) -> &AddressSpace {
        &self.space
    }
}

/// How a process is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Most cores its threads run on at once (0: no limit).
    pub cores: u16,
    /// Its `write`s to streams 1 and 2 go to Linux (fds 1 and 2 of its delegation context).
    pub stdio: bool,
    /// Started by Linux: the TSC when Lavender read its command (the `process_start` marker
    /// reports it, for the exec benchmark's stages); the command's reply follows the start.
    /// `None`: started by the command line.
    pub requested_tsc: Option<u64>,
}

impl Options {
    /// A program started by the command line: output on Lavender's console.
    pub const CONSOLE: Options = Options {
        cores: 0,
        stdio: false,
        requested_tsc: None,
    };
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

/// Starts program `name` (built into the image) with argument string `args`; returns its
/// process id.
pub fn spawn(name: &str, args: &str) -> Result<u32, SpawnError> {
    spawn_with(name, args, Options::CONSOLE)
}

/// [`spawn`] with `options`.
pub fn spawn_with(name: &str, args: &str, options: Options) -> Result<u32, SpawnError> {
    let (name, elf) = PROGRAMS
        .iter()
        .find(|(program, _)| *program == name)
        .ok_or(SpawnError::NoSuchProgram)?;
    spawn_image(name, elf, args, options)
}

/// Starts the ELF file `elf` as a process called `name` with argument string `args`; returns
/// its process id. The file is validated (`ElfImage::parse`) and copied into the new address
/// space: `elf` may go once this returns.
pub fn spawn_image(
    name: &str,
    elf: &[u8],
    args: &str,
    options: Options,
) -> Result<u32, SpawnError> {
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
        name: String::from(name),
        space,
        options,
        stopped: AtomicBool::new(false),
        signal: AtomicU8::new(0),
        cpu_ticks: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        last_call_at: AtomicU64::new(0),
        in_calls: AtomicUsize::new(0),
        slots: AtomicU32::new(0),
        ran_on: AtomicU64::new(0),
        exiting: AtomicBool::new(false),
        status: AtomicI32::new(0),
        killed_by: AtomicU32::new(0),
        live: AtomicUsize::new(1),
        most_live: AtomicUsize::new(1),
        threads_created: AtomicU64::new(1),
        zombies: IrqMutex::new(Vec::new()),
        started_at: time::now(),
        first_user_tsc: AtomicU64::new(0),
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
            .u64("pages", pages as u64)
            .u64("requested_tsc", options.requested_tsc.unwrap_or(0))
            .u64("loaded_tsc", process.started_at);
    });
    jobs::started(&process);
    // The first thread is not joinable: the process ends with it or after it.
    if sched::spawn_user(process.clone(), start, false).is_none() {
        jobs::forget(pid);
        return Err(SpawnError::NoThread);
    }
    if options.requested_tsc.is_some() {
        crate::kernel::delegation::notify_before_reply(pid, ProcessState::Started);
    } else {
        crate::kernel::delegation::notify(pid, ProcessState::Started);
    }
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
    let live = owner.live.fetch_add(1, Ordering::AcqRel) + 1;
    owner.most_live.fetch_max(live, Ordering::Relaxed);
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
            .str("name", &owner.name)
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
    kill(&owner, guest_lavender::exceptions::signal(vector));
    drop(owner);
    sched::exit_with(0)
}

/// Ends `owner` as killed by Unix signal `signal` (status 128 + signal): its threads stop at
/// their next kernel entry (a stopped process is woken for it). The first end wins.
pub fn kill(owner: &Process, signal: u8) {
    if !owner.exiting.load(Ordering::Acquire) {
        owner
            .signal
            .compare_exchange(0, signal, Ordering::AcqRel, Ordering::Acquire)
            .ok();
    }
    begin_exit(owner, 128 + i32::from(signal));
    owner.stopped.store(false, Ordering::Release);
}

/// Stops (`true`) or continues `owner`; whether that changed its state.
pub fn set_stopped(owner: &Process, stopped: bool) -> bool {
    if owner.exiting.load(Ordering::Acquire) {
        return false;
    }
    owner.stopped.swap(stopped, Ordering::AcqRel) != stopped
}

/// Called before returning to user mode (after a system call or an interrupt that came from
/// user mode): a thread of an ending process ends here instead.
pub fn before_user_return() {
    let Some(owner) = sched::current_process() else {
        return;
    };
    // A stopped process's threads park here, looking again every few milliseconds (the
    // scheduler's tick wakes sleepers), until it is continued or killed.
    while owner.is_stopped() && !owner.is_exiting() {
        sched::sleep_until(time::now().saturating_add(time::us_to_ticks(STOPPED_NAP_US)));
    }
    let ending = owner.is_exiting();
    drop(owner);
    if ending {
        sched::exit_with(0);
    }
}

/// How often a parked thread of a stopped process looks whether it may go on.
const STOPPED_NAP_US: u64 = 5_000;

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
    let now = time::now();
    let runtime_us = time::ticks_to_us(now.wrapping_sub(owner.started_at));
    let killed_by = owner.killed_by.load(Ordering::Acquire);
    // Kernel-wide: threads moved off leaving cores and taken by idle ones, so far.
    let counters = sched::counters();
    info!(
        "process {} ({}) exited with status {status} after {runtime_us} us",
        owner.pid, owner.name
    );
    console::marker("process_exit", |o| {
        o.u64("pid", u64::from(owner.pid))
            .str("name", &owner.name)
            .i64("status", i64::from(status))
            .u64("threads", owner.threads_created.load(Ordering::Relaxed))
            .u64("runtime_us", runtime_us)
            .u64(
                "first_user_tsc",
                owner.first_user_tsc.load(Ordering::Relaxed),
            )
            .u64("exit_tsc", now)
            .u64("kernel_threads_created", counters.created)
            .u64("kernel_threads_exited", counters.exited)
            .u64("migrated", counters.migrated)
            .u64("stolen", counters.stolen)
            .u64("heap_used", heap::used() as u64);
        let (rung, heard) = crate::kernel::delegation::doorbells();
        o.u64("doorbells_rung", rung).u64("doorbells_heard", heard);
        if killed_by != 0 {
            o.str(
                "killed_by",
                guest_lavender::exceptions::mnemonic((killed_by - 1) as u8),
            );
        }
    });
    let signal = owner.signal.load(Ordering::Acquire);
    let state = if signal != 0 {
        ProcessState::Killed { signal }
    } else {
        ProcessState::Exited { status }
    };
    owner.release_slots();
    jobs::ended(owner, status);
    crate::kernel::delegation::process_exited(owner.pid, state);
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
