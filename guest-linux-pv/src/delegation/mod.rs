//! System-call delegation, Linux's side: the agent runs Lavender processes' file system calls.
//!
//! Each process connection of the shared region (`vmcall_proto::delegation`) carries one
//! Lavender process's calls at a time. At the process's first request the connection gets a
//! [`Context`]: the process's own table of open files and its working directory (file
//! modes are masked with a umask of 022, as a new process's would be). The context lives until
//! the process exits (Lavender's process-state notification), a request of another process
//! shows up on the connection, or a request comes without the continuation flag; dropping it
//! closes every fd the process left open.
//!
//! A context is data, not a thread: any worker of the pool ([`workers`]) serves any
//! connection, one call at a time, so as many workers poll as Linux has CPUs and none waits
//! for a time slice behind another's spinning. A context's fds are the server's own
//! descriptors, reachable only through that context's table (the agent's console and
//! `/dev/mem` are not in it); the confinement of paths is `openat2`'s (see [`context`]).
//!
//! Liveness: a server publishes a new epoch in the region's liveness words when it attaches
//! and then advances the heartbeat from the workers' overseer thread (`vmcall_proto::delegation::
//! ServiceLiveness`), so Lavender tells a slow call from a dead server; requests addressed to
//! another epoch (sent to a server that died) are answered `EIO` without being run.
//!
//! Connections are served in parallel on whichever Linux CPUs the workers run, and a slow
//! call holds up only its own process (see [`workers`]). An idle pool polls for [`SPIN`],
//! then raises every ring's `consumer_waiting` flag and sleeps until Lavender rings the
//! doorbell (`crate::doorbell`: Lavender's `DOORBELL` becomes an interrupt of the virtual
//! doorbell device, which this process's listener thread waits for). Without the doorbell
//! device it sleeps with a growing back-off up to `NAP_MAX` instead, so a call reaching an
//! idle service then waits up to `NAP_MAX` longer. A reply wakes Lavender's sleeping caller
//! the same way, through Lavender's doorbell.

pub mod bench;
mod context;
pub mod selftest;
pub mod server;
mod workers;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use vmcall_proto::delegation::{
    addressed_to, to_lavender_ring, to_linux_ring, ServiceLiveness, WindowPlan, CONNECTIONS,
};
use vmcall_proto::message::{Outcome, Reply, SyscallRequest};
use vmcall_proto::region::{DataWindow, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer};

pub use context::{Context, Limits, Root};
pub use workers::CpuPins;
use workers::{Connection, Pool, WORKERS};

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
/// A null call's wait for a worker, or its service, longer than this is slow
/// (`Counters::slow_null_services`): some ten times a service's usual under Bochs.
pub const SLOW: Duration = Duration::from_micros(300);

/// What the service did, for markers and benchmarks.
pub struct Counters {
    pub calls: AtomicU64,
    /// TSC ticks the workers spent on requests, from taking one off its ring to its reply.
    pub service_ticks: AtomicU64,
    /// For the delegation benchmark, whether a mean is many calls a little slower or a few
    /// much slower: null calls (`getpid`: nothing but the round trip) whose service took
    /// longer than [`SLOW`], and their TSC ticks in all; the null calls that said when they
    /// were sent and the ticks they waited for a worker in all; those that waited longer
    /// than [`SLOW`] and their ticks.
    pub slow_null_services: AtomicU64,
    pub slow_null_service_ticks: AtomicU64,
    pub null_waits: AtomicU64,
    pub null_wait_ticks: AtomicU64,
    pub slow_null_waits: AtomicU64,
    pub slow_null_wait_ticks: AtomicU64,
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
    /// Requests a service thread found after sleeping the doorbell's whole safety net
    /// ([`crate::doorbell::FALLBACK`]) without a ring: each is a doorbell that woke no one.
    pub found_by_fallback: AtomicU64,
    /// Replies after which Lavender's doorbell was rung (its caller slept).
    pub doorbells_rung: AtomicU64,
    /// Times a worker pinned itself to another CPU than the one it ran on, because another
    /// poller held that one (`workers`' "one poller per CPU").
    pub pollers_moved: AtomicU64,
    /// Which CPU each worker is pinned to, for PID 1's CPU hotplug: see [`CpuPins`].
    pub pins: CpuPins,
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

/// Serves every process connection of `region`, confined to `root`, with a pool of workers
/// (they run for good), as the region's next server epoch, whose heartbeat the pool's
/// overseer thread beats.
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
    // umask(2) is the process's: the contexts share it, as every new process starts with it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        window,
        plan,
        epoch,
        root,
        limits,
        counters,
    }));
    let connections = (1..CONNECTIONS)
        .map(|id| {
            ends(region, &view, id)
                .map(|(requests, replies)| Connection::new(id, requests, replies))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let pool: &'static Pool = Box::leak(Box::new(Pool::new(shared, connections)));
    for worker in 0..WORKERS {
        thread::Builder::new()
            .name(format!("delegation-{worker}"))
            .spawn(move || pool.work(worker))
            .map_err(|e| format!("cannot start a service worker: {e}"))?;
    }
    thread::Builder::new()
        .name("delegation-overseer".into())
        .spawn(move || pool.oversee(liveness))
        .map_err(|e| format!("cannot start the overseer thread: {e}"))?;
    Ok(())
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
    if let Ok(cpu) = nix::sched::sched_getcpu() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::cores::CoreId;
    use vmcall_proto::delegation::{call, request_id, RINGS};
    use vmcall_proto::message::{Caller, SyscallFlags};
    use vmcall_proto::region::{BufferRef, CacheLine};

    /// A service of `epoch` over a fresh 1 MiB region laid out as the hypervisor does, and
    /// the region.
    pub(super) fn service(epoch: u64) -> (Shared, ServiceLiveness<'static>, SharedRegion<'static>) {
        let lines: &'static [CacheLine] =
            Vec::leak((0..16384).map(|_| CacheLine::default()).collect());
        let region = SharedRegion::from_cache_lines(lines);
        region.initialize(&RINGS, 0).unwrap();
        let (_, window, plan, liveness) = layout(region).unwrap();
        let counters = Box::leak(Box::new(Counters {
            calls: AtomicU64::new(0),
            service_ticks: AtomicU64::new(0),
            slow_null_services: AtomicU64::new(0),
            slow_null_service_ticks: AtomicU64::new(0),
            null_waits: AtomicU64::new(0),
            null_wait_ticks: AtomicU64::new(0),
            slow_null_waits: AtomicU64::new(0),
            slow_null_wait_ticks: AtomicU64::new(0),
            per_cpu: [const { AtomicU64::new(0) }; MAX_CPUS],
            contexts_started: AtomicU64::new(0),
            contexts_ended: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            woken_by_doorbell: AtomicU64::new(0),
            found_by_fallback: AtomicU64::new(0),
            doorbells_rung: AtomicU64::new(0),
            pollers_moved: AtomicU64::new(0),
            pins: CpuPins::default(),
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
        (shared, liveness, region)
    }

    pub(super) fn null_call(request_id: u64) -> SyscallRequest {
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
        let (_, liveness, _) = service(0);
        assert_eq!(liveness.epoch(), 0, "a zeroed region: no server yet");
        assert_eq!(liveness.begin_epoch(), 1);
        assert_eq!(liveness.begin_epoch(), 2, "the restarted server");
    }

    #[test]
    fn a_request_sent_to_an_earlier_server_is_refused_without_being_run() {
        let (shared, _, _) = service(2);
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
        let (shared, _, _) = service(258);
        let mut context = Context::new(&shared.root, shared.limits);
        assert!(serve_call(1, &mut context, &current, &shared).is_ok());
    }
}
