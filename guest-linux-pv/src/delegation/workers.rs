//! The service's workers. Any worker serves any process connection; a connection is served by
//! one worker at a time (it holds the connection's lock for the call), so a process's calls
//! run in the order it sent them and a slow call holds up its own connection only.
//!
//! **How many poll.** As many workers poll as Linux has CPUs online, each looking at every
//! connection in turn; the others are parked. A poller per connection instead would put six
//! pollers on three CPUs for six processes, and a request would wait for its poller's next
//! time slice: under Bochs a call's pick-up grew from 23 µs alone to 280-640 µs with six
//! processes. A worker asleep in one call for longer than [`SLOW_CALL`] (a read of an empty
//! pipe, an open of a FIFO) stops counting as a poller: the overseer unparks another in its
//! place, so other processes never wait long behind it; when the call returns, one parks again.
//! A worker long in a call but running (a large read's copy) still counts: another beside it
//! would only take CPU time from it.
//! There are as many workers as connections, so even with every connection in a slow call
//! none is left without a worker.
//!
//! **One poller per CPU, pinned.** Left to Linux's scheduler, two pollers end up on one CPU
//! now and then (both woken by one doorbell onto the CPU that was idle at that instant, or
//! moved by its load balancing) while another CPU idles, and then take turns there in time
//! slices of several milliseconds; a poller preempted in a call holds that call up as long. A
//! kernel trace of six processes' null calls under Bochs showed exactly that: calls of 3-6 ms,
//! and pollers moved onto a CPU another poller already ran on. So each poller claims one online
//! CPU of its own ([`Pool::owner`]) and pins itself to it: the one it is on if that is free,
//! otherwise the first free one. Sleeping or parked, it gives its claim up but stays pinned,
//! so it wakes where it polled and usually claims the same CPU again without a system call.
//! Before PID 1 takes a CPU offline it unpins whichever worker is pinned there ([`CpuPins`]),
//! so the kernel never has to break a worker's affinity.
//!
//! **Idle.** Once no worker has served a call for the spin time (`SPIN`), each poller raises
//! every ring's `consumer_waiting` flag and sleeps until Lavender's doorbell; without the
//! doorbell device it sleeps with a doubling back-off up to `NAP_MAX`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use vmcall_proto::delegation::{call, ServiceLiveness, HEARTBEAT_PERIOD_MS, PROCESS_CONNECTIONS};
use vmcall_proto::message::{
    peek_tag, tag, Notification, ProcessState, SyscallFlags, SyscallRequest,
};
use vmcall_proto::ring::{Consumer, Producer, SleepCheck};

use super::{send_reply, serve_call, Context, Shared, MAX_CPUS, MESSAGE_BYTES, NAP_MAX, NAP_MIN};

/// One per process connection.
pub const WORKERS: usize = PROCESS_CONNECTIONS as usize;
/// A call running longer than this no longer counts its worker as a poller.
const SLOW_CALL: Duration = Duration::from_millis(5);
/// Looks at the rings between a worker's tries to claim a CPU while it holds none (a few
/// hundred µs under Bochs): a worker finds none free only when it is one too many (back from a
/// slow call, about to park) or its CPU was taken away; it tries at once when it wakes.
const RECLAIM_LOOKS: u32 = 64;
/// The longest wait for a worker a null call's send time may give (`Pool::note_null_call`):
/// the time is the caller's word, and a wrong one must not swamp the sum.
const NULL_WAIT_MAX: Duration = Duration::from_secs(1);
/// How often the overseer looks for slow calls while any worker is awake (asleep, it beats
/// the heartbeat only).
const OVERSEE_PERIOD: Duration = Duration::from_millis(5);

/// The CPUs the workers are pinned to, shared with PID 1: it lives in the counters' mapping,
/// which PID 1 made before it forked the server. Before PID 1 takes a CPU offline it marks the
/// CPU leaving and unpins the worker pinned there ([`CpuPins::leaving`]); otherwise the kernel
/// would move a worker pinned to it and print `no longer affine to cpuN` on the console.
#[derive(Default)]
pub struct CpuPins {
    /// Per worker: its Linux thread id, 0 until it runs.
    tids: [AtomicU64; WORKERS],
    /// Per worker: 1 + the CPU it is pinned to, 0 while it may run anywhere.
    pinned: [AtomicU64; WORKERS],
    /// The CPUs on their way offline (bit `n` for CPU `n`): no worker pins itself there.
    leaving: AtomicU64,
}

impl CpuPins {
    /// PID 1, before it takes `cpu` offline: no worker pins itself there from now on, and the
    /// one pinned there may run anywhere again. A worker that pins itself to `cpu` meanwhile
    /// sees the mark after its pin and undoes it ([`Pool::pin`]); either way none stays pinned.
    /// Nothing here allocates (the hotplug actor calls it).
    pub fn leaving(&self, cpu: usize) {
        if cpu >= MAX_CPUS {
            return;
        }
        self.leaving.fetch_or(1 << cpu, Ordering::SeqCst);
        for (tid, pinned) in self.tids.iter().zip(&self.pinned) {
            if pinned
                .compare_exchange(cpu as u64 + 1, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let tid = tid.load(Ordering::SeqCst);
                if tid != 0 {
                    let _ = sched_setaffinity(Pid::from_raw(tid as i32), &any_cpu());
                }
            }
        }
    }

    /// PID 1, once `cpu` is online again (or its offlining failed): workers may pin there.
    pub fn back(&self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.leaving.fetch_and(!(1 << cpu), Ordering::SeqCst);
        }
    }

    /// A new server's workers: none runs or is pinned yet (the last server's threads died
    /// with it).
    fn reset(&self) {
        for (tid, pinned) in self.tids.iter().zip(&self.pinned) {
            tid.store(0, Ordering::SeqCst);
            pinned.store(0, Ordering::SeqCst);
        }
    }
}

/// A process connection: its ring ends and the context of the process using it.
pub struct Connection {
    id: u32,
    ends: Mutex<Ends>,
}

/// What a connection's worker holds while it serves it.
pub struct Ends {
    requests: Consumer<'static>,
    replies: Producer<'static>,
    /// The process using the connection and its context, from its first call to its end:
    /// its exit (Lavender's process-state notification), a call of another process on the
    /// connection, or a call without the continuation flag.
    process: Option<(u32, Context<'static>)>,
    /// Lavender's indices were inconsistent: the ring is skipped until then.
    distrusted_until: Option<Instant>,
}

impl Connection {
    pub fn new(id: u32, requests: Consumer<'static>, replies: Producer<'static>) -> Self {
        Self {
            id,
            ends: Mutex::new(Ends {
                requests,
                replies,
                process: None,
                distrusted_until: None,
            }),
        }
    }

    /// The connection's ends, unless another worker is serving it.
    fn try_ends(&self) -> Option<MutexGuard<'_, Ends>> {
        match self.ends.try_lock() {
            Ok(ends) => Some(ends),
            // A worker panicked in a call: what it held is still consistent ring state.
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// A message as it came off a ring.
pub type Message = ([u8; MESSAGE_BYTES], usize);

/// The next message on connection `ends`' ring, if one is there.
pub fn take(ends: &mut Ends, shared: &Shared) -> Option<Message> {
    if ends
        .distrusted_until
        .is_some_and(|until| Instant::now() < until)
    {
        return None;
    }
    let mut buffer = [0u8; MESSAGE_BYTES];
    match ends.requests.try_pop(&mut buffer) {
        Ok(Some(len)) => Some((buffer, len)),
        Ok(None) => None,
        Err(_) => {
            // Nothing on this ring can be trusted until its indices are sane again.
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            ends.distrusted_until = Some(Instant::now() + NAP_MAX);
            None
        }
    }
}

/// A request `act` ran: its call number and first argument.
#[derive(Clone, Copy)]
pub struct Served {
    number: u32,
    first_arg: u64,
}

/// Acts on `message`, taken off connection `id`'s ring: runs a request and replies (and says
/// which), or ends the context of a process that exited.
pub fn act(
    id: u32,
    ends: &mut Ends,
    (buffer, len): &Message,
    shared: &'static Shared,
) -> Option<Served> {
    let bytes = &buffer[..*len];
    match peek_tag(bytes) {
        Ok(tag::SYSCALL_REQUEST) => {
            match SyscallRequest::decode(bytes, shared.window.len_bytes()) {
                Ok(request) => {
                    serve_request(id, ends, &request, shared);
                    return Some(Served {
                        number: request.number,
                        first_arg: request.args[0],
                    });
                }
                Err(_) => {
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(tag::NOTIFICATION) => {
            if let Ok(Notification::ProcessState {
                process,
                state: ProcessState::Exited { .. } | ProcessState::Killed { .. },
            }) = Notification::decode(bytes)
            {
                if ends.process.as_ref().is_some_and(|(p, _)| *p == process) {
                    end_context(ends, shared);
                }
            }
        }
        _ => {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    None
}

fn serve_request(id: u32, ends: &mut Ends, request: &SyscallRequest, shared: &'static Shared) {
    let process = request.caller.process;
    if ends.process.as_ref().is_some_and(|(p, _)| *p != process) {
        end_context(ends, shared);
    }
    let (_, context) = ends.process.get_or_insert_with(|| {
        shared
            .counters
            .contexts_started
            .fetch_add(1, Ordering::Relaxed);
        let context = Context::new(&shared.root, shared.limits).with_stdio_of(process);
        (process, context)
    });
    let outcome = serve_call(id, context, request, shared);
    send_reply(
        &mut ends.replies,
        request.request_id,
        outcome,
        shared.counters,
    );
    if !request.flags.contains(SyscallFlags::CONTINUATION) {
        end_context(ends, shared);
    }
}

/// Drops the connection's context, and with it every fd its process left open.
fn end_context(ends: &mut Ends, shared: &Shared) {
    if ends.process.take().is_some() {
        shared
            .counters
            .contexts_ended
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The workers' shared state.
pub struct Pool {
    shared: &'static Shared,
    connections: Vec<Connection>,
    clock: Clock,
    /// When (the pool's µs, [`Clock`]) a worker last took a message off a ring or replied.
    last_served_us: AtomicU64,
    /// Per worker: 1 + when (the pool's µs) its current call began; 0 between calls.
    serving_since: [AtomicU64; WORKERS],
    /// Workers that may run: Linux's online CPUs plus the workers stuck in slow calls.
    target: AtomicUsize,
    /// Workers not parked. Changed under `permits`' lock.
    active: AtomicUsize,
    /// Workers not asleep on the doorbell (parked ones count as asleep).
    awake: AtomicUsize,
    /// Per worker: the CPU it has claimed to poll on, [`NOWHERE`] if none.
    cpu_of: [AtomicUsize; WORKERS],
    /// Per CPU: the worker that has claimed it, [`NOWHERE`] if none. A worker claims and gives
    /// up its own; the overseer takes a worker's claim away when it is stuck in a slow call.
    owner: [AtomicUsize; MAX_CPUS],
    /// Linux's online CPUs (bit `n` for CPU `n`), as the overseer last saw them.
    online: AtomicU64,
    /// Unparks handed out and not yet taken.
    permits: Mutex<usize>,
    unparked: Condvar,
}

impl Pool {
    pub fn new(shared: &'static Shared, connections: Vec<Connection>) -> Self {
        shared.counters.pins.reset();
        let online = online_mask();
        Self {
            shared,
            connections,
            clock: Clock::calibrated(),
            last_served_us: AtomicU64::new(0),
            serving_since: [const { AtomicU64::new(0) }; WORKERS],
            target: AtomicUsize::new((online.count_ones() as usize).clamp(1, WORKERS)),
            active: AtomicUsize::new(WORKERS),
            awake: AtomicUsize::new(WORKERS),
            cpu_of: [const { AtomicUsize::new(NOWHERE) }; WORKERS],
            owner: [const { AtomicUsize::new(NOWHERE) }; MAX_CPUS],
            online: AtomicU64::new(online),
            permits: Mutex::new(0),
            unparked: Condvar::new(),
        }
    }

    fn now_us(&self) -> u64 {
        self.clock.now_us()
    }

    /// Counts a null call's wait for a worker and its service, taken off its ring at TSC
    /// `taken` and answered at `replied`, when either was slow (`super::SLOW`). The caller
    /// may put its TSC at sending in the first argument (Lavender's `dbench` does: the
    /// hypervisor gives both guests the host's TSC); an argument that is not a time within
    /// [`NULL_WAIT_MAX`] before the take counts no wait.
    fn note_null_call(&self, served: Served, taken: u64, replied: u64) {
        let counters = self.shared.counters;
        let slow = super::SLOW.as_micros() as u64 * self.clock.ticks_per_us;
        let service = replied.saturating_sub(taken);
        if service > slow {
            counters.slow_null_services.fetch_add(1, Ordering::Relaxed);
            counters
                .slow_null_service_ticks
                .fetch_add(service, Ordering::Relaxed);
        }
        let longest = NULL_WAIT_MAX.as_micros() as u64 * self.clock.ticks_per_us;
        let waited = taken.wrapping_sub(served.first_arg);
        if served.first_arg == 0 || served.first_arg > taken || waited > longest {
            return;
        }
        counters.null_waits.fetch_add(1, Ordering::Relaxed);
        counters
            .null_wait_ticks
            .fetch_add(waited, Ordering::Relaxed);
        if waited > slow {
            counters.slow_null_waits.fetch_add(1, Ordering::Relaxed);
            counters
                .slow_null_wait_ticks
                .fetch_add(waited, Ordering::Relaxed);
        }
    }

    /// The spin time: how long pollers look after the last call before they sleep.
    fn spin_us(&self) -> u64 {
        match self.shared.counters.poll_us.load(Ordering::Relaxed) {
            0 => super::SPIN.as_micros() as u64,
            us => us,
        }
    }

    /// Worker `me`, for good.
    pub fn work(&self, me: usize) {
        self.shared.counters.pins.tids[me]
            .store(nix::unistd::gettid().as_raw() as u64, Ordering::SeqCst);
        let count = self.connections.len();
        let mut nap = NAP_MIN;
        // How the last sleep of this worker ended, while it has not served a message since.
        let mut woken = Woken::Busy;
        let mut first = me;
        // Looks at the rings since this worker last slept or parked.
        let mut looks: u32 = 0;
        loop {
            if self.active.load(Ordering::Relaxed) > self.target.load(Ordering::Relaxed) {
                self.park(me);
                looks = 0;
            }
            looks = looks.saturating_add(1);
            if (looks == 1 || looks % RECLAIM_LOOKS == 0) && !self.holds_cpu(me) {
                self.claim_cpu(me);
            }
            let mut served = false;
            // Each look starts one connection further on, so none is always looked at last.
            first = (first + 1) % count;
            for step in 0..count {
                let connection = &self.connections[(first + step) % count];
                let Some(mut ends) = connection.try_ends() else {
                    continue;
                };
                let Some(message) = take(&mut ends, self.shared) else {
                    continue;
                };
                let taken = crate::exec::tsc_now();
                let now = self.now_us();
                // At the take (a worker long in a call must not send the others to sleep) and
                // again at the reply: the spin counts from the reply. A caller that slept for
                // its reply takes a while to wake and ask again; had the pollers slept by then,
                // its next call would ring the doorbell and could take long enough for it to
                // sleep again, and so on (runs where a lone process's calls took about 1 ms
                // each under Bochs, some forty of them through the doorbell, looked so).
                self.last_served_us.store(now, Ordering::Relaxed);
                self.serving_since[me].store(now + 1, Ordering::Relaxed);
                let request = act(connection.id, &mut ends, &message, self.shared);
                self.serving_since[me].store(0, Ordering::Relaxed);
                self.last_served_us
                    .fetch_max(self.now_us(), Ordering::Relaxed);
                let counters = self.shared.counters;
                let replied = crate::exec::tsc_now();
                counters
                    .service_ticks
                    .fetch_add(replied - taken, Ordering::Relaxed);
                if let Some(null) = request.filter(|r| r.number == call::GETPID) {
                    self.note_null_call(null, taken, replied);
                }
                served = true;
            }
            if served {
                let counters = self.shared.counters;
                match woken {
                    Woken::Busy | Woken::Early => {}
                    Woken::ByDoorbell => {
                        counters.woken_by_doorbell.fetch_add(1, Ordering::Relaxed);
                    }
                    Woken::BySafetyNet => {
                        counters.found_by_fallback.fetch_add(1, Ordering::Relaxed);
                    }
                }
                woken = Woken::Busy;
                nap = NAP_MIN;
                continue;
            }
            let idle = self
                .now_us()
                .saturating_sub(self.last_served_us.load(Ordering::Relaxed));
            if idle < self.spin_us() {
                std::hint::spin_loop();
            } else if crate::doorbell::listening() {
                woken = self.sleep_until_doorbell(me);
                looks = 0;
            } else {
                self.fall_asleep(me);
                thread::sleep(nap);
                self.awake.fetch_add(1, Ordering::Relaxed);
                nap = (nap * 2).min(NAP_MAX);
                looks = 0;
            }
        }
    }

    /// The doorbell rule over every ring: flags up, one more look, then sleep until Lavender
    /// rings (or [`crate::doorbell::FALLBACK`]). A connection another worker holds is skipped:
    /// that worker is awake and looks at it again. Returns how the sleep ended.
    fn sleep_until_doorbell(&self, me: usize) -> Woken {
        let bell = &crate::doorbell::BELL;
        let seen = bell.generation();
        let mut flagged = Vec::with_capacity(self.connections.len());
        let mut ready = false;
        for connection in &self.connections {
            let Some(mut ends) = connection.try_ends() else {
                continue;
            };
            match ends.requests.prepare_to_sleep() {
                Ok(SleepCheck::MaySleep) => flagged.push(connection),
                Ok(SleepCheck::MessagesReady) => {
                    ready = true;
                    break;
                }
                Err(_) => {}
            }
        }
        let mut slept = false;
        if !ready {
            self.fall_asleep(me);
            slept = bell.wait(seen, crate::doorbell::FALLBACK);
            self.awake.fetch_add(1, Ordering::Relaxed);
        }
        for connection in flagged {
            if let Some(ends) = connection.try_ends() {
                ends.requests.woke();
            }
        }
        if bell.generation() != seen {
            Woken::ByDoorbell
        } else if slept {
            Woken::BySafetyNet
        } else {
            Woken::Early
        }
    }

    /// Worker `me` stops polling for a while: it gives its CPU up (and stays pinned to it).
    fn fall_asleep(&self, me: usize) {
        self.release_cpu(me);
        self.awake.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether worker `me` still holds the CPU it claimed, is pinned there, and the CPU is
    /// online (taken offline behind the agent's back, by hand through sysfs, it is not).
    fn holds_cpu(&self, me: usize) -> bool {
        let cpu = self.cpu_of[me].load(Ordering::Relaxed);
        cpu < MAX_CPUS
            && self.owner[cpu].load(Ordering::Relaxed) == me
            && self.pinned_to(me) == Some(cpu)
            && self.online.load(Ordering::Relaxed) & 1 << cpu != 0
    }

    fn release_cpu(&self, me: usize) {
        let cpu = self.cpu_of[me].swap(NOWHERE, Ordering::Relaxed);
        if cpu < MAX_CPUS {
            let _ =
                self.owner[cpu].compare_exchange(me, NOWHERE, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Worker `me` claims an online CPU no other poller holds, and pins itself there: the CPU
    /// it is pinned to or runs on if that one is free, otherwise the first free one. With none
    /// free it runs wherever Linux puts it.
    fn claim_cpu(&self, me: usize) {
        self.release_cpu(me);
        let pins = &self.shared.counters.pins;
        let usable = self.online.load(Ordering::Relaxed) & !pins.leaving.load(Ordering::SeqCst);
        let pinned = self.pinned_to(me);
        let here = pinned.or_else(|| sched_getcpu().ok());
        for cpu in here.into_iter().chain(0..MAX_CPUS) {
            if cpu >= MAX_CPUS || usable & 1 << cpu == 0 {
                continue;
            }
            if self.owner[cpu]
                .compare_exchange(NOWHERE, me, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if pinned != Some(cpu) && !self.pin(me, Some(cpu)) {
                self.owner[cpu].store(NOWHERE, Ordering::Relaxed);
                continue;
            }
            if here != Some(cpu) {
                self.shared
                    .counters
                    .pollers_moved
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.cpu_of[me].store(cpu, Ordering::Relaxed);
            return;
        }
        if pinned.is_some() {
            self.pin(me, None);
        }
    }

    /// The CPU worker `me` is pinned to, if any.
    fn pinned_to(&self, me: usize) -> Option<usize> {
        let pinned = self.shared.counters.pins.pinned[me].load(Ordering::SeqCst);
        pinned.checked_sub(1).map(|cpu| cpu as usize)
    }

    /// Pins the calling thread, worker `me`, to `cpu` (`None`: lets it run anywhere). Whether
    /// it is pinned as asked: not to a CPU that went offline, nor to one PID 1 is taking
    /// offline ([`CpuPins::leaving`]), which this checks after its pin is published, so that
    /// either PID 1 sees the pin and lifts it, or this sees the mark and lifts it itself.
    fn pin(&self, me: usize, cpu: Option<usize>) -> bool {
        let pins = &self.shared.counters.pins;
        let set = match cpu {
            Some(cpu) => {
                let mut only = CpuSet::new();
                if only.set(cpu).is_err() {
                    return false;
                }
                only
            }
            None => any_cpu(),
        };
        let me_thread = Pid::from_raw(0);
        if sched_setaffinity(me_thread, &set).is_err() {
            return false;
        }
        pins.pinned[me].store(cpu.map_or(0, |cpu| cpu as u64 + 1), Ordering::SeqCst);
        match cpu {
            Some(cpu) if pins.leaving.load(Ordering::SeqCst) & 1 << cpu != 0 => {
                let _ = sched_setaffinity(me_thread, &any_cpu());
                pins.pinned[me].store(0, Ordering::SeqCst);
                false
            }
            _ => true,
        }
    }

    /// Waits, parked, until the overseer needs this worker again.
    fn park(&self, me: usize) {
        let mut permits = self.permits.lock().unwrap_or_else(|e| e.into_inner());
        if self.active.load(Ordering::Relaxed) <= self.target.load(Ordering::Relaxed) {
            return;
        }
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.fall_asleep(me);
        while *permits == 0 {
            permits = self
                .unparked
                .wait(permits)
                .unwrap_or_else(|e| e.into_inner());
        }
        *permits -= 1;
        self.awake.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets how many workers may run (Linux's online CPUs plus the workers stuck in slow
    /// calls) and unparks workers up to it. Excess workers park themselves between calls.
    fn rebalance(&self) {
        let now = self.now_us();
        let slow_us = SLOW_CALL.as_micros() as u64;
        let mut slow = 0;
        for worker in 0..WORKERS {
            let since = self.serving_since[worker].load(Ordering::Relaxed);
            let tid = self.shared.counters.pins.tids[worker].load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since - 1) >= slow_us && !running(tid) {
                slow += 1;
                // Its CPU is free for the worker unparked in its place.
                let cpu = self.cpu_of[worker].load(Ordering::Relaxed);
                if cpu < MAX_CPUS {
                    let _ = self.owner[cpu].compare_exchange(
                        worker,
                        NOWHERE,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        }
        let online = online_mask();
        self.online.store(online, Ordering::Relaxed);
        let target = (online.count_ones() as usize + slow).clamp(1, WORKERS);
        self.target.store(target, Ordering::Relaxed);
        let mut permits = self.permits.lock().unwrap_or_else(|e| e.into_inner());
        while self.active.load(Ordering::Relaxed) < target {
            self.active.fetch_add(1, Ordering::Relaxed);
            *permits += 1;
            self.unparked.notify_one();
        }
    }

    /// Beats the server's heartbeat and keeps the workers' number right, for good.
    pub fn oversee(&self, liveness: ServiceLiveness<'static>) {
        loop {
            liveness.beat();
            self.rebalance();
            thread::sleep(if self.awake.load(Ordering::Relaxed) > 0 {
                OVERSEE_PERIOD
            } else {
                Duration::from_millis(HEARTBEAT_PERIOD_MS)
            });
        }
    }
}

/// Whether thread `tid` of this process is running or runnable (`R` in its stat), not asleep
/// in a call: a worker long in a call but running (a large copy) keeps its CPU busy, so no
/// worker is added beside it. Unknown (0, or no stat to read): taken as asleep.
fn running(tid: u64) -> bool {
    tid != 0
        && std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().next())
                == Some("R")
        })
}

/// The workers' clock: µs since the pool started, from the TSC. They read it at least once a
/// look and twice a call; `Instant::now` (the vDSO's `clock_gettime`) cost a few µs each
/// time under Bochs, the TSC one instruction (it does not exit: the hypervisor lets guests
/// read it).
struct Clock {
    started: u64,
    ticks_per_us: u64,
}

impl Clock {
    /// Measures the TSC's rate against the monotonic clock over a couple of milliseconds.
    fn calibrated() -> Self {
        let (wall, ticks) = (Instant::now(), crate::exec::tsc_now());
        thread::sleep(Duration::from_millis(2));
        let us = (wall.elapsed().as_micros() as u64).max(1);
        let ticks = crate::exec::tsc_now().saturating_sub(ticks);
        Self {
            started: crate::exec::tsc_now(),
            ticks_per_us: (ticks / us).max(1),
        }
    }

    fn now_us(&self) -> u64 {
        crate::exec::tsc_now().saturating_sub(self.started) / self.ticks_per_us
    }
}

/// How a worker's last sleep on the doorbell ended, until it serves a message.
#[derive(Clone, Copy)]
enum Woken {
    /// It has served since, or has not slept.
    Busy,
    /// The doorbell rang.
    ByDoorbell,
    /// Its whole safety net passed without a ring: a message it then finds is one whose
    /// doorbell woke no one.
    BySafetyNet,
    /// It did not sleep: a message was ready at its last look.
    Early,
}

/// [`Pool::cpu_of`] of a worker that holds no CPU, and [`Pool::owner`] of a CPU nobody holds.
const NOWHERE: usize = usize::MAX;

/// Linux's CPUs this thread may run on now (the kernel leaves offline ones out), bit `n` for
/// CPU `n`. The overseer, which calls it, is never pinned.
fn online_mask() -> u64 {
    sched_getaffinity(Pid::from_raw(0)).map_or(1, |set| {
        (0..MAX_CPUS)
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .fold(0, |mask, cpu| mask | 1 << cpu)
    })
}

/// Every CPU (the kernel runs a thread on the online ones only).
fn any_cpu() -> CpuSet {
    let mut any = CpuSet::new();
    for cpu in 0..MAX_CPUS.min(CpuSet::count()) {
        let _ = any.set(cpu);
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::tests::{null_call, service};
    use crate::delegation::SLOW;
    use vmcall_proto::delegation::{request_id, to_lavender_ring, to_linux_ring};
    use vmcall_proto::message::{Outcome, Reply};
    use vmcall_proto::region::SharedRegion;

    /// Connection 1's Linux ends, and Lavender's: its requests and the replies.
    fn connection(
        region: SharedRegion<'static>,
    ) -> (Connection, Producer<'static>, Consumer<'static>) {
        let view = region.attach().unwrap();
        let (requests, replies) = super::super::ends(region, &view, 1).unwrap();
        let lavender_requests =
            Producer::attach(&region, &view.ring(to_linux_ring(1)).unwrap()).unwrap();
        let lavender_replies =
            Consumer::attach(&region, &view.ring(to_lavender_ring(1)).unwrap()).unwrap();
        (
            Connection::new(1, requests, replies),
            lavender_requests,
            lavender_replies,
        )
    }

    fn send(to: &mut Producer<'static>, encode: impl FnOnce(&mut [u8]) -> usize) {
        let mut bytes = [0u8; MESSAGE_BYTES];
        let len = encode(&mut bytes);
        to.try_push(&bytes[..len]).unwrap();
    }

    fn call(process: u32, sequence: u64, continued: bool) -> SyscallRequest {
        let mut request = null_call(request_id(sequence, 1, 0));
        request.caller.process = process;
        if !continued {
            request.flags = SyscallFlags::empty();
        }
        request
    }

    fn exited(process: u32) -> Notification {
        Notification::ProcessState {
            process,
            state: ProcessState::Exited { status: 0 },
        }
    }

    /// Serves what is on the ring; the contexts started and ended so far.
    fn serve_all(connection: &Connection, shared: &'static Shared) -> (u64, u64) {
        let mut ends = connection.try_ends().unwrap();
        while let Some(message) = take(&mut ends, shared) {
            act(connection.id, &mut ends, &message, shared);
        }
        let counters = shared.counters;
        (
            counters.contexts_started.load(Ordering::Relaxed),
            counters.contexts_ended.load(Ordering::Relaxed),
        )
    }

    fn replies(from: &mut Consumer<'static>) -> Vec<Reply> {
        let mut bytes = [0u8; MESSAGE_BYTES];
        let mut replies = Vec::new();
        while let Some(len) = from.try_pop(&mut bytes).unwrap() {
            replies.push(Reply::decode(&bytes[..len]).unwrap());
        }
        replies
    }

    #[test]
    fn a_process_keeps_its_context_until_it_exits_or_another_takes_the_connection() {
        let (shared, _, region) = service(1);
        let shared: &'static Shared = Box::leak(Box::new(shared));
        let (connection, mut requests, mut from_linux) = connection(region);

        for sequence in 0..3 {
            send(&mut requests, |b| {
                call(7, sequence, true).encode(b).unwrap()
            });
        }
        assert_eq!(
            serve_all(&connection, shared),
            (1, 0),
            "one context for 3 calls"
        );
        let ids: Vec<u64> = replies(&mut from_linux)
            .iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids, (0..3).map(|s| request_id(s, 1, 0)).collect::<Vec<_>>());

        send(&mut requests, |b| exited(8).encode(b).unwrap());
        assert_eq!(
            serve_all(&connection, shared),
            (1, 0),
            "another process exited"
        );
        send(&mut requests, |b| exited(7).encode(b).unwrap());
        assert_eq!(serve_all(&connection, shared), (1, 1), "its process exited");

        send(&mut requests, |b| call(9, 3, true).encode(b).unwrap());
        send(&mut requests, |b| call(10, 4, true).encode(b).unwrap());
        assert_eq!(
            serve_all(&connection, shared),
            (3, 2),
            "process 10's call ends process 9's context"
        );
        send(&mut requests, |b| call(10, 5, false).encode(b).unwrap());
        assert_eq!(
            serve_all(&connection, shared),
            (3, 3),
            "a call without the continuation flag is its context's last"
        );
        let outcomes = replies(&mut from_linux);
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Value(_))));
        assert_eq!(shared.counters.calls.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn garbage_is_refused_and_the_next_call_still_served() {
        let (shared, _, region) = service(1);
        let shared: &'static Shared = Box::leak(Box::new(shared));
        let (connection, mut requests, mut from_linux) = connection(region);
        send(&mut requests, |b| {
            b[..8].copy_from_slice(b"garbage!");
            8
        });
        send(&mut requests, |b| call(7, 0, true).encode(b).unwrap());
        serve_all(&connection, shared);
        assert_eq!(shared.counters.refused.load(Ordering::Relaxed), 1);
        assert_eq!(replies(&mut from_linux).len(), 1);
    }

    /// A pool over one connection of a fresh service, and the service.
    fn pool() -> (&'static Shared, Pool) {
        let (shared, _, region) = service(1);
        let shared: &'static Shared = Box::leak(Box::new(shared));
        let (connection, _, _) = connection(region);
        (shared, Pool::new(shared, vec![connection]))
    }

    /// Whether this thread may run on `cpu` and on no other CPU of `cpus`.
    fn pinned_to_only(cpu: usize, cpus: &[usize]) -> bool {
        let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
        cpus.iter()
            .all(|&other| allowed.is_set(other).unwrap() == (other == cpu))
    }

    fn runs_anywhere(cpus: &[usize]) -> bool {
        let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
        cpus.iter().all(|&cpu| allowed.is_set(cpu).unwrap())
    }

    #[test]
    fn a_poller_claims_a_cpu_no_other_holds_and_pins_itself_there() {
        let (shared, pool) = pool();
        let cpus: Vec<usize> = (0..MAX_CPUS)
            .filter(|&cpu| pool.online.load(Ordering::Relaxed) & 1 << cpu != 0)
            .collect();
        let &[first, second, ..] = cpus.as_slice() else {
            eprintln!("one CPU: nothing to claim apart");
            return;
        };
        let moved = || shared.counters.pollers_moved.load(Ordering::Relaxed);
        pool.online
            .store(1 << first | 1 << second, Ordering::Relaxed);

        // Worker 0 polls on `first`; worker 1 (this thread), pinned there too, moves to `second`.
        pool.owner[first].store(0, Ordering::Relaxed);
        pool.cpu_of[0].store(first, Ordering::Relaxed);
        assert!(pool.pin(1, Some(first)));
        pool.claim_cpu(1);
        assert_eq!(pool.cpu_of[1].load(Ordering::Relaxed), second);
        assert_eq!(pool.owner[second].load(Ordering::Relaxed), 1);
        assert!(pool.holds_cpu(1));
        assert!(pinned_to_only(second, &cpus));
        assert_eq!(moved(), 1);

        // Asleep, it gives its CPU up and stays pinned; awake, it takes it again where it is.
        pool.fall_asleep(1);
        assert_eq!(pool.owner[second].load(Ordering::Relaxed), NOWHERE);
        assert!(!pool.holds_cpu(1));
        assert!(pinned_to_only(second, &cpus));
        pool.claim_cpu(1);
        assert!(pool.holds_cpu(1));
        assert_eq!(moved(), 1, "its own CPU was free: no move");

        // PID 1 takes `second` offline: worker 1 is unpinned at once and claims nothing there;
        // `first` is worker 0's, so it runs unclaimed, anywhere.
        let pins = &shared.counters.pins;
        pins.tids[1].store(nix::unistd::gettid().as_raw() as u64, Ordering::SeqCst);
        pins.leaving(second);
        assert!(runs_anywhere(&cpus));
        assert_eq!(pool.pinned_to(1), None);
        assert!(!pool.holds_cpu(1));
        pool.claim_cpu(1);
        assert_eq!(pool.cpu_of[1].load(Ordering::Relaxed), NOWHERE);
        assert_eq!(pool.owner[second].load(Ordering::Relaxed), NOWHERE);
        assert!(!pool.pin(1, Some(second)), "a leaving CPU takes no pin");
        assert!(runs_anywhere(&cpus));

        // Worker 0 sleeps: worker 1 claims `first`. Once `second` is back, it may go there.
        pool.fall_asleep(0);
        pool.claim_cpu(1);
        assert_eq!(pool.cpu_of[1].load(Ordering::Relaxed), first);
        assert!(pinned_to_only(first, &cpus));
        pins.back(second);
        pool.owner[first].store(0, Ordering::Relaxed);
        pool.claim_cpu(1);
        assert_eq!(pool.cpu_of[1].load(Ordering::Relaxed), second);

        // Its CPU gone offline behind the agent's back, it no longer holds it.
        pool.online.store(1 << first, Ordering::Relaxed);
        assert!(!pool.holds_cpu(1));
        // With every CPU held by another poller, it gives its pin up.
        pool.claim_cpu(1);
        assert_eq!(pool.cpu_of[1].load(Ordering::Relaxed), NOWHERE);
        assert!(runs_anywhere(&cpus));
    }

    #[test]
    fn a_null_calls_wait_counts_only_a_plausible_send_time_and_slow_ones_apart() {
        let (shared, pool) = pool();
        let c = shared.counters;
        let tick = pool.clock.ticks_per_us;
        let slow = SLOW.as_micros() as u64 * tick;
        let null = |sent: u64| Served {
            number: call::GETPID,
            first_arg: sent,
        };
        let taken = 10 * NULL_WAIT_MAX.as_micros() as u64 * tick;
        // A quick call: its wait counted, nothing slow.
        pool.note_null_call(null(taken - 20 * tick), taken, taken + 30 * tick);
        // A call that waited long and was served long.
        pool.note_null_call(null(taken - 2 * slow), taken, taken + 2 * slow);
        // Send times no wait can be read from: none, after the take, or too long before it.
        for sent in [
            0,
            taken + 1,
            taken - 2 * NULL_WAIT_MAX.as_micros() as u64 * tick,
        ] {
            pool.note_null_call(null(sent), taken, taken + 30 * tick);
        }
        let read = |n: &AtomicU64| n.load(Ordering::Relaxed);
        assert_eq!(read(&c.null_waits), 2);
        assert_eq!(read(&c.null_wait_ticks), 20 * tick + 2 * slow);
        assert_eq!(read(&c.slow_null_waits), 1);
        assert_eq!(read(&c.slow_null_wait_ticks), 2 * slow);
        assert_eq!(read(&c.slow_null_services), 1);
        assert_eq!(read(&c.slow_null_service_ticks), 2 * slow);
    }

    #[test]
    fn workers_asleep_in_slow_calls_are_replaced_up_to_one_per_connection() {
        let (shared, pool) = pool();
        let cpus = online_mask().count_ones() as usize;
        pool.rebalance();
        assert_eq!(pool.target.load(Ordering::Relaxed), cpus.min(WORKERS));

        let slow_us = SLOW_CALL.as_micros() as u64;
        std::thread::sleep(SLOW_CALL * 2);
        let now = pool.now_us();
        pool.serving_since[0].store(now - 2 * slow_us + 1, Ordering::Relaxed);
        pool.serving_since[1].store(now + 1, Ordering::Relaxed);
        pool.owner[0].store(0, Ordering::Relaxed);
        pool.cpu_of[0].store(0, Ordering::Relaxed);
        pool.rebalance();
        assert_eq!(
            pool.target.load(Ordering::Relaxed),
            (cpus + 1).min(WORKERS),
            "the slow call's worker is replaced, the fresh one's is not"
        );
        assert_eq!(
            pool.owner[0].load(Ordering::Relaxed),
            NOWHERE,
            "the slow call's worker gives its CPU up to the one in its place"
        );
        // This thread reads its own stat while it runs: `R`.
        shared.counters.pins.tids[0]
            .store(nix::unistd::gettid().as_raw() as u64, Ordering::Relaxed);
        pool.rebalance();
        assert_eq!(
            pool.target.load(Ordering::Relaxed),
            cpus.min(WORKERS),
            "a worker running its long call is not replaced"
        );
        shared.counters.pins.tids[0].store(0, Ordering::Relaxed);
        for worker in &pool.serving_since {
            worker.store(1, Ordering::Relaxed);
        }
        pool.rebalance();
        assert_eq!(pool.target.load(Ordering::Relaxed), WORKERS);
    }
}
