//! Lavender processes run from Linux (`vmctl exec/ps/kill/stop/cont`): PID 1 owns the control
//! connection of the region shared with Lavender (connection 0 of `vmcall_proto::delegation`).
//!
//! * **Exec.** The program's ELF file (read from the descriptor `vmctl` passed) goes into the
//!   control connection's part of the data window (its [`CALLS_IN_FLIGHT`] slices, which are
//!   contiguous), followed by `name NUL arguments...`, and an `Exec` with `ExecFlags::IMAGE`
//!   names both; Lavender copies it out, validates it and answers with the new pid. One exec
//!   uses the window at a time. With `ExecFlags::STDIO` the process's output goes through
//!   delegation to fds 1 and 2 of its Linux-side context, and its reads of fd 0 too: the
//!   context gets the launcher's descriptors from PID 1 ([`broker`]), which keeps them until
//!   the process ends.
//! * **Notifications.** One thread reads everything Lavender sends on the connection: replies,
//!   list entries and process-state notifications (started, stopped, continued, exited,
//!   killed). It records each state change per process and wakes whoever waits: `vmctl exec`
//!   gets every change of its process as a line on its socket as it happens.
//! * **Tables.** Processes Linux started or heard of stay listed with their last state and
//!   exit status; `ps` merges Lavender's own list (threads, CPU time, delegated calls).
//!
//! When the ring is empty the reader sleeps until Lavender rings the doorbell
//! (`crate::doorbell`), even while an answer is due: under Bochs, `vmctl exec` of an empty
//! program took 18.6 ms that way against 19.5 ms with the reader looking every 50 to 250 µs
//! while answers were due, whose timer wake-ups took a good part of Linux's two CPUs from
//! vmctl and the agent. Without the doorbell device it looks instead: for [`HOT`] after a
//! command goes out or a message comes in (an answer, a short process's exit are due), first
//! every [`NAP_MIN`], backing off only to [`NAP_HOT`]; otherwise (or once a process's end came
//! and no command waits) backing off to one look per [`NAP_MAX`], as the delegation server
//! does.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmcall_proto::delegation::{WindowPlan, CALLS_IN_FLIGHT};
use vmcall_proto::message::{
    peek_tag, tag, ExecFlags, ListedState, Notification, Outcome, ProcessAction, ProcessCommand,
    ProcessListEntry, ProcessState, Reply,
};
use vmcall_proto::region::{BufferRef, DataWindow, DATA_ALIGN};
use vmcall_proto::ring::{Consumer, Producer, SleepCheck};

use crate::delegation::Control;
use crate::fdpass;

/// How long Lavender may take to answer a command (Linux time, virtual under Bochs).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the delegation server's request for a process's streams waits for the exec that
/// started it to be answered.
const STDIO_WAIT: Duration = Duration::from_secs(10);
/// The reader's longest sleep between looks at the ring.
const NAP_MAX: Duration = Duration::from_millis(2);
/// Its first sleep after a message or a command.
const NAP_MIN: Duration = Duration::from_micros(50);
/// Its longest sleep while messages are due (see [`HOT`]).
const NAP_HOT: Duration = Duration::from_micros(250);
/// How long after a command or a message the reader's sleeps stay at most [`NAP_HOT`].
const HOT: Duration = Duration::from_millis(20);
/// Longest argument string Lavender takes (`lavender_abi::MAX_ARGUMENT_BYTES`).
const MAX_ARGUMENT_BYTES: usize = 1024;
/// The program of a process Linux heard of before it knew its name.
const UNKNOWN: &str = "?";
/// The ELF machine number of x86-64.
const EM_X86_64: u16 = 62;
/// The signal a process lost with Lavender counts as killed by.
const SIGKILL: i32 = 9;
/// Finished execs' stages kept for [`take_stages`] (the exec benchmark takes them after each).
const STAGES_KEPT: usize = 64;

/// The TSC: the clock Lavender and the hypervisor stamp with, the same counter in every guest
/// (the hypervisor sets no TSC offset), so an exec's stages on both sides line up.
pub fn tsc_now() -> u64 {
    // SAFETY: RDTSC reads a counter and touches no memory; Linux leaves CR4.TSD clear (its
    // vDSO reads the TSC from user mode), so it does not fault here.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// When an attached exec passed each step in the agent (TSC, [`tsc_now`]); Lavender's own
/// steps are in its `process_start` and `process_exit` markers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStages {
    pub pid: u32,
    /// vmctl's connection was accepted on the management socket.
    pub accepted: u64,
    /// The request was read (on a thread of its own).
    pub request: u64,
    /// The program file was read and its header checked.
    pub image_read: u64,
    /// The command went on the ring (stamped just before its push; the file and arguments
    /// were in the window before it).
    pub sent: u64,
    /// Lavender's reply (the pid) was read from the ring, and the launcher attached.
    pub replied: u64,
    /// The exit's notification was read from the ring.
    pub exited: u64,
    /// The exit's line was about to go to vmctl.
    pub relayed: u64,
}

/// A process's state as Linux last heard it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobState {
    Running,
    Stopped,
    Exited(i32),
    Killed(u8),
    /// Lavender stopped (crashed, hung) while the process lived: it ended with Lavender.
    Lost,
}

impl JobState {
    fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Exited(_) => "exited",
            Self::Killed(_) => "killed",
            Self::Lost => "lost",
        }
    }

    /// The status a shell shows: the exit status, or 128 + the signal (a process lost with
    /// Lavender as one killed by SIGKILL).
    fn status(self) -> Option<i32> {
        match self {
            Self::Exited(status) => Some(status),
            Self::Killed(signal) => Some(128 + i32::from(signal)),
            Self::Lost => Some(128 + SIGKILL),
            _ => None,
        }
    }

    fn ended(self) -> bool {
        self.status().is_some()
    }
}

struct Job {
    program: String,
    cores: u16,
    state: JobState,
    /// Every state change, in order.
    events: Vec<ProcessState>,
    /// The connection of the `vmctl exec` waiting for the process (attached, not detached),
    /// until the process ends: each state change goes out on it as the reader hears it.
    launcher: Option<UnixStream>,
    /// How many of `events` the launcher has had.
    relayed: usize,
    /// The launcher is due its `started` line (it was attached and has had nothing yet).
    announce: bool,
    /// The launcher's stdin, stdout and stderr, until the process ends.
    stdio: Option<[OwnedFd; 3]>,
    /// Lavender's figures from the last list (kept after the process ends).
    listed: Option<ProcessListEntry>,
    /// The agent's steps of the exec that started it (zero for a process Linux only heard of).
    stages: ExecStages,
}

impl Job {
    fn heard(program: &str) -> Job {
        Job {
            program: program.into(),
            cores: 0,
            state: JobState::Running,
            events: Vec::new(),
            launcher: None,
            relayed: 0,
            announce: false,
            stdio: None,
            listed: None,
            stages: ExecStages::default(),
        }
    }
}

impl Job {
    /// Writes to the launcher, if the process has one, its `started` line if due and the line
    /// of each state change it has not had (`down`: Lavender stopped, and the process is lost
    /// with it), in one `write` (each wakes vmctl), and lets it go once the process ended or
    /// if it does not take its lines. The exec's stages, with the time the end's line went
    /// out, if it just did.
    fn relay(&mut self, pid: u32, down: Option<&str>) -> Option<ExecStages> {
        let launcher = self.launcher.as_ref()?;
        let mut lines = Vec::new();
        if std::mem::take(&mut self.announce) {
            lines.push(json!({"ok": true, "event": "started", "pid": pid}));
        }
        let mut exited = false;
        for &event in &self.events[self.relayed..] {
            lines.push(match event {
                ProcessState::Started => continue,
                ProcessState::Stopped => json!({"event": "stopped", "pid": pid}),
                ProcessState::Continued => json!({"event": "continued", "pid": pid}),
                ProcessState::Exited { status } => {
                    json!({"event": "exited", "pid": pid, "status": status})
                }
                ProcessState::Killed { signal } => {
                    json!({"event": "killed", "pid": pid, "signal": signal})
                }
            });
            if matches!(
                event,
                ProcessState::Exited { .. } | ProcessState::Killed { .. }
            ) {
                exited = true;
                break;
            }
        }
        self.relayed = self.events.len();
        let lost = !exited && down.is_some();
        if let Some(down) = down.filter(|_| lost) {
            lines.push(json!({"event": "lost", "pid": pid, "lavender": down}));
        }
        let stages = exited.then(|| ExecStages {
            relayed: tsc_now(),
            ..self.stages
        });
        if send_lines(launcher, &lines).is_err() || exited || lost {
            self.launcher = None;
        }
        stages
    }
}

/// An exec on its way to Lavender: what the reader needs to make its job when the reply (the
/// pid) comes, so the launcher is attached and hears the process's state changes from then
/// on without a hand-off to the request's thread.
struct PendingExec {
    name: String,
    cores: u16,
    /// The launcher's streams (the process reads and writes them through delegation).
    stdio: Option<[OwnedFd; 3]>,
    /// The connection of an attached `vmctl exec`; `None` for a detached one, which the
    /// request's thread answers itself.
    launcher: Option<UnixStream>,
    stages: ExecStages,
}

#[derive(Default)]
struct State {
    next_request: u64,
    /// Each reply, with the TSC it was read at.
    replies: HashMap<u64, (Outcome, u64)>,
    entries: HashMap<u64, Vec<ProcessListEntry>>,
    jobs: BTreeMap<u32, Job>,
    /// An exec was sent and not answered yet (its process may already delegate).
    exec_in_flight: bool,
    /// The execs sent, by request id, until their replies.
    pending_execs: HashMap<u64, PendingExec>,
    /// The processes whose launcher may be due lines since the reader last wrote any (the
    /// table of jobs keeps every process heard of).
    due: BTreeSet<u32>,
    /// Lavender's state once it stopped running (`stopped`, `hung`, ...): nothing is sent
    /// to it any more and its processes are lost.
    lavender_down: Option<String>,
    /// The stages of attached execs that ended, oldest first (at most [`STAGES_KEPT`]).
    finished_stages: VecDeque<ExecStages>,
}

impl State {
    /// Lavender started `pending`'s program as process `pid` (its reply was read at TSC
    /// `replied`): its job takes the name, streams and launcher; the launcher is due the
    /// `started` line and any state change heard before the reply ([`State::relay_due`]).
    fn start_job(&mut self, pid: u32, pending: PendingExec, replied: u64) {
        let job = self
            .jobs
            .entry(pid)
            .or_insert_with(|| Job::heard(&pending.name));
        job.program = pending.name;
        job.cores = pending.cores;
        // The exit's notification may have come before the reply.
        job.stages = ExecStages {
            pid,
            replied,
            exited: job.stages.exited,
            ..pending.stages
        };
        if !job.state.ended() {
            job.stdio = pending.stdio;
        }
        if let Some(launcher) = pending.launcher {
            job.launcher = Some(launcher);
            job.announce = true;
            self.due.insert(pid);
        }
    }

    /// Writes each attached launcher the lines it is due ([`Job::relay`]): the reader's step
    /// once it has drained the ring, so a launcher whose process started and ended within one
    /// drain is woken once.
    fn relay_due(&mut self) {
        let down = self.lavender_down.clone();
        for pid in std::mem::take(&mut self.due) {
            let stages = self.jobs.get_mut(&pid).and_then(|job| {
                let due = job.announce || job.relayed < job.events.len();
                due.then(|| job.relay(pid, down.as_deref())).flatten()
            });
            self.keep_stages(stages);
        }
    }

    /// Keeps the stages of an attached exec whose end went out to its launcher.
    fn keep_stages(&mut self, stages: Option<ExecStages>) {
        let Some(stages) = stages else { return };
        if self.finished_stages.len() == STAGES_KEPT {
            self.finished_stages.pop_front();
        }
        self.finished_stages.push_back(stages);
    }
}

pub struct Service {
    to_lavender: Mutex<Producer<'static>>,
    window: DataWindow<'static>,
    plan: WindowPlan,
    /// One exec's image in the window at a time.
    image: Mutex<()>,
    state: Mutex<State>,
    changed: Condvar,
    /// Until when the reader's sleeps stay at most [`NAP_HOT`] (see [`HOT`]), and the word
    /// that messages are due, which ends its sleep.
    hot_until: Mutex<Instant>,
    heated: Condvar,
    /// Commands sent and not answered yet (their [`Service::ask`]s still wait).
    unanswered: AtomicUsize,
}

static SERVICE: OnceLock<Service> = OnceLock::new();

/// One command waiting for its answer, counted in [`Service::unanswered`] while it lives.
struct Unanswered<'a>(&'a AtomicUsize);

impl<'a> Unanswered<'a> {
    fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Unanswered(counter)
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lavender stopped running (its state on the status page is `down`): its processes are lost
/// (`ps` shows them `lost`, a waiting `vmctl exec` says so and exits 137) and later commands
/// are refused at once. Returns how many processes were lost.
pub fn lavender_stopped(down: &str) -> usize {
    SERVICE
        .get()
        .map_or(0, |service| service.lavender_stopped(down))
}

/// Takes the control connection over for good: starts the reader thread.
pub fn start(control: Control) {
    let Control {
        from_lavender,
        to_lavender,
        window,
        plan,
        // The delegation server watches its own liveness; process control does not.
        liveness: _,
    } = control;
    let service = SERVICE.get_or_init(|| Service {
        to_lavender: Mutex::new(to_lavender),
        window,
        plan,
        image: Mutex::new(()),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        hot_until: Mutex::new(Instant::now()),
        heated: Condvar::new(),
        unanswered: AtomicUsize::new(0),
    });
    std::thread::Builder::new()
        .name("exec-control".into())
        .spawn(move || service.read(from_lavender))
        .map(drop)
        .unwrap_or_else(|e| {
            crate::report::emit(&crate::report::error("exec", &e, |_| {}));
        });
}

fn service() -> Result<&'static Service, Failure> {
    SERVICE.get().ok_or_else(|| {
        Failure::new(
            "unavailable",
            "the agent does not reach Lavender (no region shared with it)",
        )
    })
}

/// Why a command failed: a code vmctl maps to its exit status, and a message for people.
#[derive(Debug)]
pub struct Failure {
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> Value {
        json!({"ok": false, "code": self.code, "message": self.message})
    }
}

impl Service {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Most bytes an ELF file may have: the control connection's slices, less room for the
    /// arguments.
    fn image_capacity(&self) -> usize {
        (self.plan.slice_len() as usize * CALLS_IN_FLIGHT as usize)
            .saturating_sub(MAX_ARGUMENT_BYTES + DATA_ALIGN as usize)
    }

    /// Messages are due: without the doorbell, the reader looks often for [`HOT`] from now,
    /// starting at once (a sleeping reader is woken).
    fn heat(&self) {
        *self.hot_until.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + HOT;
        self.heated.notify_one();
    }

    /// Nothing is due: the reader backs off now.
    fn cool(&self) {
        *self.hot_until.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// The reader: every message Lavender sends on the control connection, for good.
    fn read(&self, mut from_lavender: Consumer<'static>) {
        let mut buffer = [0u8; 128];
        let mut nap = NAP_MIN;
        let mut took = false;
        loop {
            let seen = crate::doorbell::BELL.generation();
            let popped = from_lavender.try_pop(&mut buffer);
            if took && !matches!(popped, Ok(Some(_))) {
                // Drained: each launcher has what it is due, in one write.
                self.lock().relay_due();
                took = false;
            }
            match popped {
                Ok(Some(len)) => {
                    self.heat();
                    self.take(&buffer[..len]);
                    took = true;
                    nap = NAP_MIN;
                }
                Ok(None) if crate::doorbell::listening() => {
                    // The doorbell rule: flag up, one more look, then sleep until Lavender
                    // rings (it does after each message on this ring while the flag is up).
                    if let Ok(SleepCheck::MaySleep) = from_lavender.prepare_to_sleep() {
                        crate::doorbell::BELL.wait(seen, crate::doorbell::FALLBACK);
                        from_lavender.woke();
                    }
                }
                Ok(None) => {
                    let until = self.hot_until.lock().unwrap_or_else(|e| e.into_inner());
                    let before = *until;
                    let until = self
                        .heated
                        .wait_timeout(until, nap)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    nap = if *until != before {
                        NAP_MIN
                    } else if Instant::now() < *until {
                        (nap * 2).min(NAP_HOT)
                    } else {
                        (nap * 2).min(NAP_MAX)
                    };
                }
                Err(_) => std::thread::sleep(NAP_MAX),
            }
        }
    }

    fn take(&self, bytes: &[u8]) {
        let read_at = tsc_now();
        let mut state = self.lock();
        match peek_tag(bytes) {
            Ok(tag::REPLY) => {
                if let Ok(reply) = Reply::decode(bytes) {
                    if let Some(pending) = state.pending_execs.remove(&reply.request_id) {
                        if let Outcome::Value(pid) = reply.outcome {
                            state.start_job(pid as u32, pending, read_at);
                        }
                    }
                    state
                        .replies
                        .insert(reply.request_id, (reply.outcome, read_at));
                }
            }
            Ok(tag::PROCESS_LIST_ENTRY) => {
                if let Ok(entry) = ProcessListEntry::decode(bytes) {
                    state
                        .entries
                        .entry(entry.request_id)
                        .or_default()
                        .push(entry);
                }
            }
            Ok(tag::NOTIFICATION) => {
                if let Ok(Notification::ProcessState {
                    process,
                    state: new,
                }) = Notification::decode(bytes)
                {
                    let job = state
                        .jobs
                        .entry(process)
                        .or_insert_with(|| Job::heard(UNKNOWN));
                    job.state = match new {
                        ProcessState::Started | ProcessState::Continued => JobState::Running,
                        ProcessState::Stopped => JobState::Stopped,
                        ProcessState::Exited { status } => JobState::Exited(status),
                        ProcessState::Killed { signal } => JobState::Killed(signal),
                    };
                    if job.state.ended() {
                        job.stdio = None;
                        job.stages.exited = read_at;
                        // Nothing more is due from it: unless a command waits for its answer,
                        // the reader need not look often any more.
                        if self.unanswered.load(Ordering::Relaxed) == 0 {
                            self.cool();
                        }
                    }
                    job.events.push(new);
                    state.due.insert(process);
                }
            }
            _ => {}
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Sends `command` (made with a fresh request id) and waits for its reply: the reply and
    /// the TSC it was read. An exec's `pending` waits with it for the reader (dropped, and
    /// its streams closed, if the command fails).
    fn ask(
        &self,
        command: impl FnOnce(u64) -> ProcessCommand,
        mut pending: Option<PendingExec>,
    ) -> Result<(Outcome, u64), Failure> {
        self.check_lavender_up()?;
        let request_id = {
            let mut state = self.lock();
            state.next_request += 1;
            state.next_request
        };
        let result = self.ask_as(request_id, command, &mut pending);
        if result.is_err() {
            self.lock().pending_execs.remove(&request_id);
        }
        result
    }

    fn ask_as(
        &self,
        request_id: u64,
        command: impl FnOnce(u64) -> ProcessCommand,
        pending: &mut Option<PendingExec>,
    ) -> Result<(Outcome, u64), Failure> {
        let mut bytes = [0u8; 64];
        let len = command(request_id)
            .encode(&mut bytes)
            .map_err(|e| Failure::new("bad_request", e.to_string()))?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let _unanswered = Unanswered::count(&self.unanswered);
        let is_exec = pending.is_some();
        loop {
            if is_exec {
                // Stamped and handed to the reader before the push: it may read the reply
                // as soon as the command is on the ring.
                let sent = tsc_now();
                let mut state = self.lock();
                if let Some(exec) = pending.take() {
                    state.pending_execs.insert(request_id, exec);
                }
                if let Some(exec) = state.pending_execs.get_mut(&request_id) {
                    exec.stages.sent = sent;
                }
            }
            let pushed = {
                let mut ring = self.to_lavender.lock().unwrap_or_else(|e| e.into_inner());
                ring.try_push(&bytes[..len]).map(|()| ring.wake_needed())
            };
            if let Ok(wake) = pushed {
                crate::doorbell::wake_lavender(wake);
                self.heat();
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure::new(
                    "unavailable",
                    "Lavender does not take commands",
                ));
            }
            std::thread::sleep(NAP_MAX);
        }
        let mut state = self.lock();
        loop {
            if let Some((outcome, replied)) = state.replies.remove(&request_id) {
                return Ok((outcome, replied));
            }
            if let Some(down) = &state.lavender_down {
                return Err(Failure::new(
                    "lavender_down",
                    format!("Lavender is {down}: it will not answer"),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::new(
                    "unavailable",
                    format!(
                        "Lavender did not answer within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    ),
                ));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads the ELF file `program` into the window at `base` (the kernel copies it there: no
    /// buffer of the agent's in between, which under Bochs cost more than the copy, in page
    /// faults and in its release) and checks its header. Where it is.
    fn read_image(&self, program: &File, base: u32) -> Result<BufferRef, Failure> {
        let capacity = self.image_capacity();
        // One byte more than may be taken tells a file too large (the window has room for
        // it: the arguments' part follows).
        let room = BufferRef {
            offset: base,
            len: capacity as u32 + 1,
        };
        let len = read_into_window(&self.window, room, program)
            .map_err(|e| Failure::new("not_executable", format!("cannot read the program: {e}")))?;
        if len > capacity {
            return Err(Failure::new(
                "too_large",
                format!(
                    "the file is larger than Lavender can take (at most {capacity} bytes: the \
                     control connection's part of the shared window)"
                ),
            ));
        }
        let image = BufferRef {
            offset: base,
            len: len as u32,
        };
        let mut header = [0u8; 64];
        let seen = len.min(header.len());
        let head = BufferRef {
            offset: base,
            len: seen as u32,
        };
        self.window
            .read(head, &mut header)
            .map_err(|e| Failure::new("unavailable", format!("data window: {e:?}")))?;
        check_header(&header[..seen])?;
        Ok(image)
    }

    /// Starts the ELF file `program` with `args` on Lavender as `exec` says; its pid. The
    /// reader attaches `exec`'s launcher (an attached `vmctl exec`'s connection) to the process
    /// when it reads the reply, and writes it the process's state changes from then on.
    /// `exec.stages` has the request's steps so far; the file's, the command's and the reply's
    /// follow.
    fn exec(&self, program: &File, args: &[String], mut exec: PendingExec) -> Result<u32, Failure> {
        let (name, cores) = (exec.name.as_str(), exec.cores);
        let mut arguments = name.replace([' ', '\0'], "_").into_bytes();
        for arg in args {
            if arg.contains('\0') {
                return Err(Failure::new("bad_request", "an argument holds a NUL byte"));
            }
            arguments.push(0);
            arguments.extend_from_slice(arg.as_bytes());
        }
        if arguments.len() > MAX_ARGUMENT_BYTES {
            return Err(Failure::new(
                "bad_request",
                format!("the arguments are longer than {MAX_ARGUMENT_BYTES} bytes"),
            ));
        }
        let _image = self.image.lock().unwrap_or_else(|e| e.into_inner());
        let base = self
            .plan
            .slice(0, 0)
            .ok_or_else(|| Failure::new("unavailable", "no control slices"))?
            .offset;
        let window_error = |e| Failure::new("unavailable", format!("data window: {e:?}"));
        let program = self.read_image(program, base)?;
        exec.stages.image_read = tsc_now();
        let arguments_at = (base + program.len).next_multiple_of(DATA_ALIGN);
        let arguments = if arguments.is_empty() {
            BufferRef::EMPTY
        } else {
            self.window
                .write(arguments_at, &arguments)
                .map_err(window_error)?
        };
        let mut flags = ExecFlags::IMAGE;
        if exec.stdio.is_some() {
            flags |= ExecFlags::STDIO;
        }
        self.lock().exec_in_flight = true;
        let outcome = self.ask(
            |request_id| ProcessCommand::Exec {
                request_id,
                cores,
                flags,
                program,
                arguments,
            },
            Some(exec),
        );
        self.lock().exec_in_flight = false;
        self.changed.notify_all();
        match outcome {
            Ok((Outcome::Value(pid), _)) => Ok(pid as u32),
            Ok((Outcome::Errno(errno), _)) => Err(exec_refused(errno.get())),
            Err(failure) => Err(failure),
        }
    }

    fn signal(&self, pid: u32, action: ProcessAction) -> Result<(), Failure> {
        match self
            .ask(
                |request_id| ProcessCommand::Signal {
                    request_id,
                    process: pid,
                    action,
                },
                None,
            )?
            .0
        {
            Outcome::Value(_) => Ok(()),
            Outcome::Errno(errno) if errno.get() == 3 => {
                let ended = self.lock().jobs.get(&pid).map(|job| job.state.ended());
                Err(Failure::new(
                    "no_process",
                    if ended == Some(true) {
                        format!("process {pid} has ended already")
                    } else {
                        format!("Lavender has no process {pid}")
                    },
                ))
            }
            Outcome::Errno(errno) => Err(Failure::new(
                "refused",
                format!("Lavender refused (errno {})", errno.get()),
            )),
        }
    }

    /// Every process Lavender lists or Linux heard of, by pid.
    fn list(&self) -> Result<Vec<Value>, Failure> {
        // A stopped Lavender lists nothing: the table says what Linux last heard (its
        // processes `lost`).
        let asked = if self.lock().lavender_down.is_some() {
            None
        } else {
            let mut request = 0;
            let (outcome, _) = self.ask(
                |request_id| {
                    request = request_id;
                    ProcessCommand::List { request_id }
                },
                None,
            )?;
            Some((request, outcome))
        };
        let mut state = self.lock();
        let (request, outcome) = asked.unwrap_or((0, Outcome::Value(0)));
        let entries = state.entries.remove(&request).unwrap_or_default();
        if let Outcome::Value(count) = outcome {
            if count as usize != entries.len() {
                crate::report::emit(&crate::report::error(
                    "exec",
                    &format!("list: {} of {count} entries arrived", entries.len()),
                    |_| {},
                ));
            }
        }
        for entry in entries {
            let job = state.jobs.entry(entry.process).or_insert_with(|| {
                let mut job = Job::heard(entry.name().unwrap_or(UNKNOWN));
                job.cores = entry.cores;
                job
            });
            if job.program == UNKNOWN {
                if let Some(name) = entry.name() {
                    job.program = name.into();
                    job.cores = entry.cores;
                }
            }
            if !job.state.ended() {
                job.state = match entry.state {
                    ListedState::Running => JobState::Running,
                    ListedState::Stopped => JobState::Stopped,
                    ListedState::Exited => JobState::Exited(entry.status),
                };
            }
            job.listed = Some(entry);
        }
        Ok(state
            .jobs
            .iter()
            .map(|(pid, job)| {
                let listed = job.listed.as_ref();
                json!({
                    "pid": pid,
                    "program": job.program,
                    "state": job.state.name(),
                    "status": job.state.status(),
                    "cores": job.cores,
                    "threads": listed.map_or(0, |e| e.threads),
                    "cpu_us": listed.map(|e| e.cpu_us),
                    "calls": listed.map(|e| e.calls),
                    "ran_on": listed.map(|e| core_list(e.ran_on)),
                })
            })
            .collect())
    }

    /// Lavender stopped running (its state is `down`): its live processes are lost, their
    /// launchers' streams let go, and whoever waits on them or on an answer is told.
    /// Returns how many processes were lost.
    fn lavender_stopped(&self, down: &str) -> usize {
        let mut state = self.lock();
        state.lavender_down = Some(down.to_string());
        let mut lost = 0;
        for (&pid, job) in state.jobs.iter_mut().filter(|(_, job)| !job.state.ended()) {
            job.state = JobState::Lost;
            job.stdio = None;
            job.relay(pid, Some(down));
            lost += 1;
        }
        drop(state);
        self.changed.notify_all();
        lost
    }

    /// Refuses work for a Lavender that stopped.
    fn check_lavender_up(&self) -> Result<(), Failure> {
        match &self.lock().lavender_down {
            Some(down) => Err(Failure::new(
                "lavender_down",
                format!("Lavender is {down}: it runs no programs any more"),
            )),
            None => Ok(()),
        }
    }

    /// Copies of the launcher's streams of `pid`, if it has them.
    fn stdio_of(&self, pid: u32) -> Option<[OwnedFd; 3]> {
        let deadline = Instant::now() + STDIO_WAIT;
        let mut state = self.lock();
        // The process may delegate before its exec's reply reached us, and its start's
        // notification may come before the reply too: until the reply, a job heard of without
        // streams may still get them.
        let streams_may_come = |state: &State| {
            state.exec_in_flight
                && state
                    .jobs
                    .get(&pid)
                    .is_none_or(|job| job.stdio.is_none() && !job.state.ended())
        };
        while streams_may_come(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let fds = state.jobs.get(&pid)?.stdio.as_ref()?;
        let copy = |fd: &OwnedFd| fd.try_clone().ok();
        Some([copy(&fds[0])?, copy(&fds[1])?, copy(&fds[2])?])
    }
}

/// The agent's stages of the attached execs that ended since the last call, oldest first.
pub fn take_stages() -> Vec<ExecStages> {
    SERVICE.get().map_or_else(Vec::new, |service| {
        service.lock().finished_stages.drain(..).collect()
    })
}

/// The cores of a core mask, in order.
fn core_list(mask: u64) -> Vec<u64> {
    (0..64).filter(|core| mask & 1 << core != 0).collect()
}

/// The message for an errno Lavender refused an exec with.
fn exec_refused(errno: u16) -> Failure {
    match errno {
        8 => Failure::new(
            "not_executable",
            "Lavender refused the program: not a valid Lavender program (a static \
             position-independent x86-64 ELF whose segments fit its user window)",
        ),
        7 => Failure::new("bad_request", "Lavender refused the arguments: too long"),
        22 => Failure::new(
            "bad_cores",
            "Lavender refused the core limit: more cores than it may hold",
        ),
        11 => Failure::new("refused", "Lavender has no thread left for the program"),
        12 => Failure::new("refused", "Lavender has not enough memory for the program"),
        other => Failure::new(
            "refused",
            format!("Lavender refused the program (errno {other})"),
        ),
    }
}

/// Checks the ELF header of `image` as Lavender will (first, for a clear message).
fn check_header(image: &[u8]) -> Result<(), Failure> {
    if image.len() < 64 || image[..4] != *b"\x7fELF" {
        return Err(Failure::new("not_executable", "not an ELF file"));
    }
    let machine = u16::from_le_bytes([image[18], image[19]]);
    if image[4] != 2 || image[5] != 1 || machine != EM_X86_64 {
        return Err(Failure::new(
            "not_executable",
            format!(
                "wrong architecture: a {}-bit {} ELF file for machine {machine}; Lavender runs \
                 64-bit little-endian x86-64 programs",
                if image[4] == 1 { 32 } else { 64 },
                if image[5] == 2 {
                    "big-endian"
                } else {
                    "little-endian"
                },
            ),
        ));
    }
    Ok(())
}

/// Writes `line` and a newline to `stream` in one `write`: a `Value` formatted straight into
/// the socket would go out a token per system call, each waking the reader at the other end.
pub fn send_line(stream: &UnixStream, line: &Value) -> std::io::Result<()> {
    send_lines(stream, std::slice::from_ref(line))
}

/// Writes `lines`, each with a newline, to `stream` in one `write` (none if there are none).
fn send_lines(mut stream: &UnixStream, lines: &[Value]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    stream.write_all(text.as_bytes())
}

/// Whether the management socket's request is one of ours.
pub fn handles(request: &Value) -> bool {
    matches!(request["cmd"].as_str(), Some("exec" | "ps" | "signal"))
}

/// Answers a request of ours on `stream` (one line, or for an attached exec, a line per state
/// change until the process ends), its connection accepted at TSC `accepted_tsc`.
/// `status_page` gives the hypervisor's status page (for the cores Lavender may hold).
pub fn answer(
    stream: &UnixStream,
    uid: Option<u32>,
    request: &Value,
    fds: Vec<OwnedFd>,
    accepted_tsc: u64,
    status_page: impl FnOnce() -> Option<Value>,
) {
    let stages = ExecStages {
        accepted: accepted_tsc,
        request: tsc_now(),
        ..ExecStages::default()
    };
    let reply = match request["cmd"].as_str() {
        Some("ps") => service()
            .and_then(Service::list)
            .map(|rows| json!({"ok": true, "processes": rows})),
        Some("signal") => root(uid, "signalling a Lavender process")
            .and_then(|()| signal_request(request))
            .map(|()| json!({"ok": true})),
        Some("exec") => match root(uid, "starting a Lavender program")
            .and_then(|()| exec_request(request, fds, stream, status_page, stages))
        {
            // The reader has it: it wrote the `started` line and writes the rest.
            Ok((_, false)) => return,
            Ok((pid, true)) => Ok(json!({"ok": true, "event": "started", "pid": pid})),
            Err(failure) => Err(failure),
        },
        _ => Err(Failure::new("bad_request", "unknown command")),
    };
    let _ = send_line(stream, &reply.unwrap_or_else(|failure| failure.json()));
}

fn root(uid: Option<u32>, what: &str) -> Result<(), Failure> {
    if uid == Some(0) {
        return Ok(());
    }
    let who = uid.map_or("an unknown user".into(), |u| format!("uid {u}"));
    Err(Failure::new(
        "permission",
        format!("{what} needs root (the caller is {who})"),
    ))
}

fn signal_request(request: &Value) -> Result<(), Failure> {
    let pid = request["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or_else(|| Failure::new("bad_request", "a signal needs a \"pid\""))?;
    let action = match request["action"].as_str() {
        Some("kill") => ProcessAction::Kill,
        Some("interrupt") => ProcessAction::Interrupt,
        Some("stop") => ProcessAction::Stop,
        Some("cont") => ProcessAction::Continue,
        _ => {
            return Err(Failure::new(
                "bad_request",
                "\"action\" must be kill, interrupt, stop or cont",
            ))
        }
    };
    service()?.signal(pid, action)
}

/// Starts the program of an exec request that came on `stream`; its pid and whether the
/// caller detaches.
fn exec_request(
    request: &Value,
    fds: Vec<OwnedFd>,
    stream: &UnixStream,
    status_page: impl FnOnce() -> Option<Value>,
    stages: ExecStages,
) -> Result<(u32, bool), Failure> {
    let service = service()?;
    let name = request["program"]
        .as_str()
        .and_then(|path| path.rsplit('/').next())
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Failure::new("bad_request", "an exec needs a \"program\" path"))?;
    let args: Vec<String> = request["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let cores = request["cores"].as_u64().unwrap_or(1);
    let cores = u16::try_from(cores)
        .ok()
        .filter(|cores| (1..=64).contains(cores))
        .ok_or_else(|| Failure::new("bad_cores", "--cores must be 1 to 64"))?;
    // Lavender holds a core whenever it runs, so one core is always within its limit: the
    // status page (a copy and a parse) is read only for more.
    if cores > 1 {
        if let Some(allowed) = status_page().as_ref().and_then(lavender_allowed) {
            check_cores(cores, &allowed)?;
        }
    }
    let detach = request["detach"].as_bool().unwrap_or(false);
    let mut fds = fds.into_iter();
    let program = fds.next().ok_or_else(|| {
        Failure::new(
            "bad_request",
            "no program file descriptor came with the request",
        )
    })?;
    let stdio = match (fds.next(), fds.next(), fds.next()) {
        (Some(input), Some(output), Some(error)) => Some([input, output, error]),
        _ => None,
    };
    let program = File::from(program);
    // An attached launcher's lines are written by the reader under the state's lock: a write
    // never waits (a launcher that leaves its socket full, which takes thousands of lines,
    // is let go).
    let launcher = if detach {
        None
    } else {
        let launcher = stream
            .set_nonblocking(true)
            .and_then(|()| stream.try_clone())
            .map_err(|e| Failure::new("unavailable", format!("the connection: {e}")))?;
        Some(launcher)
    };
    let exec = PendingExec {
        name: name.into(),
        cores,
        stdio,
        launcher,
        stages,
    };
    let pid = service.exec(&program, &args, exec)?;
    Ok((pid, detach))
}

/// Reads `file` from its start into the window's `room` until the file ends or `room` is
/// full; how many bytes it read.
fn read_into_window(
    window: &DataWindow<'_>,
    room: BufferRef,
    file: &File,
) -> std::io::Result<usize> {
    let (start, len) = window
        .raw_parts(room)
        .map_err(|e| std::io::Error::other(format!("data window: {e:?}")))?;
    let mut done = 0;
    while done < len {
        // SAFETY: `start..start + len` is inside the mapped data window (`raw_parts` checked
        // it) and `done < len`; the kernel writes the bytes, and no Rust reference to them
        // exists (the window is reached through atomics only).
        let read = unsafe {
            nix::libc::pread(
                file.as_raw_fd(),
                start.add(done).cast(),
                len - done,
                done as nix::libc::off_t,
            )
        };
        match read {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(done)
}

/// The cores Lavender may hold, from the hypervisor's status page.
fn lavender_allowed(page: &Value) -> Option<Vec<u64>> {
    page["guests"]
        .as_array()?
        .iter()
        .find(|guest| guest["kind"] == "lavender")?["allowed"]
        .as_array()
        .map(|cores| cores.iter().filter_map(Value::as_u64).collect())
}

/// Refuses a core limit above the cores Lavender may hold (`allowed`); Lavender checks too.
fn check_cores(cores: u16, allowed: &[u64]) -> Result<(), Failure> {
    if usize::from(cores) <= allowed.len() {
        return Ok(());
    }
    let list: Vec<String> = allowed.iter().map(u64::to_string).collect();
    Err(Failure::new(
        "bad_cores",
        format!(
            "--cores {cores}: Lavender may hold at most {} cores ({})",
            allowed.len(),
            list.join(", ")
        ),
    ))
}

/// Hands a Lavender process's streams from PID 1 (which holds them) to the delegation server
/// (a child process, restarted when it dies), over a socket pair made for each server.
pub mod broker {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    /// The server's end, in the server.
    static CHILD_END: OnceLock<Mutex<OwnedFd>> = OnceLock::new();

    /// A new pair: (PID 1's end, the server's end).
    pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
    }

    /// In PID 1: answers the server's requests on `end` until the server is gone.
    pub fn serve(end: OwnedFd) {
        let _ = std::thread::Builder::new()
            .name("stdio-broker".into())
            .spawn(move || {
                let mut request = [0u8; 4];
                while let Ok((4, _)) = fdpass::receive(&end, &mut request) {
                    let pid = u32::from_le_bytes(request);
                    let fds = SERVICE.get().and_then(|service| service.stdio_of(pid));
                    let raw: Vec<RawFd> = fds.iter().flatten().map(AsRawFd::as_raw_fd).collect();
                    if fdpass::send(&end, &[u8::from(fds.is_some())], &raw).is_err() {
                        return;
                    }
                }
            });
    }

    /// In the server: keeps its end.
    pub fn keep(end: OwnedFd) {
        let _ = CHILD_END.set(Mutex::new(end));
    }

    /// In the server: the streams of Lavender process `pid`, if Linux holds any.
    pub fn fetch(pid: u32) -> Option<[OwnedFd; 3]> {
        let end = CHILD_END.get()?.lock().unwrap_or_else(|e| e.into_inner());
        fdpass::send(&*end, &pid.to_le_bytes(), &[]).ok()?;
        let mut answer = [0u8; 1];
        let (_, fds) = fdpass::receive(&*end, &mut answer).ok()?;
        let mut fds = fds.into_iter();
        Some([fds.next()?, fds.next()?, fds.next()?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_core_limit_above_what_lavender_may_hold_is_refused() {
        let page = json!({"guests": [
            {"name": "linux", "kind": "linux", "allowed": [1, 3]},
            {"name": "lavender", "kind": "lavender", "allowed": [2, 3]},
        ]});
        let allowed = lavender_allowed(&page).unwrap();
        assert_eq!(allowed, [2, 3]);
        assert!(check_cores(1, &allowed).is_ok());
        assert!(check_cores(2, &allowed).is_ok());
        let refused = check_cores(3, &allowed).unwrap_err();
        assert_eq!(refused.code, "bad_cores");
        assert_eq!(
            refused.message,
            "--cores 3: Lavender may hold at most 2 cores (2, 3)"
        );
        assert_eq!(lavender_allowed(&json!({"guests": []})), None);
    }

    /// The lines a launcher's end of the connection has received so far.
    fn lines(vmctl: &mut UnixStream) -> Vec<Value> {
        vmctl.set_nonblocking(true).unwrap();
        let mut text = String::new();
        let _ = vmctl.read_to_string(&mut text);
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_launcher_gets_each_state_change_once_and_is_let_go_at_the_end() {
        let (agent, mut vmctl) = UnixStream::pair().unwrap();
        let mut job = Job::heard("spin");
        job.stages.pid = 7;
        job.launcher = Some(agent);
        job.events = vec![ProcessState::Started, ProcessState::Stopped];
        job.announce = true;
        let started = json!({"ok": true, "event": "started", "pid": 7});
        assert_eq!(job.relay(7, None), None);
        job.events.push(ProcessState::Continued);
        assert_eq!(job.relay(7, None), None);
        assert_eq!(
            lines(&mut vmctl),
            [
                started,
                json!({"event": "stopped", "pid": 7}),
                json!({"event": "continued", "pid": 7})
            ]
        );
        job.events.push(ProcessState::Exited { status: 3 });
        let stages = job.relay(7, None).expect("the end's stages");
        assert_eq!(stages.pid, 7);
        assert_ne!(stages.relayed, 0);
        assert!(job.launcher.is_none());
        assert_eq!(
            lines(&mut vmctl),
            [json!({"event": "exited", "pid": 7, "status": 3})]
        );
        // Let go: the launcher reads the end of the connection, and nothing more is sent.
        job.events.push(ProcessState::Continued);
        assert_eq!(job.relay(7, None), None);
        let mut rest = String::new();
        vmctl.set_nonblocking(false).unwrap();
        assert_eq!(vmctl.read_to_string(&mut rest).unwrap(), 0);
    }

    #[test]
    fn the_reply_attaches_the_launcher_which_hears_the_changes_heard_before_it() {
        let stream = || UnixStream::pair().unwrap().0.into();
        let pending = |launcher| PendingExec {
            name: "status".into(),
            cores: 1,
            stdio: Some([stream(), stream(), stream()]),
            launcher: Some(launcher),
            stages: ExecStages {
                accepted: 1100,
                sent: 1300,
                ..ExecStages::default()
            },
        };
        let mut state = State::default();

        // Still running at the reply: once the ring is drained the launcher has `started`,
        // and the job keeps it and the streams for what comes later.
        let (agent, mut first) = UnixStream::pair().unwrap();
        state.start_job(6, pending(agent), 1800);
        assert!(lines(&mut first).is_empty());
        state.relay_due();
        assert_eq!(
            lines(&mut first),
            [json!({"ok": true, "event": "started", "pid": 6})]
        );
        let job = &state.jobs[&6];
        assert_eq!((job.program.as_str(), job.cores), ("status", 1));
        assert!(job.launcher.is_some() && job.stdio.is_some());
        assert!(state.finished_stages.is_empty());

        // Its start and exit heard before the reply: `started` and `exited` go out together,
        // the launcher is let go, the streams are not kept, and the exec's stages are done;
        // the first launcher, due nothing, hears nothing.
        let mut heard = Job::heard(UNKNOWN);
        heard.state = JobState::Exited(3);
        heard.events = vec![ProcessState::Started, ProcessState::Exited { status: 3 }];
        heard.stages.exited = 2600;
        state.jobs.insert(7, heard);
        let (agent, mut vmctl) = UnixStream::pair().unwrap();
        state.start_job(7, pending(agent), 1900);
        state.relay_due();
        assert_eq!(
            lines(&mut vmctl),
            [
                json!({"ok": true, "event": "started", "pid": 7}),
                json!({"event": "exited", "pid": 7, "status": 3})
            ]
        );
        assert!(lines(&mut first).is_empty());
        let job = &state.jobs[&7];
        assert_eq!(job.program, "status");
        assert!(job.launcher.is_none() && job.stdio.is_none());
        let stages = state
            .finished_stages
            .pop_front()
            .expect("the exec's stages");
        assert_eq!(
            (
                stages.pid,
                stages.accepted,
                stages.sent,
                stages.replied,
                stages.exited
            ),
            (7, 1100, 1300, 1900, 2600)
        );
        assert_ne!(stages.relayed, 0);
    }

    #[test]
    fn a_launcher_hears_its_process_lost_with_lavender() {
        let (agent, mut vmctl) = UnixStream::pair().unwrap();
        let mut job = Job::heard("spin");
        job.launcher = Some(agent);
        job.events = vec![ProcessState::Started];
        assert_eq!(job.relay(9, Some("hung")), None);
        assert!(job.launcher.is_none());
        assert_eq!(
            lines(&mut vmctl),
            [json!({"event": "lost", "pid": 9, "lavender": "hung"})]
        );
    }

    #[test]
    fn a_program_file_is_read_into_the_window_up_to_its_room() {
        let words: Vec<std::sync::atomic::AtomicU64> = (0..64)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let window = DataWindow::new(&words);
        let path = std::env::temp_dir().join(format!("tandem-exec-test-{}", std::process::id()));
        let bytes: Vec<u8> = (0..100u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let room = |len| BufferRef { offset: 8, len };
        assert_eq!(read_into_window(&window, room(200), &file).unwrap(), 100);
        let mut back = [0u8; 100];
        window.read(room(100), &mut back).unwrap();
        assert_eq!(back[..], bytes[..]);
        // A file longer than the room fills it: the caller tells a file too large by that.
        assert_eq!(read_into_window(&window, room(33), &file).unwrap(), 33);
        // A room outside the window is an error, and nothing is read.
        assert!(read_into_window(
            &window,
            BufferRef {
                offset: 504,
                len: 16
            },
            &file
        )
        .is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn core_masks_list_their_cores() {
        assert_eq!(core_list(0b1100), [2, 3]);
        assert!(core_list(0).is_empty());
        assert_eq!(core_list(1 << 63), [63]);
    }
}
