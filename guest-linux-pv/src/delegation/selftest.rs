//! `tandem.selftest=delegation`: Linux drives Lavender's file tools end to end and checks
//! their work with its own tools.
//!
//! The agent fills the served root (a file of several MiB from a fixed pseudo-random
//! sequence, a text file, a directory of files for the scanner, symlinks to `/` and to
//! `/proc/self/root`), then starts Lavender programs over the control connection (`Exec`)
//! and waits for each to exit (process-state notifications):
//!
//! | marker | what Linux checked |
//! |---|---|
//! | `delegation_sha256` | Lavender's `sha256sum` exit status, and busybox `sha256sum` of the same file (the scenario compares it with Lavender's line) |
//! | `delegation_cp` | Lavender's `cp` of the large file, compared by `cmp` |
//! | `delegation_escape` | the `escape` program's status (attempts that got through) and that files outside the root are untouched |
//! | `delegation_mix` | six `mix` processes at once: their statuses, and the Linux CPUs that served calls |
//! | `delegation_tools` | `wc` (with Linux's expected counts), `cat`, `ls`, `scan` statuses |
//! | `delegation_agent_death` | Lavender's `cat` waits in a long call (opening a FIFO nobody writes) for [`LONG_CALL`], three times the silence that marks a dead server, and is still waiting (a slow call of a live server is not cut); then the server is killed with busybox `kill -9`: `cat`'s status (`EIO` makes it 1) and the Linux time it took; a second `cat` started while no server runs (it fails at once); then the server restarted by the step PID 1's loop takes for a reaped server, its new epoch seen in the region, and `wc` served by it |
//! | `delegation_agent_death_many` | [`WAITING_PROCESSES`] `openwait` processes of [`CALLERS_EACH`] threads, each thread opening the FIFO (100 callers: the calls on the rings, the rest waiting for a slot of their connection); the server is killed: every process's status (0 when each of its calls ended in `EIO`), the Linux time until the last one ended; the restarted server serves `wc` |
//! | `delegation_done` | the service's counters |
//! | `delegation_linux_panic` | with [`PANIC_WORD`] too, last: the `openwait` process whose [`PANIC_CALLERS`] calls wait in Linux (the first blocked on the FIFO in the server, the other on its connection's ring) when the agent panics the kernel through `/proc/sysrq-trigger` |

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmcall_proto::message::{
    peek_tag, tag, Notification, Outcome, ProcessCommand, ProcessState, Reply,
};

use super::{server, Control, Counters};
use crate::report;

/// The word that asks for this self-test.
pub const WORD: &str = "tandem.selftest=delegation";
/// The word that ends it with a kernel panic while Lavender's calls wait in Linux.
pub const PANIC_WORD: &str = "tandem.selftest_end=panic";
/// The large file's size.
pub const BIG_BYTES: usize = 4 << 20;
/// How long one Lavender program may take (Linux time; virtual under Bochs).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(600);
/// The first and the longest wait between two looks for Lavender's answer.
const LOOK_FIRST: Duration = Duration::from_millis(1);
const LOOK_MAX: Duration = Duration::from_millis(8);
/// How long `cat` waits in its call before the server is killed (Linux time).
const LONG_CALL: Duration = Duration::from_millis(3 * vmcall_proto::delegation::SILENCE_MS);
/// `openwait` processes, and threads of each, waiting in a delegated call when the server
/// is killed the second time (100 callers).
const WAITING_PROCESSES: usize = 4;
const CALLERS_EACH: usize = 25;
/// Threads of the `openwait` process waiting in a delegated call when Linux panics.
const PANIC_CALLERS: u64 = 2;
/// How long after its first call reached the server `openwait`'s other threads have to send
/// theirs (Linux time): they started with the first, on Lavender's own cores.
const CALLERS_SETTLE: Duration = Duration::from_millis(100);
/// Processes of the concurrent `mix` run.
const MIX_PROCESSES: u64 = 6;
const SCAN_FILES: usize = 12;
const NOTES: &str =
    "Lavender reads this file through Linux.\nIt has four lines\nand wc counts them\non both sides.\n";
const OUTSIDE_SECRET: &str = "root:*:19000:0:99999:7:::\n";

pub fn requested(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|word| word == WORD)
}

/// Whether the self-test ends by panicking Linux ([`PANIC_WORD`]).
pub fn panic_requested(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .any(|word| word == PANIC_WORD)
}

/// The fixed pseudo-random bytes of the large file (xorshift64).
fn big_file() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(BIG_BYTES);
    while bytes.len() < BIG_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(BIG_BYTES);
    bytes
}

fn prepare(root: &Path) -> std::io::Result<()> {
    fs::write(root.join("big.bin"), big_file())?;
    fs::write(root.join("notes.txt"), NOTES)?;
    let scan = root.join("scan");
    fs::create_dir_all(&scan)?;
    for index in 0..SCAN_FILES {
        let size = 3000 + index * 7919;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 31 + index) as u8).collect();
        fs::write(scan.join(format!("file-{index:02}.dat")), bytes)?;
    }
    for (name, target) in [("to-root", "/"), ("to-proc-root", "/proc/self/root")] {
        let link = root.join(name);
        let _ = fs::remove_file(&link);
        symlink(target, link)?;
    }
    fs::create_dir_all("/etc")?;
    fs::write("/etc/shadow", OUTSIDE_SECRET)?;
    Ok(())
}

/// Kills the server while a call is in flight, then restarts it and runs one more program.
fn agent_death(driver: &mut Driver<'_>, root: &Path) -> Result<(), String> {
    let fifo = root.join("fifo");
    let _ = fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| format!("mkfifo: {}", e.desc()))?;
    let waiting = driver.exec("cat", "path=fifo")?;
    // The open reaches the server and blocks there; the server lives, so the call goes on.
    std::thread::sleep(LONG_CALL);
    driver.take_pending()?;
    let waited_alive = !driver.exits.contains_key(&waiting);
    let killed = server::pid().ok_or("no delegation server")?;
    let (killed_ok, _) = tool(
        "/bin/kill",
        &[Path::new("-KILL"), Path::new(&killed.to_string())],
    )?;
    let killed_at = Instant::now();
    let status = driver.wait(&[waiting])?[0];
    let eio_after = killed_at.elapsed();
    // A new call while no server runs fails at once: Lavender knows the agent is dead now.
    let asked_at = Instant::now();
    let (fast_pid, fast_status) = driver.run("cat", "path=notes.txt")?;
    let fast_after = asked_at.elapsed();
    let old_epoch = driver.control.liveness.epoch();
    let restarted = server::collect(killed)?;
    // The new server attaches as the next epoch.
    let deadline = Instant::now() + PROGRAM_TIMEOUT;
    while driver.control.liveness.epoch() == old_epoch {
        if Instant::now() > deadline {
            return Err("the restarted server never attached".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let new_epoch = driver.control.liveness.epoch();
    let (_, wc) = driver.run("wc", "path=notes.txt")?;
    report::emit(&report::marker("delegation_agent_death", |o| {
        o.u64("long_call_ms", LONG_CALL.as_millis() as u64)
            .bool("waited_alive", waited_alive)
            .u64("killed", killed.as_raw() as u64)
            .bool("kill_ok", killed_ok)
            .u64("cat_pid", waiting.into())
            .i64("cat_status", status)
            .u64("eio_after_ms", eio_after.as_millis() as u64)
            .u64("fast_pid", fast_pid.into())
            .i64("fast_status", fast_status)
            .u64("fast_fail_ms", fast_after.as_millis() as u64)
            .u64("restarted", restarted.as_raw() as u64)
            .u64("old_epoch", old_epoch)
            .u64("new_epoch", new_epoch)
            .i64("wc_after_restart", wc);
    }));
    Ok(())
}

/// Kills the server while 100 callers wait in delegated calls: every caller gets `EIO`, no
/// process hangs, and the restarted server serves the next program.
fn agent_death_many(driver: &mut Driver<'_>) -> Result<(), String> {
    let mut pids = Vec::new();
    for _ in 0..WAITING_PROCESSES {
        pids.push(driver.exec("openwait", &format!("path=fifo threads={CALLERS_EACH}"))?);
    }
    // Every thread has started and called by then (a live server's calls are not cut).
    std::thread::sleep(LONG_CALL);
    driver.take_pending()?;
    let ended_early = pids
        .iter()
        .filter(|pid| driver.exits.contains_key(pid))
        .count();
    let killed = server::pid().ok_or("no delegation server")?;
    let (kill_ok, _) = tool(
        "/bin/kill",
        &[Path::new("-KILL"), Path::new(&killed.to_string())],
    )?;
    let killed_at = Instant::now();
    let statuses = driver.wait(&pids)?;
    let all_ended_after = killed_at.elapsed();
    let old_epoch = driver.control.liveness.epoch();
    let restarted = server::collect(killed)?;
    let deadline = Instant::now() + PROGRAM_TIMEOUT;
    while driver.control.liveness.epoch() == old_epoch {
        if Instant::now() > deadline {
            return Err("the restarted server never attached".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, wc) = driver.run("wc", "path=notes.txt")?;
    report::emit(&report::marker("delegation_agent_death_many", |o| {
        o.u64("callers", (WAITING_PROCESSES * CALLERS_EACH) as u64)
            .u64("ended_before_kill", ended_early as u64)
            .bool("kill_ok", kill_ok)
            .u64("all_ended_after_ms", all_ended_after.as_millis() as u64)
            .u64("restarted", restarted.as_raw() as u64)
            .i64("wc_after_restart", wc);
        o.array("pids", |a| {
            for pid in &pids {
                a.u64((*pid).into());
            }
        });
        o.array("statuses", |a| {
            for status in &statuses {
                a.u64(*status as u64);
            }
        });
    }));
    Ok(())
}

/// Panics Linux while [`PANIC_CALLERS`] of Lavender's delegated calls wait in it: `openwait`
/// opens the FIFO nobody writes on that many threads. A connection serves its process's
/// calls one at a time, so once the server has taken the first (it blocks on the FIFO), the
/// others wait on the connection's ring; [`CALLERS_SETTLE`] later every thread has sent its
/// call. The marker names the process, the console is drained (a panic does not flush the
/// tty) and `/proc/sysrq-trigger` (root may write it whatever `kernel.sysrq` says) panics
/// the kernel. Nothing runs after it: the hypervisor's and Lavender's lines tell the rest.
fn linux_panic(driver: &mut Driver<'_>, counters: &Counters) -> Result<(), String> {
    let calls = || counters.calls.load(std::sync::atomic::Ordering::Relaxed);
    let before = calls();
    let pid = driver.exec("openwait", &format!("path=fifo threads={PANIC_CALLERS}"))?;
    let deadline = Instant::now() + PROGRAM_TIMEOUT;
    while calls() == before {
        if Instant::now() > deadline {
            return Err("openwait's first call never reached the server".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(CALLERS_SETTLE);
    report::emit(&report::marker("delegation_linux_panic", |o| {
        o.u64("pid", pid.into()).u64("callers", PANIC_CALLERS);
    }));
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
    fs::write("/proc/sysrq-trigger", "c").map_err(|e| format!("/proc/sysrq-trigger: {e}"))?;
    Err("the kernel did not panic".into())
}

/// Starts programs on Lavender and collects their exits.
pub(super) struct Driver<'a> {
    control: &'a mut Control,
    next_request: u64,
    exits: HashMap<u32, i64>,
}

impl<'a> Driver<'a> {
    pub(super) fn new(control: &'a mut Control) -> Self {
        Self {
            control,
            next_request: 0,
            exits: HashMap::new(),
        }
    }

    /// Asks Lavender to run `program` with `args`; its process id.
    pub(super) fn exec(&mut self, program: &str, args: &str) -> Result<u32, String> {
        let window = self.control.window;
        let (program_slice, args_slice) = (
            self.control.plan.slice(0, 0).ok_or("no control slice")?,
            self.control.plan.slice(0, 1).ok_or("no control slice")?,
        );
        let program_ref = window
            .write(program_slice.offset, program.as_bytes())
            .map_err(|e| format!("{e:?}"))?;
        let args_ref = window
            .write(args_slice.offset, args.as_bytes())
            .map_err(|e| format!("{e:?}"))?;
        self.next_request += 1;
        let request_id = self.next_request;
        let command = ProcessCommand::Exec {
            request_id,
            cores: 1,
            flags: vmcall_proto::message::ExecFlags::empty(),
            program: program_ref,
            arguments: args_ref,
        };
        let mut bytes = [0u8; 64];
        let len = command.encode(&mut bytes).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + PROGRAM_TIMEOUT;
        while self.control.to_lavender.try_push(&bytes[..len]).is_err() {
            if Instant::now() > deadline {
                return Err("control ring stays full".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        crate::doorbell::wake_lavender(self.control.to_lavender.wake_needed());
        loop {
            match self.next_message(deadline)? {
                Incoming::Reply(reply) if reply.request_id == request_id => {
                    return match reply.outcome {
                        Outcome::Value(pid) => Ok(pid as u32),
                        Outcome::Errno(errno) => {
                            Err(format!("Lavender refused {program}: errno {}", errno.get()))
                        }
                    }
                }
                _ => continue,
            }
        }
    }

    /// Waits until every process in `pids` has exited; their statuses in that order.
    pub(super) fn wait(&mut self, pids: &[u32]) -> Result<Vec<i64>, String> {
        let deadline = Instant::now() + PROGRAM_TIMEOUT;
        while !pids.iter().all(|pid| self.exits.contains_key(pid)) {
            self.next_message(deadline)?;
        }
        Ok(pids.iter().map(|pid| self.exits[pid]).collect())
    }

    /// Takes every message already there (exits are recorded) without waiting.
    fn take_pending(&mut self) -> Result<(), String> {
        while self.poll()?.is_some() {}
        Ok(())
    }

    pub(super) fn run(&mut self, program: &str, args: &str) -> Result<(u32, i64), String> {
        let pid = self.exec(program, args)?;
        Ok((pid, self.wait(&[pid])?[0]))
    }

    /// The next message, looking with a doubling back-off ([`LOOK_FIRST`] to [`LOOK_MAX`]): a
    /// reply comes within milliseconds, an exit may take long, and each look wakes a Linux CPU
    /// the delegation workers being measured would otherwise have.
    fn next_message(&mut self, deadline: Instant) -> Result<Incoming, String> {
        let mut nap = LOOK_FIRST;
        loop {
            match self.poll()? {
                Some(Some(incoming)) => return Ok(incoming),
                Some(None) => {}
                None => {
                    if Instant::now() > deadline {
                        return Err("Lavender did not answer in time".into());
                    }
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(LOOK_MAX);
                }
            }
        }
    }

    /// One message from Lavender, if one is there (`Some(None)`: one not for us, dropped);
    /// process exits are recorded.
    fn poll(&mut self) -> Result<Option<Option<Incoming>>, String> {
        let mut buffer = [0u8; 128];
        let len = match self.control.from_lavender.try_pop(&mut buffer) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("control ring: {e:?}")),
        };
        let bytes = &buffer[..len];
        Ok(Some(match peek_tag(bytes) {
            Ok(tag::REPLY) => Reply::decode(bytes).ok().map(Incoming::Reply),
            Ok(tag::NOTIFICATION) => match Notification::decode(bytes) {
                Ok(Notification::ProcessState { process, state }) => {
                    match state {
                        ProcessState::Exited { status } => {
                            self.exits.insert(process, i64::from(status));
                        }
                        ProcessState::Killed { signal } => {
                            self.exits.insert(process, 128 + i64::from(signal));
                        }
                        _ => {}
                    }
                    Some(Incoming::Other)
                }
                _ => None,
            },
            _ => None,
        }))
    }
}

enum Incoming {
    Reply(Reply),
    Other,
}

/// Output of a busybox tool, or why it failed.
fn tool(program: &str, args: &[&Path]) -> Result<(bool, String), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

/// Runs the self-test; every result is a marker. With `then_panic`, it ends by panicking
/// Linux ([`linux_panic`]), and returns only if that failed.
pub fn run(control: &mut Control, counters: &Counters, root: &Path, then_panic: bool) {
    if let Err(e) = prepare(root) {
        report::emit(&report::error("delegation_selftest", &e, |o| {
            o.str("step", "prepare");
        }));
        return;
    }
    let mut driver = Driver::new(control);
    if let Err(e) = checks(&mut driver, root) {
        report::emit(&report::error("delegation_selftest", &e, |_| {}));
    }
    let cpus = counters.cpus_used();
    report::emit(&report::marker("delegation_done", |o| {
        o.u64(
            "calls",
            counters.calls.load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "contexts_started",
            counters
                .contexts_started
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "contexts_ended",
            counters
                .contexts_ended
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "refused",
            counters.refused.load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "stale",
            counters.stale.load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "woken_by_doorbell",
            counters
                .woken_by_doorbell
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .u64(
            "doorbells_rung",
            counters
                .doorbells_rung
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .array("cpus", |a| {
            for (cpu, _) in &cpus {
                a.u64(*cpu as u64);
            }
        })
        .array("calls_per_cpu", |a| {
            for (_, calls) in &cpus {
                a.u64(*calls);
            }
        });
    }));
    if then_panic {
        if let Err(e) = linux_panic(&mut driver, counters) {
            report::emit(&report::error("delegation_selftest", &e, |o| {
                o.str("step", "linux_panic");
            }));
        }
    }
}

fn checks(driver: &mut Driver<'_>, root: &Path) -> Result<(), String> {
    let big = root.join("big.bin");
    let (pid, status) = driver.run("sha256sum", "path=big.bin")?;
    let (ok, linux) = tool("/bin/sha256sum", &[&big])?;
    let linux_hex = linux.split_whitespace().next().unwrap_or("").to_string();
    report::emit(&report::marker("delegation_sha256", |o| {
        o.u64("pid", pid.into())
            .i64("status", status)
            .str("linux", &linux_hex)
            .bool("linux_ok", ok)
            .u64("bytes", BIG_BYTES as u64);
    }));

    let copy = root.join("copy.bin");
    let (pid, status) = driver.run("cp", "from=big.bin to=copy.bin")?;
    let (same, _) = tool("/bin/cmp", &[&big, &copy])?;
    let copied = fs::metadata(&copy).map(|m| m.len()).unwrap_or(0);
    report::emit(&report::marker("delegation_cp", |o| {
        o.u64("pid", pid.into())
            .i64("status", status)
            .bool("cmp_same", same)
            .u64("bytes", copied);
    }));

    let (pid, status) = driver.run("escape", "link=to-root proc=to-proc-root")?;
    let shadow_intact = fs::read_to_string("/etc/shadow").ok().as_deref() == Some(OUTSIDE_SECRET);
    let nothing_created = !Path::new("/tmp/escaped").exists()
        && !root.parent().unwrap_or(root).join("outside").exists();
    report::emit(&report::marker("delegation_escape", |o| {
        o.u64("pid", pid.into())
            .i64("status", status)
            .bool("outside_untouched", shadow_intact && nothing_created);
    }));

    let mut pids = Vec::new();
    for id in 0..MIX_PROCESSES {
        pids.push(driver.exec("mix", &format!("id={id} rounds=4 shared=big.bin"))?);
    }
    let statuses = driver.wait(&pids)?;
    report::emit(&report::marker("delegation_mix", |o| {
        o.u64("processes", MIX_PROCESSES).array("statuses", |a| {
            for status in &statuses {
                a.u64(*status as u64);
            }
        });
    }));

    let (_, wc) = driver.run("wc", "path=notes.txt")?;
    let (_, cat) = driver.run("cat", "path=notes.txt")?;
    let (_, ls) = driver.run("ls", "path=scan")?;
    let (_, scan) = driver.run("scan", "dir=scan threads=4")?;
    let scan_bytes: u64 = (0..SCAN_FILES)
        .map(|index| (3000 + index * 7919) as u64)
        .sum();
    let words = NOTES.split_whitespace().count();
    report::emit(&report::marker("delegation_tools", |o| {
        o.i64("wc", wc)
            .i64("cat", cat)
            .i64("ls", ls)
            .i64("scan", scan)
            .str(
                "wc_expected",
                &format!(
                    "{} {words} {} notes.txt",
                    NOTES.lines().count(),
                    NOTES.len()
                ),
            )
            .u64("scan_files", SCAN_FILES as u64)
            .u64("scan_bytes", scan_bytes);
    }));
    agent_death(driver, root)?;
    agent_death_many(driver)
}
