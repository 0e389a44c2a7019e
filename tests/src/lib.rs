//! End-to-end harness: boot the real image in an emulator and judge the markers it prints.
//!
//! A scenario (an integration test in `tests/scenarios.rs`) describes a machine, boots it,
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

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
