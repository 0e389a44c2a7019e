//! System-call delegation, Linux's side: the agent runs Lavender processes' file system calls.
//!
//! Each process connection of the shared region (`vmcall_proto::delegation`) has a service
//! thread. When a process's first request arrives, that thread starts a *context thread* for
//! the process, which calls `unshare(CLONE_FILES | CLONE_FS)` (its own fd table, working
//! directory and umask, as a process of its own would have) and serves the connection until
//! the process exits (Lavender's process-state notification), a request of another process
//! shows up on the connection, or a request comes without the continuation flag. The thread
//! then ends, and with it every fd the process left open.
//!
//! Threads rather than forked proxies: the context is created at a process's first call,
//! so creation cost is on that call's path (a thread is several times cheaper to start than a
//! process), the data window stays one mapping shared by every context, and the counters are
//! plain shared memory. The isolation a proxy would add is what `unshare` already gives the
//! fd table and file-system state; the confinement of paths is `openat2`'s (see [`context`]).
//!
//! Liveness: a server publishes a new epoch in the region's liveness words when it attaches
//! and then advances the heartbeat from a thread of its own (`vmcall_proto::delegation::
//! ServiceLiveness`), so Lavender tells a slow call from a dead server; requests addressed to
//! another epoch (sent to a server that died) are answered `EIO` without being run.
//!
//! Connections are served in parallel, each on whichever Linux CPU the scheduler gives its
//! thread, so one process's slow call never delays another's. An idle thread polls for
//! [`SPIN`], then raises its ring's `consumer_waiting` flag and sleeps until Lavender rings
//! the doorbell (`crate::doorbell`: Lavender's `DOORBELL` becomes an interrupt of the virtual
//! doorbell device, which this process's listener thread waits for).
//! Without the doorbell device it sleeps with a growing back-off up to `NAP_MAX` instead, so a
//! call reaching an idle connection then waits up to `NAP_MAX` longer. A reply wakes
//! Lavender's sleeping caller the same way, through Lavender's doorbell.

pub mod bench;
mod context;
pub mod selftest;
pub mod server;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sched::{unshare, CloneFlags};
use vmcall_proto::delegation::{
    addressed_to, to_lavender_ring, to_linux_ring, ServiceLiveness, WindowPlan, CONNECTIONS,
    HEARTBEAT_PERIOD_MS,
};
use vmcall_proto::message::{
    peek_tag, tag, Notification, Outcome, ProcessState, Reply, SyscallFlags, SyscallRequest,
};
use vmcall_proto::region::{DataWindow, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, SleepCheck};

pub use context::{Context, Limits, Root};

/// Most Linux CPUs the per-CPU counters tell apart (higher ones count in the last).
pub const MAX_CPUS: usize = 64;
/// Polling after a message before the first sleep: longer than the gap between a reply and
/// the same process's next request (about 100 µs under Bochs), so back-to-back calls are
/// served without the doorbell's way through both guests (about 380 µs more a call under
/// Bochs: `cargo xtask bench --only delegation`).
const SPIN: Duration = Duration::from_micros(300);
const NAP_MIN: Duration = Duration::from_micros(50);
/// Longest sleep of an idle service thread without the doorbell: the worst extra latency of
/// a call arriving at an idle connection. Not shorter: the service threads' wake-ups are
/// most of an idle Linux's CPU time under Bochs while a Lavender process lives.
pub const NAP_MAX: Duration = Duration::from_millis(10);
/// Room for any message of the delegation rings.
const MESSAGE_BYTES: usize = 128;

/// What the service did, for markers and benchmarks.
pub struct Counters {
    pub calls: AtomicU64,
    /// Calls served on each Linux CPU.
    pub per_cpu: [AtomicU64; MAX_CPUS],
    pub contexts_started: AtomicU64,
    pub contexts_ended: AtomicU64,
    /// Messages refused: malformed, or naming buffers outside the caller's slices.
    pub refused: AtomicU64,
    /// Requests sent to an earlier server (its epoch), answered `EIO` without being run.
    pub stale: AtomicU64,
    /// Requests a sleeping service thread found after Lavender's doorbell woke it.
    pub woken_by_doorbell: AtomicU64,
    /// Replies after which Lavender's doorbell was rung (its caller slept).
    pub doorbells_rung: AtomicU64,
    /// How long an idle service thread polls before it sleeps (µs; 0: [`SPIN`]). Set by PID 1's
    /// delegation benchmark, to time the polled path beside the doorbell's.
    pub poll_us: AtomicU64,
}

impl Counters {
    /// `(cpu, calls)` for every CPU that served at least one call.
    pub fn cpus_used(&self) -> Vec<(usize, u64)> {
        self.per_cpu
            .iter()
            .enumerate()
            .map(|(cpu, calls)| (cpu, calls.load(Ordering::Relaxed)))
            .filter(|(_, calls)| *calls > 0)
            .collect()
    }
}

/// The control connection's ends, for whoever drives Lavender (the self-test).
pub struct Control {
    pub from_lavender: Consumer<'static>,
    pub to_lavender: Producer<'static>,
    pub window: DataWindow<'static>,
    pub plan: WindowPlan,
    /// The server's liveness words (read only here: the server writes them).
    pub liveness: ServiceLiveness<'static>,
}

/// Everything a service thread needs besides its rings.
struct Shared {
    window: DataWindow<'static>,
    plan: WindowPlan,
    /// This server's epoch.
    epoch: u64,
    root: Root,
    limits: Limits,
    counters: &'static Counters,
}

/// The validated view of `region`, its window, the plan cutting it and the liveness words.
fn layout(
    region: SharedRegion<'static>,
) -> Result<
    (
        vmcall_proto::region::RegionView<'static>,
        DataWindow<'static>,
        WindowPlan,
        ServiceLiveness<'static>,
    ),
    String,
> {
    let view = region.attach().map_err(|e| e.to_string())?;
    let window = view.data_window();
    let plan = WindowPlan::for_region(&view).ok_or("the data window is too small")?;
    let liveness =
        ServiceLiveness::new(view.data_window_words()).ok_or("the data window is too small")?;
    Ok((view, window, plan, liveness))
}

/// Connection `connection`'s ends on Linux's side: Lavender's requests and our replies.
fn ends(
    region: SharedRegion<'static>,
    view: &vmcall_proto::region::RegionView<'static>,
    connection: u32,
) -> Result<(Consumer<'static>, Producer<'static>), String> {
    let requests = view
        .ring(to_linux_ring(connection))
        .map_err(|e| e.to_string())?;
    let replies = view
        .ring(to_lavender_ring(connection))
        .map_err(|e| e.to_string())?;
    Ok((
        Consumer::attach(&region, &requests).map_err(|e| format!("{e:?}"))?,
        Producer::attach(&region, &replies).map_err(|e| format!("{e:?}"))?,
    ))
}

/// The control connection, for whoever drives Lavender.
pub fn open_control(region: SharedRegion<'static>) -> Result<Control, String> {
    let (view, window, plan, liveness) = layout(region)?;
    let (from_lavender, to_lavender) = ends(region, &view, 0)?;
    Ok(Control {
        from_lavender,
        to_lavender,
        window,
        plan,
        liveness,
    })
}

/// Serves every process connection of `region`, confined to `root`, one thread each
/// (they run for good), as the region's next server epoch, with a heartbeat thread.
pub fn serve(
    region: SharedRegion<'static>,
    root: &Path,
    limits: Limits,
    counters: &'static Counters,
) -> Result<(), String> {
    let root =
        Root::open(root).map_err(|e| format!("cannot open {}: {}", root.display(), e.desc()))?;
    let (view, window, plan, liveness) = layout(region)?;
    if let Err(reason) = crate::doorbell::listen() {
        crate::report::emit(&crate::report::error("doorbell", &reason, |_| {}));
    }
    let epoch = liveness.begin_epoch();
    thread::Builder::new()
        .name("delegation-heartbeat".into())
        .spawn(move || loop {
            liveness.beat();
            thread::sleep(Duration::from_millis(HEARTBEAT_PERIOD_MS));
        })
        .map_err(|e| format!("cannot start the heartbeat thread: {e}"))?;
    let shared = Arc::new(Shared {
        window,
        plan,
        epoch,
        root,
        limits,
        counters,
    });
    for connection in 1..CONNECTIONS {
        let (requests, replies) = ends(region, &view, connection)?;
        let shared = shared.clone();
        thread::Builder::new()
            .name(format!("delegation-{connection}"))
            .spawn(move || serve_connection(connection, requests, replies, shared))
            .map_err(|e| format!("cannot start a service thread: {e}"))?;
    }
    Ok(())
}

type Message = ([u8; MESSAGE_BYTES], usize);

/// One connection, for good: a context thread per process that uses it, one after another.
fn serve_connection(
    connection: u32,
    mut requests: Consumer<'static>,
    mut replies: Producer<'static>,
    shared: Arc<Shared>,
) {
    let mut pending: Option<Message> = None;
    loop {
        let message = pending
            .take()
            .unwrap_or_else(|| next_message(&mut requests, &shared));
        let bytes = &message.0[..message.1];
        let request = match peek_tag(bytes) {
            Ok(tag::SYSCALL_REQUEST) => SyscallRequest::decode(bytes, shared.window.len_bytes()),
            // A process's end whose context is gone already, or nothing we serve here.
            Ok(tag::NOTIFICATION) => continue,
            _ => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let Ok(request) = request else {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let context_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("lavender-{}", request.caller.process))
            .spawn(move || {
                let mut ends = (requests, replies);
                let next = serve_process(connection, &mut ends, request, &context_shared);
                (ends, next)
            });
        let handle = match spawned {
            Ok(handle) => handle,
            Err(_) => {
                // Without a thread the ends went with the closure; nothing more can be served
                // on this connection.
                return;
            }
        };
        match handle.join() {
            Ok(((r, p), next)) => {
                requests = r;
                replies = p;
                pending = next;
            }
            Err(_) => return,
        }
    }
}

/// Serves process `first.caller.process` in a context of its own until it ends; returns the
/// message that belongs to the next process, if one ended this context.
fn serve_process(
    connection: u32,
    (requests, replies): &mut (Consumer<'static>, Producer<'static>),
    first: SyscallRequest,
    shared: &Shared,
) -> Option<Message> {
    let process = first.caller.process;
    let isolated = unshare(CloneFlags::CLONE_FILES | CloneFlags::CLONE_FS);
    shared
        .counters
        .contexts_started
        .fetch_add(1, Ordering::Relaxed);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let mut context = Context::new(&shared.root, shared.limits).with_stdio_of(process);
    let mut request = first;
    let next = loop {
        let outcome = match isolated {
            Ok(()) => serve_call(connection, &mut context, &request, shared),
            Err(errno) => Err(errno),
        };
        send_reply(replies, request.request_id, outcome, shared.counters);
        if !request.flags.contains(SyscallFlags::CONTINUATION) {
            break None;
        }
        match wait_for_request(requests, shared, process) {
            Next::Request(next) => request = next,
            Next::Exited => break None,
            Next::Handover(message) => break Some(message),
        }
    };
    shared
        .counters
        .contexts_ended
        .fetch_add(1, Ordering::Relaxed);
    next
}

/// What comes next for a process's context.
enum Next {
    Request(SyscallRequest),
    /// The process exited.
    Exited,
    /// A message of another process: the context ends and the next one starts with it.
    Handover(Message),
}

/// The next request of `process`, or what ends its context instead.
fn wait_for_request(requests: &mut Consumer<'static>, shared: &Shared, process: u32) -> Next {
    loop {
        let message = next_message(requests, shared);
        let bytes = &message.0[..message.1];
        match peek_tag(bytes) {
            Ok(tag::SYSCALL_REQUEST) => {
                match SyscallRequest::decode(bytes, shared.window.len_bytes()) {
                    Ok(request) if request.caller.process == process => {
                        return Next::Request(request)
                    }
                    Ok(_) => return Next::Handover(message),
                    Err(_) => {}
                }
            }
            Ok(tag::NOTIFICATION) => {
                if let Ok(Notification::ProcessState {
                    process: ended,
                    state: ProcessState::Exited { .. } | ProcessState::Killed { .. },
                }) = Notification::decode(bytes)
                {
                    if ended == process {
                        return Next::Exited;
                    }
                }
                continue;
            }
            _ => {}
        }
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
    }
}

fn serve_call(
    connection: u32,
    context: &mut Context<'_>,
    request: &SyscallRequest,
    shared: &Shared,
) -> Result<u64, Errno> {
    if !addressed_to(request.request_id, shared.epoch) {
        // Sent to the server this one replaced: its caller has given up on it.
        shared.counters.stale.fetch_add(1, Ordering::Relaxed);
        return Err(Errno::EIO);
    }
    shared.counters.calls.fetch_add(1, Ordering::Relaxed);
    // SAFETY: sched_getcpu only reads this thread's CPU number.
    let cpu = unsafe { libc::sched_getcpu() };
    if let Ok(cpu) = usize::try_from(cpu) {
        shared.counters.per_cpu[cpu.min(MAX_CPUS - 1)].fetch_add(1, Ordering::Relaxed);
    }
    if !request
        .buffers
        .iter()
        .all(|buffer| shared.plan.belongs_to(connection, *buffer))
    {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Errno::EFAULT);
    }
    context.run(&shared.window, request)
}

fn send_reply(
    replies: &mut Producer<'static>,
    request_id: u64,
    outcome: Result<u64, Errno>,
    counters: &Counters,
) {
    let outcome = match outcome {
        Ok(value) => Outcome::Value(value.min(i64::MAX as u64)),
        Err(errno) => Outcome::Errno(
            vmcall_proto::message::Errno::new(errno as i32 as u16).unwrap_or(
                vmcall_proto::message::Errno::new(libc::EIO as u16).expect("EIO is an errno"),
            ),
        ),
    };
    let mut bytes = [0u8; MESSAGE_BYTES];
    let Ok(len) = (Reply {
        request_id,
        outcome,
    })
    .encode(&mut bytes) else {
        return;
    };
    let mut nap = NAP_MIN;
    // Lavender takes replies as its callers look for them; a full ring drains soon.
    while replies.try_push(&bytes[..len]).is_err() {
        thread::sleep(nap);
        nap = (nap * 2).min(NAP_MAX);
    }
    if crate::doorbell::wake_lavender(replies.wake_needed()) {
        counters.doorbells_rung.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits for the next message: polls for [`SPIN`], then sleeps until Lavender's doorbell;
/// without the doorbell, with a doubling back-off up to [`NAP_MAX`].
fn next_message(requests: &mut Consumer<'static>, shared: &Shared) -> Message {
    let mut buffer = [0u8; MESSAGE_BYTES];
    let spin = match shared.counters.poll_us.load(Ordering::Relaxed) {
        0 => SPIN,
        us => Duration::from_micros(us),
    };
    let spin_until = Instant::now() + spin;
    let mut nap = NAP_MIN;
    let mut rang = false;
    loop {
        let seen = crate::doorbell::BELL.generation();
        match requests.try_pop(&mut buffer) {
            Ok(Some(len)) => {
                if rang {
                    shared
                        .counters
                        .woken_by_doorbell
                        .fetch_add(1, Ordering::Relaxed);
                }
                return (buffer, len);
            }
            Ok(None) => {}
            Err(_) => {
                // Lavender's indices are inconsistent: nothing on this ring can be trusted
                // until they are sane again.
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                thread::sleep(NAP_MAX);
                continue;
            }
        }
        if Instant::now() < spin_until {
            std::hint::spin_loop();
        } else if crate::doorbell::listening() {
            // The doorbell rule: flag up, one more look, then sleep until the ring.
            if let Ok(SleepCheck::MaySleep) = requests.prepare_to_sleep() {
                crate::doorbell::BELL.wait(seen, crate::doorbell::FALLBACK);
                requests.woke();
                rang = crate::doorbell::BELL.generation() != seen;
            }
        } else {
            thread::sleep(nap);
            nap = (nap * 2).min(NAP_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::cores::CoreId;
    use vmcall_proto::delegation::{call, request_id, RINGS};
    use vmcall_proto::message::Caller;
    use vmcall_proto::region::{BufferRef, CacheLine};

    /// A service of `epoch` over a fresh 1 MiB region laid out as the hypervisor does.
    fn service(epoch: u64) -> (Shared, ServiceLiveness<'static>) {
        let lines: &'static [CacheLine] =
            Vec::leak((0..16384).map(|_| CacheLine::default()).collect());
        let region = SharedRegion::from_cache_lines(lines);
        region.initialize(&RINGS, 0).unwrap();
        let (_, window, plan, liveness) = layout(region).unwrap();
        let counters = Box::leak(Box::new(Counters {
            calls: AtomicU64::new(0),
            per_cpu: [const { AtomicU64::new(0) }; MAX_CPUS],
            contexts_started: AtomicU64::new(0),
            contexts_ended: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            woken_by_doorbell: AtomicU64::new(0),
            doorbells_rung: AtomicU64::new(0),
            poll_us: AtomicU64::new(0),
        }));
        let shared = Shared {
            window,
            plan,
            epoch,
            root: Root::open(&std::env::temp_dir()).unwrap(),
            limits: Limits::default(),
            counters,
        };
        (shared, liveness)
    }

    fn null_call(request_id: u64) -> SyscallRequest {
        SyscallRequest {
            request_id,
            caller: Caller {
                core: CoreId::new(2).unwrap(),
                process: 7,
                thread: 0,
            },
            number: call::GETPID,
            args: [0; 6],
            flags: SyscallFlags::CONTINUATION,
            buffers: [BufferRef::EMPTY; 2],
        }
    }

    #[test]
    fn each_server_attaches_as_the_next_epoch() {
        let (_, liveness) = service(0);
        assert_eq!(liveness.epoch(), 0, "a zeroed region: no server yet");
        assert_eq!(liveness.begin_epoch(), 1);
        assert_eq!(liveness.begin_epoch(), 2, "the restarted server");
    }

    #[test]
    fn a_request_sent_to_an_earlier_server_is_refused_without_being_run() {
        let (shared, _) = service(2);
        let mut context = Context::new(&shared.root, shared.limits);
        let stale = null_call(request_id(9, 1, 0));
        assert_eq!(
            serve_call(1, &mut context, &stale, &shared),
            Err(Errno::EIO)
        );
        assert_eq!(shared.counters.stale.load(Ordering::Relaxed), 1);
        assert_eq!(shared.counters.calls.load(Ordering::Relaxed), 0, "not run");
        let current = null_call(request_id(10, 2, 0));
        assert!(serve_call(1, &mut context, &current, &shared).is_ok());
        assert_eq!(shared.counters.calls.load(Ordering::Relaxed), 1);
        // Only the epoch's low byte travels: epoch 258 serves what was sent to 2.
        let (shared, _) = service(258);
        let mut context = Context::new(&shared.root, shared.limits);
        assert!(serve_call(1, &mut context, &current, &shared).is_ok());
    }
}
