//! System-call delegation: file system calls of Lavender processes, run by Linux's PV agent.
//!
//! The region Lavender shares with Linux (`vmcall_proto::delegation` gives its layout) holds
//! one connection per delegating process: a request ring, a reply ring and
//! [`CALLS_IN_FLIGHT`] slices of the data window. A process gets a connection at its first
//! delegated call and gives it back when it exits (a process-state notification on the
//! connection tells the agent to drop the process's Linux-side context). Connection 0 is the
//! control connection: Linux starts, signals and lists processes (`kernel::jobs` runs the
//! commands) and hears of every process's state change.
//!
//! A calling thread takes one of its connection's call slots, copies its input from user
//! memory into the slot's window slice (the one copy on Lavender's side; none for a buffer in
//! the process's window buffer, its connection's bulk extent that [`map_window_buffer`]
//! mapped into it, whose bytes the request names as they are), pushes the request
//! and waits: it polls the reply ring, yielding its core between looks, for [`SPIN_US`], then
//! sleeps until Linux's agent rings Lavender's doorbell after a reply (the region's interrupt
//! vector, by the `DOORBELL` hypercall; the waiter raises the ring's `consumer_waiting` flag
//! before it sleeps, so the agent rings only then) or, should the ring be missed, its next
//! timer tick. Whichever waiting thread pops a reply hands it to the slot it names, so several
//! threads of one process may wait at once. Lavender rings Linux's doorbell in turn after a
//! request or a control message when the agent's thread sleeps on that ring.
//!
//! A call waits as long as Linux's server lives, however long the call takes (a read of a
//! FIFO may take minutes). The server's liveness words in the window tell (see
//! `vmcall_proto::delegation::ServiceLiveness`): when its heartbeat stays unchanged for
//! [`SILENCE_MS`] every waiting caller gets `EIO` and new calls fail at once; when a new
//! server epoch begins (the agent restarted it), calls sent to the old one get `EIO` at once
//! and their slots are freed, since the new server refuses requests of other epochs
//! without touching their buffers. When the hypervisor says Linux is down (it panicked and
//! was stopped), the server is dead for good at once: no silence to wait out. A slot abandoned while its server may still live stays
//! reserved until the late reply frees it (Linux may still write the slice).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use guest_lavender::call_slots::{AgentWatch, CallSlots, Delivery};
use lavender_abi::{Delegation, WINDOW_BUFFER_BASE};
use log::{info, warn};
use spin::Once;
use vmcall_proto::bootinfo::{BootInfo, PEER_HYPERVISOR};
use vmcall_proto::cores::CoreId;
use vmcall_proto::delegation::{
    addressed_to, errno, to_lavender_ring, to_linux_ring, ServiceLiveness, WindowPlan,
    CALLS_IN_FLIGHT, CONNECTIONS, SILENCE_MS,
};
use vmcall_proto::message::{
    Caller, Notification, Outcome, ProcessCommand, ProcessState, Reply, SyscallFlags,
    SyscallRequest,
};
use vmcall_proto::region::{BufferRef, DataWindow, DATA_ALIGN};
use vmcall_proto::ring::{Consumer, Producer, SleepCheck};

use crate::kernel::arch::address_space::AddressSpace;
use crate::kernel::jobs;
use crate::kernel::process::Process;
use crate::kernel::sched::Doorbell;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{arch, console, sched, time};

/// How long a caller polls (yielding between looks) before it sleeps between looks.
const SPIN_US: u64 = 500;
/// Sleep between looks after that: short, so a woken thread looks again soon after the
/// timer tick that woke it (a caller waiting for a reply is woken by the doorbell first).
const NAP_US: u64 = 100;
/// Encoded messages fit in one ring slot payload.
const MESSAGE_BYTES: usize = 120;

struct Connection {
    /// The process holding it (0: free). Always 0 for the control connection.
    owner: AtomicU32,
    /// The process that mapped the connection's bulk extent (`window_buffer`), 0: none since
    /// the connection was taken. Only its calls may name the extent.
    bulk_mapped_by: AtomicU32,
    /// Whether a process may have left data in the bulk extent (it was mapped since it was
    /// last zeroed; the hypervisor zeroes the whole region at boot). Held while a process
    /// maps it, with interrupts on: zeroing takes milliseconds under Bochs.
    bulk_dirty: spin::Mutex<bool>,
    requests: IrqMutex<Producer<'static>>,
    replies: IrqMutex<Consumer<'static>>,
    calls: CallSlots<{ CALLS_IN_FLIGHT as usize }>,
}

struct Channel {
    /// The guest serving the region (its boot-info `peer`): Linux.
    peer: u32,
    /// The region's guest-physical base: `DOORBELL` with it wakes that guest.
    base: u64,
    window: DataWindow<'static>,
    liveness: ServiceLiveness<'static>,
    plan: WindowPlan,
    connections: [Connection; CONNECTIONS as usize],
}

static CHANNEL: Once<Channel> = Once::new();
/// Rung when Linux's agent rings Lavender's doorbell: a reply or a command is on a ring.
static LINUX_RANG: Doorbell = Doorbell::new();
/// The interrupt vector of Linux's doorbell (the region's boot-info `vector`; 0: none).
static VECTOR: AtomicU8 = AtomicU8::new(0);
/// Doorbells rung into Linux, and rung by it.
static RUNG: AtomicU64 = AtomicU64::new(0);
static HEARD: AtomicU64 = AtomicU64::new(0);
static AGENT: AgentWatch = AgentWatch::new();
/// Malformed messages from Linux, dropped.
static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// Attaches the region shared with Linux, if the boot-info page names one.
pub fn init(boot_info: &BootInfo) {
    let Some(info) = boot_info
        .shared_regions()
        .iter()
        .find(|region| region.peer != PEER_HYPERVISOR)
    else {
        info!("delegation: no region shared with Linux");
        return;
    };
    let view = match arch::shared::region(info).and_then(|region| region.attach()) {
        Ok(view) => view,
        Err(problem) => {
            warn!(
                "delegation: region at {:#x} refused: {problem}",
                info.guest_physical
            );
            console::marker("lavender_delegation", |o| {
                o.bool("attached", false).display("error", &problem);
            });
            return;
        }
    };
    let channel = (|| {
        let window = view.data_window();
        let plan = WindowPlan::for_region(&view).ok_or("data window too small")?;
        let liveness =
            ServiceLiveness::new(view.data_window_words()).ok_or("data window too small")?;
        let region = view.region();
        let mut endpoints: [Option<(Producer<'static>, Consumer<'static>)>; CONNECTIONS as usize] =
            core::array::from_fn(|index| {
                let index = index as u32;
                let requests = view.ring(to_linux_ring(index)).ok()?;
                let replies = view.ring(to_lavender_ring(index)).ok()?;
                Some((
                    Producer::attach(&region, &requests).ok()?,
                    Consumer::attach(&region, &replies).ok()?,
                ))
            });
        if endpoints.iter().any(Option::is_none) {
            return Err("a connection's rings are missing or malformed");
        }
        let connections = core::array::from_fn(|index| {
            let (requests, replies) = endpoints[index]
                .take()
                .unwrap_or_else(|| unreachable!("checked above"));
            Connection {
                owner: AtomicU32::new(0),
                bulk_mapped_by: AtomicU32::new(0),
                bulk_dirty: spin::Mutex::new(false),
                requests: IrqMutex::new(requests),
                replies: IrqMutex::new(replies),
                calls: CallSlots::new(),
            }
        });
        Ok(Channel {
            peer: info.peer,
            base: info.guest_physical,
            window,
            liveness,
            plan,
            connections,
        })
    })();
    match channel {
        Ok(channel) => {
            let slice = channel.plan.slice_len();
            let bulk = channel.plan.bulk(1).map_or(0, |bulk| bulk.len);
            CHANNEL.call_once(|| channel);
            VECTOR.store(info.vector, Ordering::Relaxed);
            // Linux's first command rings the doorbell: nothing polls for it.
            poll_control();
            info!(
                "delegation: region at {:#x}, {} process connections, {slice} bytes per call, \
                 window buffers of {bulk} bytes",
                info.guest_physical,
                CONNECTIONS - 1
            );
            console::marker("lavender_delegation", |o| {
                o.bool("attached", true)
                    .u64("connections", u64::from(CONNECTIONS - 1))
                    .u64("slice_bytes", u64::from(slice))
                    .u64("window_buffer_bytes", u64::from(bulk));
            });
        }
        Err(problem) => {
            warn!(
                "delegation: region at {:#x} refused: {problem}",
                info.guest_physical
            );
            console::marker("lavender_delegation", |o| {
                o.bool("attached", false).str("error", problem);
            });
        }
    }
}

/// The hypervisor says guest `guest` is down. If it is the one serving the region, its server
/// is dead for good: every waiting caller gets `EIO` at its next look (within a timer tick)
/// and every new call fails at once. The calls whose callers were waiting in it then, if it
/// was (callers waiting for a free slot of their connection fail too, uncounted).
pub fn guest_down(guest: u32) -> Option<usize> {
    let channel = CHANNEL.get().filter(|channel| channel.peer == guest)?;
    AGENT.guest_down();
    Some(
        channel.connections[1..]
            .iter()
            .map(|connection| connection.calls.waiting())
            .sum(),
    )
}

/// `delegate(request)`: the system call. Returns the value, or the Linux errno.
pub fn delegate(owner: &Process, request_address: u64) -> Result<u64, u16> {
    let mut raw = [0u8; Delegation::SIZE];
    owner
        .space()
        .read(request_address, &mut raw)
        .map_err(|_| errno::EFAULT)?;
    delegate_request(owner, &Delegation::from_bytes(&raw))
}

/// Runs `request` (its buffers in `owner`'s memory) on Linux for `owner`: the `delegate`
/// system call's work, and the kernel's own for a process whose standard streams Linux holds.
pub fn delegate_request(owner: &Process, request: &Delegation) -> Result<u64, u16> {
    let channel = CHANNEL.get().ok_or(errno::ENOSYS)?;
    let _in_call = owner.count_call();
    let request = *request;
    if request.flags & !Delegation::CONTINUATION != 0 {
        return Err(errno::EINVAL);
    }
    // New calls fail fast while the server is dead.
    if !channel.agent_alive() {
        return Err(errno::EIO);
    }
    let connection_index = channel.connection_for(owner.pid()).ok_or(errno::EAGAIN)?;
    let connection = &channel.connections[connection_index as usize];
    let slot = connection.take_slot(channel)?;
    match channel.call(owner, connection_index, slot, &request) {
        Ok(value) => {
            connection.release(slot);
            Ok(value)
        }
        Err(Failure::Errno(code)) => {
            connection.release(slot);
            Err(code)
        }
        // The slot is left to the late reply.
        Err(Failure::Abandoned) => Err(errno::EIO),
    }
}

/// `window_buffer()`: maps the bulk extent of `owner`'s connection into its address space
/// at [`WINDOW_BUFFER_BASE`], zeroed if an earlier process on the connection mapped it (and
/// may have left data in it), and returns its length; 0 when there is none.
pub fn map_window_buffer(owner: &Process) -> u64 {
    let Some(channel) = CHANNEL.get() else {
        return 0;
    };
    let Some(index) = channel.connection_for(owner.pid()) else {
        return 0;
    };
    let connection = &channel.connections[index as usize];
    let Some(bulk) = channel.plan.bulk(index) else {
        return 0;
    };
    // Two threads of the process asking at once: the second waits for the first's mapping.
    let mut dirty = connection.bulk_dirty.lock();
    if connection.bulk_mapped_by.load(Ordering::Acquire) == owner.pid() {
        return u64::from(bulk.len);
    }
    let Ok((bytes, len)) = channel.window.raw_parts(bulk) else {
        return 0;
    };
    if *dirty && arch::copy::zero_window(&channel.window, bulk).is_err() {
        return 0;
    }
    *dirty = true;
    // The window is identity-mapped: its address is its guest-physical address.
    let physical = bytes as u64;
    if owner
        .space()
        .map_shared(WINDOW_BUFFER_BASE, physical, len as u64)
        .is_err()
    {
        return 0;
    }
    connection
        .bulk_mapped_by
        .store(owner.pid(), Ordering::Release);
    u64::from(bulk.len)
}

/// The part of `bulk` (mapped at [`WINDOW_BUFFER_BASE`]) that user range `address..+length`
/// is, if it lies inside it and starts 8-aligned (the window's alignment).
fn in_bulk(bulk: BufferRef, address: u64, length: u64) -> Option<BufferRef> {
    let offset = address.checked_sub(WINDOW_BUFFER_BASE)?;
    let end = offset.checked_add(length)?;
    (length > 0 && offset % u64::from(DATA_ALIGN) == 0 && end <= u64::from(bulk.len)).then(|| {
        BufferRef {
            offset: bulk.offset + offset as u32,
            len: length as u32,
        }
    })
}

/// Why a call failed.
enum Failure {
    Errno(u16),
    /// The server died first: the slot was left for the late reply or the next epoch to
    /// free.
    Abandoned,
}

impl From<u16> for Failure {
    fn from(code: u16) -> Self {
        Self::Errno(code)
    }
}

impl Channel {
    /// Whether Linux's server is alive (its heartbeat changed within [`SILENCE_MS`]).
    fn agent_alive(&self) -> bool {
        AGENT.alive(
            self.liveness.heartbeat(),
            time::now(),
            time::us_to_ticks(SILENCE_MS * 1000),
        )
    }

    /// The connection `pid` holds, taking a free one at its first call.
    fn connection_for(&self, pid: u32) -> Option<u32> {
        let process_connections = 1..CONNECTIONS;
        if let Some(index) = process_connections.clone().find(|index| {
            self.connections[*index as usize]
                .owner
                .load(Ordering::Acquire)
                == pid
        }) {
            return Some(index);
        }
        // A connection whose last process left calls in flight (abandoned when the server
        // died) waits for their late replies: Linux may still write its slices and extent.
        process_connections.into_iter().find(|index| {
            let connection = &self.connections[*index as usize];
            connection.calls.in_flight() == 0
                && connection
                    .owner
                    .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        })
    }

    /// The bulk extent of `connection` (number `index`) if `pid` mapped it.
    fn mapped_bulk(&self, connection: &Connection, index: u32, pid: u32) -> Option<BufferRef> {
        (connection.bulk_mapped_by.load(Ordering::Acquire) == pid)
            .then(|| self.plan.bulk(index))
            .flatten()
    }

    fn call(
        &self,
        owner: &Process,
        connection_index: u32,
        slot: u32,
        request: &Delegation,
    ) -> Result<u64, Failure> {
        let connection = &self.connections[connection_index as usize];
        let slice = self
            .plan
            .slice(connection_index, slot)
            .ok_or(errno::EINVAL)?;
        // A buffer in the process's mapped bulk extent is named as it is; any other goes
        // through the slice: input at its start, output after it (8-aligned), each cut to
        // what fits.
        let bulk = self.mapped_bulk(connection, connection_index, owner.pid());
        let input_in_bulk = bulk.and_then(|b| in_bulk(b, request.input, request.input_length));
        let output_in_bulk = bulk.and_then(|b| in_bulk(b, request.output, request.output_length));
        let input = input_in_bulk.unwrap_or(BufferRef {
            offset: slice.offset,
            len: request.input_length.min(u64::from(slice.len)) as u32,
        });
        let output = output_in_bulk.unwrap_or_else(|| {
            let used = if input_in_bulk.is_some() {
                0
            } else {
                input.len
            };
            let output_at = used.next_multiple_of(DATA_ALIGN).min(slice.len);
            BufferRef {
                offset: slice.offset + output_at,
                len: request.output_length.min(u64::from(slice.len - output_at)) as u32,
            }
        });
        if input_in_bulk.is_none() {
            copy_in(&self.window, owner.space(), request.input, input)?;
        }
        let epoch = self.liveness.epoch();
        let request_id = connection.calls.arm(slot as usize, epoch);
        let message = SyscallRequest {
            request_id,
            caller: Caller {
                core: CoreId::new(u64::from(sched::current_core())).ok_or(errno::EINVAL)?,
                process: owner.pid(),
                thread: 0,
            },
            number: request.number,
            args: [request.args[0], request.args[1], request.args[2], 0, 0, 0],
            flags: SyscallFlags::from_bits_truncate(request.flags as u16),
            buffers: [
                if input.len == 0 {
                    BufferRef::EMPTY
                } else {
                    input
                },
                if output.len == 0 {
                    BufferRef::EMPTY
                } else {
                    output
                },
            ],
        };
        let mut bytes = [0u8; MESSAGE_BYTES];
        let len = message.encode(&mut bytes).map_err(|_| errno::EINVAL)?;
        let started = time::now();
        self.push(&connection.requests, &bytes[..len])?;
        let value = self.wait(connection, slot, epoch, started)?;
        if output.len > 0 && output_in_bulk.is_none() {
            let written = value.min(u64::from(output.len)) as u32;
            copy_out(
                &self.window,
                owner.space(),
                BufferRef {
                    offset: output.offset,
                    len: written,
                },
                request.output,
            )?;
        }
        Ok(value)
    }

    /// Waits for slot `slot`'s reply from the server of `epoch`, polling the connection's
    /// reply ring, while that server lives.
    fn wait(
        &self,
        connection: &Connection,
        slot: u32,
        epoch: u64,
        started: u64,
    ) -> Result<u64, Failure> {
        let slot = slot as usize;
        let spin_until = started.saturating_add(time::us_to_ticks(SPIN_US));
        loop {
            // Read before looking, so a ring after the look ends the sleep below.
            let seen = LINUX_RANG.generation();
            connection.take_replies(self.liveness.epoch());
            if let Some(outcome) = connection.calls.outcome(slot) {
                return if outcome >= 0 {
                    Ok(outcome as u64)
                } else {
                    Err(Failure::Errno(outcome.unsigned_abs().min(4095) as u16))
                };
            }
            let gone = self.liveness.epoch() != epoch || !self.agent_alive();
            if gone && connection.calls.abandon(slot) {
                return Err(Failure::Abandoned);
            }
            let now = time::now();
            if now < spin_until {
                x86_64::instructions::interrupts::without_interrupts(sched::preempt);
                continue;
            }
            // The agent rings only when the flag is up (the doorbell rule).
            let check = connection
                .replies
                .try_lock()
                .map(|mut ring| ring.prepare_to_sleep());
            if let Some(Ok(SleepCheck::MessagesReady)) = check {
                continue;
            }
            LINUX_RANG.sleep_until(now + time::us_to_ticks(NAP_US), seen);
        }
    }
}

impl Channel {
    /// Pushes `bytes`, sleeping while the ring is full, as long as the server lives.
    fn push(&self, ring: &IrqMutex<Producer<'static>>, bytes: &[u8]) -> Result<(), u16> {
        loop {
            let pushed = {
                let mut ring = ring.lock();
                ring.try_push(bytes).map(|()| ring.wake_needed())
            };
            match pushed {
                Ok(wake) => {
                    if wake {
                        self.ring_linux();
                    }
                    return Ok(());
                }
                Err(vmcall_proto::ring::PushError::Full) => {}
                Err(_) => return Err(errno::EIO),
            }
            if !self.agent_alive() {
                return Err(errno::EIO);
            }
            sched::sleep_until(time::now() + time::us_to_ticks(NAP_US));
        }
    }

    /// Pushes `bytes` if there is room (best effort), waking the agent's thread if it sleeps.
    fn try_push(&self, ring: &IrqMutex<Producer<'static>>, bytes: &[u8]) {
        let wake = {
            let mut ring = ring.lock();
            ring.try_push(bytes).is_ok() && ring.wake_needed()
        };
        if wake {
            self.ring_linux();
        }
    }

    /// Wakes the agent's thread that sleeps on a ring Lavender just pushed to.
    fn ring_linux(&self) {
        if arch::hypercall::doorbell(self.base).is_ok() {
            RUNG.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `vector` is Linux's doorbell.
pub fn is_doorbell(vector: u8) -> bool {
    vector != 0 && VECTOR.load(Ordering::Relaxed) == vector
}

/// Linux's agent rang (interrupts off): wakes the callers sleeping for replies, and runs the
/// commands waiting on the control connection.
pub fn doorbell_rang() {
    HEARD.fetch_add(1, Ordering::Relaxed);
    LINUX_RANG.ring();
    poll_control();
}

/// Doorbells Lavender rang into Linux, and Linux rang into Lavender, so far.
pub fn doorbells() -> (u64, u64) {
    (RUNG.load(Ordering::Relaxed), HEARD.load(Ordering::Relaxed))
}

impl Connection {
    fn release(&self, slot: u32) {
        self.calls.release(slot as usize);
    }

    /// A free call slot, waiting while every slot is busy (other threads of this process are
    /// waiting for Linux) as long as the server lives.
    fn take_slot(&self, channel: &Channel) -> Result<u32, u16> {
        loop {
            let epoch = channel.liveness.epoch();
            self.calls.reclaim(epoch);
            if let Some(slot) = self.calls.take() {
                return Ok(slot as u32);
            }
            self.take_replies(epoch);
            if !channel.agent_alive() {
                return Err(errno::EIO);
            }
            sched::sleep_until(time::now() + time::us_to_ticks(NAP_US));
        }
    }

    /// Pops every reply waiting on this connection and hands each to its slot. Whoever holds
    /// the ring does this for everyone; others look at their slot meanwhile. Replies for
    /// another epoch than `epoch` (the new server refusing its predecessor's requests) are
    /// dropped: their slots were reclaimed.
    fn take_replies(&self, epoch: u64) {
        let Some(mut replies) = self.replies.try_lock() else {
            return;
        };
        let mut bytes = [0u8; MESSAGE_BYTES];
        loop {
            let len = match replies.try_pop(&mut bytes) {
                Ok(Some(len)) => len,
                Ok(None) => return,
                Err(_) => {
                    note_malformed();
                    return;
                }
            };
            let Ok(reply) = Reply::decode(&bytes[..len]) else {
                note_malformed();
                continue;
            };
            let value = match reply.outcome {
                Outcome::Value(value) => value.min(i64::MAX as u64) as i64,
                Outcome::Errno(errno) => -i64::from(errno.get()),
            };
            // Deliveries are serialised: only the holder of the ring delivers.
            match self.calls.deliver(reply.request_id, value) {
                Delivery::Unknown if addressed_to(reply.request_id, epoch) => note_malformed(),
                Delivery::Unknown | Delivery::Answered | Delivery::LateFreed => {}
            }
        }
    }
}

fn note_malformed() {
    if MALFORMED.fetch_add(1, Ordering::Relaxed) == 0 {
        warn!("delegation: malformed message from Linux dropped (reported once)");
    }
}

/// User memory at `address` into the window at `buffer`: one copy.
fn copy_in(
    window: &DataWindow<'static>,
    space: &AddressSpace,
    address: u64,
    buffer: BufferRef,
) -> Result<(), u16> {
    space
        .read_into_window(address, window, buffer)
        .map_err(|_| errno::EFAULT)
}

/// The window at `buffer` into user memory at `address`: one copy.
fn copy_out(
    window: &DataWindow<'static>,
    space: &AddressSpace,
    buffer: BufferRef,
    address: u64,
) -> Result<(), u16> {
    space
        .write_from_window(address, window, buffer)
        .map_err(|_| errno::EFAULT)
}

/// A process ended (called once, from the scheduler, interrupts off): its connection, if it
/// held one, tells the agent to drop its context and becomes free; the control connection
/// tells Linux the status. Best effort: a full ring drops the notification (the agent also
/// drops a connection's context when a new process starts using it).
pub fn process_exited(pid: u32, state: ProcessState) {
    let Some(channel) = CHANNEL.get() else {
        return;
    };
    let notification = Notification::ProcessState {
        process: pid,
        state,
    };
    let mut bytes = [0u8; MESSAGE_BYTES];
    let Ok(len) = notification.encode(&mut bytes) else {
        return;
    };
    for connection in &channel.connections[1..] {
        if connection.owner.load(Ordering::Acquire) == pid {
            channel.try_push(&connection.requests, &bytes[..len]);
            connection.bulk_mapped_by.store(0, Ordering::Release);
            connection.owner.store(0, Ordering::Release);
        }
    }
    channel.try_push(&channel.connections[0].requests, &bytes[..len]);
}

/// Tells Linux on the control connection that process `pid` changed `state` (best effort, as
/// [`process_exited`]).
pub fn notify(pid: u32, state: ProcessState) {
    push_notification(pid, state, true);
}

/// [`notify`] for a change one of Linux's commands made ([`poll_control`]): without the
/// doorbell, since the command's reply follows on the same ring at once and rings for both
/// (one interrupt into Linux, and one wake-up of the agent's reader, instead of two).
pub fn notify_before_reply(pid: u32, state: ProcessState) {
    push_notification(pid, state, false);
}

fn push_notification(pid: u32, state: ProcessState, ring: bool) {
    let Some(channel) = CHANNEL.get() else {
        return;
    };
    let mut bytes = [0u8; MESSAGE_BYTES];
    if let Ok(len) = (Notification::ProcessState {
        process: pid,
        state,
    })
    .encode(&mut bytes)
    {
        let requests = &channel.connections[0].requests;
        if ring {
            channel.try_push(requests, &bytes[..len]);
        } else {
            let _ = requests.lock().try_push(&bytes[..len]);
        }
    }
}

/// Serves the control connection: runs the process commands Linux sends (`kernel::jobs`),
/// answering each with a value (a pid, a count) or an errno. Called from idle loops and timer
/// ticks (interrupts off), so a command is served while every core is busy.
pub fn poll_control() {
    let Some(channel) = CHANNEL.get() else {
        return;
    };
    let control = &channel.connections[0];
    let mut bytes = [0u8; MESSAGE_BYTES];
    loop {
        let popped = match control.replies.try_lock() {
            Some(mut ring) => match ring.try_pop(&mut bytes) {
                // Drained: the agent rings for its next command (the doorbell rule).
                Ok(None) => match ring.prepare_to_sleep() {
                    Ok(SleepCheck::MessagesReady) => continue,
                    _ => return,
                },
                popped => popped,
            },
            None => return,
        };
        let len = match popped {
            Ok(Some(len)) => len,
            Ok(None) => return,
            Err(_) => {
                note_malformed();
                return;
            }
        };
        let read_tsc = time::now();
        let command = match ProcessCommand::decode(&bytes[..len], channel.window.len_bytes()) {
            Ok(command) => command,
            Err(_) => {
                note_malformed();
                continue;
            }
        };
        let request_id = match command {
            ProcessCommand::Exec { request_id, .. }
            | ProcessCommand::Signal { request_id, .. }
            | ProcessCommand::List { request_id } => request_id,
        };
        let outcome = jobs::command(&channel.window, command, read_tsc, &mut |entry| {
            push_control(channel, entry);
        });
        let outcome = match outcome {
            Ok(value) => Outcome::Value(value),
            Err(code) => Outcome::Errno(
                vmcall_proto::message::Errno::new(code).unwrap_or_else(|| unreachable!()),
            ),
        };
        let mut reply = [0u8; MESSAGE_BYTES];
        if let Ok(len) = (Reply {
            request_id,
            outcome,
        })
        .encode(&mut reply)
        {
            push_control(channel, &reply[..len]);
        }
    }
}

/// Pushes a control message, waiting (a bounded while) for room: Linux's reader drains the
/// ring continuously, and a list's entries must not be lost.
fn push_control(channel: &Channel, bytes: &[u8]) {
    let control = &channel.connections[0];
    let deadline = time::now().saturating_add(time::us_to_ticks(CONTROL_PUSH_US));
    loop {
        let pushed = {
            let mut ring = control.requests.lock();
            ring.try_push(bytes).map(|()| ring.wake_needed())
        };
        match pushed {
            Err(vmcall_proto::ring::PushError::Full) if time::now() < deadline => {
                core::hint::spin_loop()
            }
            Ok(true) => return channel.ring_linux(),
            _ => return,
        }
    }
}

/// How long a control message waits for room in a full ring before it is dropped.
const CONTROL_PUSH_US: u64 = 20_000;
