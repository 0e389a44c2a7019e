//! End-to-end harness: boot the real image in an emulator and judge the markers it prints.
//!
//! A scenario (an integration test in `tests/scenarios/`) describes a machine, boots it,
//! waits for a condition over the markers, then asserts on them:
//!
//! ```no_run
//! use std::time::Duration;
//! use tandem_e2e::{EmulatorKind, Outcome, Scenario};
//!
//! let mut run = Scenario::new("example", EmulatorKind::QemuTcg)
//!     .cpus(2)
//!     .timeout(Duration::from_secs(60))
//!     .boot();
//! let outcome = run.wait_until(|markers| markers.iter().any(|m| m.ev() == "idle"));
//! assert_eq!(outcome, Outcome::Satisfied);
//! ```
//!
//! Every scenario gets a run dir, `target/tandem/runs/<scenario>/`, with both serial consoles,
//! the emulator's logs and a `result.json` (outcome, wall time, marker count). When a scenario
//! fails (any panic while its [`ScenarioRun`] is alive) the logs are kept and their last lines
//! printed; when it passes they are deleted unless `--keep-logs` was given.
//!
//! The inputs come from `cargo xtask test` through the environment (`TANDEM_HYPERVISOR`,
//! `TANDEM_LINUX_KERNEL`, `TANDEM_INITRD`, `TANDEM_ISO`, `TANDEM_RUNS_DIR`, `TANDEM_KEEP_LOGS`).
//!
//! [`Terminal`] drives `cargo xtask run` itself in a pseudo-terminal, as a person at a
//! terminal would: it reads what the terminal shows and types.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::emulator::{self, Machine, RunDir};
use xtask::image::{self, GuestImages, ImageSpec};
use xtask::partitions::{self, BuildMachine};
use xtask::session::Session;
use xtask::test as env;

pub use xtask::core_moves;
pub use xtask::emulator::{EmulatorKind, Port};
pub use xtask::marker::Marker;
pub use xtask::session::Outcome;

/// How many lines of each log a failing scenario prints.
const TAIL_LINES: usize = 40;

/// What `cargo xtask test` built for the scenarios.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub hypervisor: PathBuf,
    pub lavender: PathBuf,
    pub linux_kernel: PathBuf,
    /// The Linux initramfs (PV agent + busybox).
    pub initrd: PathBuf,
    /// The default image (hypervisor command line `log=info`).
    pub iso: PathBuf,
    pub runs_dir: PathBuf,
    pub keep_logs: bool,
}

impl Artifacts {
    /// Reads the environment set by `cargo xtask test`; panics with directions when it is
    /// missing (e.g. under a plain `cargo test`).
    pub fn from_env() -> Artifacts {
        let var = |name: &str| -> PathBuf {
            match std::env::var_os(name) {
                Some(value) => PathBuf::from(value),
                None => panic!(
                    "{name} is not set: the end-to-end scenarios need the artifacts that \
                     `cargo xtask test` builds. Run them with `cargo xtask test --e2e-only` \
                     (or `cargo xtask test --scenario NAME`)."
                ),
            }
        };
        Artifacts {
            hypervisor: var(env::ENV_HYPERVISOR),
            lavender: var(env::ENV_LAVENDER),
            linux_kernel: var(env::ENV_LINUX_KERNEL),
            initrd: var(env::ENV_INITRD),
            iso: var(env::ENV_ISO),
            runs_dir: var(env::ENV_RUNS_DIR),
            keep_logs: std::env::var(env::ENV_KEEP_LOGS).is_ok_and(|v| v == "1"),
        }
    }
}

/// A machine to boot and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Scenario {
    name: String,
    machine: Machine,
    timeout: Duration,
    hv_cmdline: Option<String>,
    config: Option<PathBuf>,
}

impl Scenario {
    /// `name` is also the run dir's name: use the test function's name. Defaults: 4 CPUs,
    /// 1024 MiB, 5 minutes, the default image.
    pub fn new(name: &str, emulator: EmulatorKind) -> Scenario {
        Scenario {
            name: name.to_string(),
            machine: Machine {
                emulator,
                cpus: 4,
                memory_mib: 1024,
            },
            timeout: Duration::from_secs(300),
            hv_cmdline: None,
            config: None,
        }
    }

    pub fn cpus(mut self, cpus: u32) -> Scenario {
        self.machine.cpus = cpus;
        self
    }

    pub fn memory_mib(mut self, memory_mib: u32) -> Scenario {
        self.machine.memory_mib = memory_mib;
        self
    }

    /// The longest [`ScenarioRun::wait_until`] may wait.
    pub fn timeout(mut self, timeout: Duration) -> Scenario {
        self.timeout = timeout;
        self
    }

    /// Boot an image of this scenario's own, whose hypervisor command line is `cmdline`,
    /// instead of the shared default image.
    pub fn hv_cmdline(mut self, cmdline: &str) -> Scenario {
        self.hv_cmdline = Some(cmdline.to_string());
        self
    }

    /// Boot an image of this scenario's own with the partition configuration
    /// `tests/configs/<name>.toml` instead of `config/default.toml`.
    pub fn config(mut self, name: &str) -> Scenario {
        self.config = Some(config_path(name));
        self
    }

    /// Builds the scenario's image if it needs its own, and starts the emulator.
    /// Panics (recording the failure in `result.json`) when either fails.
    pub fn boot(self) -> ScenarioRun {
        let started = Instant::now();
        let artifacts = Artifacts::from_env();
        let dir = artifacts.runs_dir.join(&self.name);
        let run_dir = RunDir::fresh(&dir)
            .unwrap_or_else(|e| panic!("cannot create run dir {}: {e:#}", dir.display()));
        let booted = self
            .image(&artifacts, &run_dir)
            .and_then(|iso| Session::start(&self.machine, &iso, run_dir.clone()));
        match booted {
            Ok(session) => ScenarioRun {
                scenario: self,
                session,
                keep_logs: artifacts.keep_logs,
                started,
                ended: None,
            },
            Err(e) => {
                let message = format!("scenario {} could not boot: {e:#}", self.name);
                write_result(
                    &self,
                    run_dir.path(),
                    "failed",
                    started.elapsed(),
                    0,
                    &message,
                );
                panic!("{message}");
            }
        }
    }

    fn image(&self, artifacts: &Artifacts, run_dir: &RunDir) -> anyhow::Result<PathBuf> {
        if self.hv_cmdline.is_none() && self.config.is_none() {
            return Ok(artifacts.iso.clone());
        }
        let config = self
            .config
            .clone()
            .unwrap_or_else(partitions::default_config);
        let packed = run_dir.file("partitions");
        let machine = BuildMachine {
            cpus: self.machine.cpus,
            memory_mib: self.machine.memory_mib,
        };
        partitions::pack(&config, machine, &packed)?;
        let guests = GuestImages {
            lavender: artifacts.lavender.clone(),
            partitions: packed,
            linux_kernel: artifacts.linux_kernel.clone(),
            initrd: artifacts.initrd.clone(),
        };
        let iso = run_dir.file("tandem.iso");
        let cmdline = self.hv_cmdline.as_deref().unwrap_or("log=info");
        let spec = ImageSpec::standard(&artifacts.hypervisor, &guests, cmdline);
        image::build_iso(&spec, &iso)?;
        Ok(iso)
    }
}

/// `tests/configs/<name>.toml`: the partition configurations scenarios use.
pub fn config_path(name: &str) -> PathBuf {
    xtask::workspace_root()
        .join("tests")
        .join("configs")
        .join(format!("{name}.toml"))
}

/// A booted scenario. Dropping it stops the emulator, writes `result.json` (failed if the
/// test is panicking), and prints the logs' tails on failure.
pub struct ScenarioRun {
    scenario: Scenario,
    session: Session,
    keep_logs: bool,
    started: Instant,
    ended: Option<Outcome>,
}

impl ScenarioRun {
    /// Watches the consoles until `done` holds over the markers seen so far, a terminal
    /// marker (`fatal`, `panic`) appears, the emulator exits, or the scenario's time limit
    /// passes; then stops the emulator. A malformed marker fails the scenario at once.
    pub fn wait_until(&mut self, done: impl FnMut(&[Marker]) -> bool) -> Outcome {
        let never_interrupted = AtomicBool::new(false);
        let outcome = self
            .session
            .watch(
                done,
                Some(self.scenario.timeout),
                &never_interrupted,
                |_, _| {},
            )
            .unwrap_or_else(|e| panic!("watching the consoles failed: {e:#}"));
        if let Err(e) = self.session.stop() {
            panic!("stopping the emulator failed: {e:#}");
        }
        self.ended = Some(outcome.clone());
        if let Outcome::Malformed { .. } = outcome {
            panic!("{outcome}");
        }
        outcome
    }

    /// Every marker seen, in order (COM1's and COM2's interleaved by arrival).
    pub fn markers(&self) -> &[Marker] {
        self.session.markers()
    }

    /// The objects of the markers whose `"ev"` is `ev`.
    pub fn events(&self, ev: &str) -> Vec<&Value> {
        self.markers()
            .iter()
            .filter(|m| m.ev() == ev)
            .map(|m| &m.value)
            .collect()
    }

    /// Fails the scenario if any marker named in `evs` appeared (a fault, a stopped guest, an
    /// error the run must not have), listing them.
    pub fn assert_none_of(&self, evs: &[&str]) {
        for ev in evs {
            let seen = self.events(ev);
            assert!(seen.is_empty(), "unexpected {ev}: {seen:?}");
        }
    }

    /// The one marker with this `"ev"`; panics if there are none or several.
    pub fn single(&self, ev: &str) -> &Value {
        match self.events(ev).as_slice() {
            [one] => one,
            others => panic!("expected exactly one {ev:?} marker, saw {}", others.len()),
        }
    }

    /// Wall time since the scenario started booting (image build included).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything a console printed so far (e.g. Linux's kernel log on COM1).
    pub fn console_text(&self, port: Port) -> String {
        let path = self.session.run_dir().console(port);
        std::fs::read(&path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn report_failure(&self) {
        let run_dir = self.session.run_dir();
        eprintln!(
            "\n=== scenario {} FAILED after {:.1}s; logs kept in {}",
            self.scenario.name,
            self.elapsed().as_secs_f64(),
            run_dir.path().display()
        );
        match &self.ended {
            Some(outcome) => eprintln!("=== the run ended with: {outcome}"),
            None => eprintln!("=== the test failed before waiting for an outcome"),
        }
        eprintln!("=== markers seen: {}", self.markers().len());
        for marker in self.markers() {
            eprintln!(
                "  {} line {}: {}",
                marker.port.name(),
                marker.line,
                marker.value
            );
        }
        let consoles = Port::ALL.iter().map(|&port| run_dir.console(port));
        for log in consoles.chain(self.session.emulator_logs().iter().cloned()) {
            eprintln!(
                "=== last {TAIL_LINES} lines of {}:\n{}",
                log.display(),
                emulator::tail(&log, TAIL_LINES)
            );
        }
    }
}

impl Drop for ScenarioRun {
    fn drop(&mut self) {
        let _ = self.session.stop();
        let failed = std::thread::panicking();
        let end = self
            .ended
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "not awaited".into());
        let run_dir = self.session.run_dir().path().to_path_buf();
        write_result(
            &self.scenario,
            &run_dir,
            if failed { "failed" } else { "passed" },
            self.elapsed(),
            self.markers().len(),
            &end,
        );
        eprintln!(
            "scenario {}: {} in {:.1}s",
            self.scenario.name,
            if failed { "FAILED" } else { "passed" },
            self.elapsed().as_secs_f64()
        );
        if failed {
            self.report_failure();
        } else if !self.keep_logs {
            remove_logs(&run_dir);
        }
    }
}

fn write_result(
    scenario: &Scenario,
    run_dir: &Path,
    outcome: &str,
    wall: Duration,
    markers: usize,
    end: &str,
) {
    let result = json!({
        "scenario": scenario.name,
        "outcome": outcome,
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "markers": markers,
        "end": end,
        "emulator": scenario.machine.emulator,
        "cpus": scenario.machine.cpus,
        "memory_mib": scenario.machine.memory_mib,
        "timeout_seconds": scenario.timeout.as_secs(),
    });
    let path = run_dir.join(env::RESULT_FILE);
    if let Err(e) = std::fs::write(&path, format!("{result:#}\n")) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

/// A passing scenario keeps only its `result.json`.
fn remove_logs(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() != env::RESULT_FILE {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// `TANDEM_XTASK`: the xtask binary a [`Terminal`] runs. Default: `xtask` in the target
/// directory's profile folder, where `cargo xtask test` (a `cargo run` of it) built it, next
/// to this test binary's `deps/`.
pub const ENV_XTASK: &str = "TANDEM_XTASK";

/// The xtask binary to drive.
fn xtask_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(ENV_XTASK) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps");
    let xtask = profile_dir.join("xtask");
    assert!(
        xtask.is_file(),
        "no xtask binary at {} (run the scenarios with `cargo xtask test`, or set {ENV_XTASK})",
        xtask.display()
    );
    xtask
}

/// A pseudo-terminal pair sized 24x80, its slave end unlike the user's terminal in nothing
/// that matters to xtask (`isatty` holds; xtask puts it in raw mode itself).
fn open_terminal() -> (File, OwnedFd) {
    let (mut master, mut slave): (libc::c_int, libc::c_int) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty() writes one descriptor into each out-pointer, which point to live
    // locals; no name buffer (null), default settings (null), and a live winsize it reads.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded, so both are fresh descriptors that nothing else owns.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// `cargo xtask run` in a pseudo-terminal: what it shows is kept (and written to
/// `<runs>/<name>/terminal.log`), and text can be typed into it. It boots the default
/// image, or one of its own (`<runs>/<name>/tandem.iso`) for a hypervisor command line of
/// its own; its run dir is `<runs>/<name>/run/`. Dropping it presses Ctrl-] (then interrupts, then kills) if xtask
/// still runs, writes `result.json`, and on failure prints the end of the terminal and
/// console logs.
pub struct Terminal {
    name: String,
    dir: PathBuf,
    child: Child,
    master: File,
    shown: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
    started: Instant,
    keep_logs: bool,
}

/// The key that stops an interactive `cargo xtask run` (Ctrl-]).
pub const ESCAPE_KEY: u8 = xtask::shell::ESCAPE;

impl Terminal {
    /// Starts `xtask run --iso ISO ARGS... --run-dir <runs>/<name>/run` on a new terminal,
    /// ISO being the default image, or one built with `hv_cmdline` if given.
    pub fn run(name: &str, hv_cmdline: Option<&str>, args: &[&str]) -> Terminal {
        Self::run_configured(name, None, hv_cmdline, args)
    }

    /// [`Self::run`], with the partition configuration `tests/configs/<config>.toml` if
    /// `config` names one.
    pub fn run_configured(
        name: &str,
        config: Option<&str>,
        hv_cmdline: Option<&str>,
        args: &[&str],
    ) -> Terminal {
        let artifacts = Artifacts::from_env();
        let dir = artifacts.runs_dir.join(name);
        let run_dir = RunDir::fresh(&dir)
            .unwrap_or_else(|e| panic!("cannot create run dir {}: {e:#}", dir.display()));
        let mut scenario = Scenario::new(name, EmulatorKind::Bochs);
        if let Some(config) = config {
            scenario = scenario.config(config);
        }
        if let Some(cmdline) = hv_cmdline {
            scenario = scenario.hv_cmdline(cmdline);
        }
        // The default image unless a configuration or command line asks for another.
        let iso = scenario
            .image(&artifacts, &run_dir)
            .unwrap_or_else(|e| panic!("building the image of {name}: {e:#}"));
        let (master, slave) = open_terminal();
        let stdio = || Stdio::from(slave.try_clone().expect("dup of the pty slave"));
        let mut cmd = Command::new(xtask_binary());
        cmd.arg("run")
            .arg("--iso")
            .arg(iso)
            .args(args)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio());
        // Its own process group: nothing aimed at the test's group reaches it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // Only the child holds the slave now: the master reads EIO once it is gone.
        drop(slave);
        let shown = Arc::new(Mutex::new(Vec::new()));
        let log = File::create(dir.join("terminal.log")).expect("terminal.log");
        let reader = {
            let shown = shown.clone();
            let master = master.try_clone().expect("dup of the pty master");
            std::thread::spawn(move || read_terminal(master, log, &shown))
        };
        Terminal {
            name: name.to_string(),
            dir: run_dir.path().to_path_buf(),
            child,
            master,
            shown,
            reader: Some(reader),
            status: None,
            started: Instant::now(),
            keep_logs: artifacts.keep_logs,
        }
    }

    /// Everything the terminal showed so far, as bytes.
    pub fn shown(&self) -> Vec<u8> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `text` appears at or after byte `from` of what the terminal showed and
    /// returns where it starts, or `None` if xtask exits or `limit` passes first.
    pub fn wait_for(&mut self, text: &str, from: usize, limit: Duration) -> Option<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let shown = self.shown();
            if let Some(at) = find(&shown[from.min(shown.len())..], text.as_bytes()) {
                return Some(from + at);
            }
            if self.exited() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text`, a key at a time (as fast as a quick typist: the guest's UART takes
    /// one byte at a time).
    pub fn type_text(&mut self, text: &[u8]) {
        for &key in text {
            self.master
                .write_all(&[key])
                .unwrap_or_else(|e| panic!("typing into the terminal: {e}"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `command` at the shell prompt shown at byte `from`, followed by `; echo exit=$?`,
    /// and waits (at most `limit`) for its exit status and the next prompt. Returns what the
    /// terminal showed from `from` to that prompt, and where the prompt starts.
    pub fn command(&mut self, command: &str, from: usize, limit: Duration) -> (String, usize) {
        self.type_text(format!("{command}; echo exit=$?\r").as_bytes());
        let answer = self
            .wait_for("\nexit=", from, limit)
            .unwrap_or_else(|| panic!("`{command}` never ended"));
        let prompt = self
            .wait_for("~ # ", answer, Duration::from_secs(300))
            .unwrap_or_else(|| panic!("no prompt after `{command}`"));
        let shown = self.shown();
        (
            String::from_utf8_lossy(&shown[from..prompt]).into_owned(),
            prompt,
        )
    }

    /// Presses Ctrl-] and waits for xtask to exit (at most `limit`); its exit status.
    pub fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        if !self.exited() {
            let _ = self.master.write_all(&[ESCAPE_KEY]);
        }
        let deadline = Instant::now() + limit;
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.status.is_some() {
            // What it printed last is read before anyone looks.
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        self.status
    }

    /// Wall time since the emulator started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// xtask's run dir (its console logs).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Everything a console printed so far, from its log in the run dir (COM1's as the
    /// relay copied it).
    pub fn console_text(&self, port: Port) -> String {
        std::fs::read(self.run_dir().join(format!("{}.log", port.name())))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The objects of the markers whose `"ev"` is `ev` in the whole lines of both consoles'
    /// logs so far (COM1's, then COM2's); panics on a malformed marker.
    pub fn events(&self, ev: &str) -> Vec<Value> {
        let mut found = Vec::new();
        for port in Port::ALL {
            let text = self.console_text(port);
            // A line still being written is not read yet.
            let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
            for line in complete.lines() {
                match xtask::marker::parse_line(line) {
                    Some(Ok(value)) if value["ev"] == ev => found.push(value),
                    Some(Err(why)) => panic!("{} of {}: {why}", port.name(), self.name),
                    _ => {}
                }
            }
        }
        found
    }

    fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill() has no memory-safety preconditions; the process is our child,
            // not yet reaped (so its pid is not reused).
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Ctrl-], then Ctrl-C's signal (xtask stops its emulator on both), then SIGKILL.
        if self.stop(Duration::from_secs(30)).is_none() {
            self.signal(libc::SIGINT);
            if self.stop(Duration::from_secs(30)).is_none() {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
            }
        }
        let failed = std::thread::panicking();
        let result = json!({
            "scenario": self.name,
            "outcome": if failed { "failed" } else { "passed" },
            "wall_seconds": (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "end": self.status.map(|s| s.to_string()).unwrap_or_else(|| "killed".into()),
        });
        let path = self.dir.join(env::RESULT_FILE);
        if let Err(e) = std::fs::write(&path, format!("{result:#}\n")) {
            eprintln!("cannot write {}: {e}", path.display());
        }
        eprintln!(
            "scenario {}: {} in {:.1}s",
            self.name,
            if failed { "FAILED" } else { "passed" },
            self.started.elapsed().as_secs_f64()
        );
        if failed {
            eprintln!(
                "\n=== scenario {} FAILED; logs kept in {}",
                self.name,
                self.dir.display()
            );
            let run = self.run_dir();
            let logs = [
                self.dir.join("terminal.log"),
                run.join("com1.log"),
                run.join("com2.log"),
            ];
            for log in logs {
                eprintln!(
                    "=== last {TAIL_LINES} lines of {}:\n{}",
                    log.display(),
                    emulator::tail(&log, TAIL_LINES)
                );
            }
        } else if !self.keep_logs {
            remove_logs(&self.dir);
        }
    }
}

/// Copies what the terminal shows into `shown` and `log` until xtask is gone.
fn read_terminal(mut master: File, mut log: File, shown: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = log.write_all(&buf[..n]);
                shown
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: no process has the slave open any more.
            Err(_) => return,
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len().max(1))
        .position(|window| window == needle)
}

/// The lines of terminal output that are markers (well-formed or not).
pub fn marker_lines(bytes: &[u8]) -> Vec<String> {
    terminal_lines(bytes)
        .into_iter()
        .filter(|line| xtask::marker::parse_line(line).is_some())
        .collect()
}

/// Terminal output as text lines: carriage returns dropped, split at line feeds.
pub fn terminal_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .replace('\r', "")
        .split('\n')
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_helpers() {
        assert_eq!(find(b"ab~ # cd", b"~ # "), Some(2));
        assert_eq!(find(b"ab", b"~ # "), None);
        assert_eq!(
            terminal_lines(b"~ # echo x\r\r\nx\r\n~ # "),
            ["~ # echo x", "x", "~ # "]
        );
        assert_eq!(
            marker_lines(b"a\r\n[hv] @@tandem {\"ev\":\"x\"}\r\n@@tandem {bad\r\nb"),
            [r#"[hv] @@tandem {"ev":"x"}"#, "@@tandem {bad"]
        );
    }
}
