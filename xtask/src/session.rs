//! One boot of an image: the emulator, its consoles, and the markers seen so far.
//!
//! Both `cargo xtask run` and the end-to-end harness drive a [`Session`]: start it, then
//! [`Session::watch`] until the caller's condition holds, a terminal marker appears, the
//! emulator exits, the time limit passes, or the user interrupts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::console::LineFollower;
use crate::emulator::{self, Com1, Emulator, Machine, Port, RunDir};
use crate::marker::{self, Marker};

/// How a [`Session::watch`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The caller's condition over the markers held.
    Satisfied,
    /// A terminal marker (`fatal`, `panic`) appeared; the machine does nothing more.
    Terminal(Marker),
    /// A line carried the marker prefix but no valid marker object.
    Malformed {
        port: Port,
        line: usize,
        text: String,
        error: String,
    },
    /// The time limit passed first.
    TimedOut(Duration),
    /// The emulator exited by itself (its exit status as text).
    EmulatorExited(String),
    /// The user pressed Ctrl-C.
    Interrupted,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Satisfied => write!(f, "the awaited markers appeared"),
            Outcome::Terminal(marker) => write!(
                f,
                "terminal marker on {} line {}: {}",
                marker.port.name(),
                marker.line,
                marker.value
            ),
            Outcome::Malformed {
                port,
                line,
                text,
                error,
            } => write!(
                f,
                "malformed marker on {} line {line} ({error}): {text}",
                port.name()
            ),
            Outcome::TimedOut(limit) => write!(f, "timed out after {}s", limit.as_secs()),
            Outcome::EmulatorExited(status) => write!(f, "the emulator exited ({status})"),
            Outcome::Interrupted => write!(f, "interrupted"),
        }
    }
}

struct Console {
    port: Port,
    follower: LineFollower,
    lines: usize,
    /// The head of a marker a kernel message cut (`marker::cut_by_kernel_message`): the
    /// next line is its tail.
    cut: Option<String>,
}

pub struct Session {
    emulator: Emulator,
    run_dir: RunDir,
    consoles: Vec<Console>,
    markers: Vec<Marker>,
}

/// How often the consoles are read. Markers are acted on within this delay; it is far below
/// anything the emulators do in a line's time.
const POLL: Duration = Duration::from_millis(50);

impl Session {
    /// Boots `iso` on `machine`; everything the run produces goes to `run_dir`.
    pub fn start(machine: &Machine, iso: &Path, run_dir: RunDir) -> Result<Session> {
        Session::start_with(machine, iso, run_dir, &Com1::File)
    }

    /// [`Session::start`] with COM1 connected to `com1`. With [`Com1::Tty`], whoever holds
    /// the other side must append COM1's output to `run_dir.console(Port::Com1)` for the
    /// session to see it (as [`crate::shell::Shell`] does).
    pub fn start_with(
        machine: &Machine,
        iso: &Path,
        run_dir: RunDir,
        com1: &Com1,
    ) -> Result<Session> {
        let emulator = emulator::launch_with(machine, iso, &run_dir, com1)?;
        Ok(Session::with_emulator(emulator, run_dir))
    }

    /// [`Session::start`] on a Bochs machine run by the Bochs program `bochs` (the
    /// nested-KVM scenario's [`emulator::patched_bochs`]).
    pub fn start_on_bochs(
        bochs: &Path,
        machine: &Machine,
        iso: &Path,
        run_dir: RunDir,
    ) -> Result<Session> {
        let emulator = emulator::launch_bochs(bochs, machine, iso, &run_dir)?;
        Ok(Session::with_emulator(emulator, run_dir))
    }

    /// A session over an already started emulator writing its consoles into `run_dir`.
    fn with_emulator(emulator: Emulator, run_dir: RunDir) -> Session {
        let consoles = Port::ALL
            .iter()
            .map(|&port| Console {
                port,
                follower: LineFollower::new(&run_dir.console(port)),
                lines: 0,
                cut: None,
            })
            .collect();
        Session {
            emulator,
            run_dir,
            consoles,
            markers: Vec::new(),
        }
    }

    pub fn markers(&self) -> &[Marker] {
        &self.markers
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    /// The emulator's own logs (the consoles are `run_dir().console(port)`).
    pub fn emulator_logs(&self) -> &[PathBuf] {
        self.emulator.logs()
    }

    /// Reads the consoles until an [`Outcome`]. `until` is asked after every new marker;
    /// `on_line` sees every console line as it arrives; `interrupted` is polled for Ctrl-C.
    /// The emulator keeps running afterwards unless it exited: call [`Session::stop`].
    pub fn watch(
        &mut self,
        mut until: impl FnMut(&[Marker]) -> bool,
        timeout: Option<Duration>,
        interrupted: &AtomicBool,
        mut on_line: impl FnMut(Port, &str),
    ) -> Result<Outcome> {
        let started = Instant::now();
        if until(&self.markers) {
            return Ok(Outcome::Satisfied);
        }
        loop {
            // Check for exit before reading, so the last read sees everything it wrote.
            let exited = self.emulator.try_wait()?;
            for console in &mut self.consoles {
                let lines = if exited.is_some() {
                    console.follower.finish()
                } else {
                    console.follower.poll()
                }
                .with_context(|| format!("reading {}", console.follower.path().display()))?;
                for text in lines {
                    console.lines += 1;
                    on_line(console.port, &text);
                    let text = match console.cut.take() {
                        Some(head) => head + &text,
                        None => text,
                    };
                    let Some(parsed) = marker::parse_line(&text) else {
                        continue;
                    };
                    let value = match parsed {
                        Ok(value) => value,
                        Err(_) if marker::cut_by_kernel_message(&text).is_some() => {
                            console.cut = marker::cut_by_kernel_message(&text).map(str::to_owned);
                            continue;
                        }
                        Err(error) => {
                            return Ok(Outcome::Malformed {
                                port: console.port,
                                line: console.lines,
                                text,
                                error,
                            })
                        }
                    };
                    let marker = Marker {
                        port: console.port,
                        line: console.lines,
                        value,
                    };
                    self.markers.push(marker.clone());
                    if marker.is_terminal() {
                        return Ok(Outcome::Terminal(marker));
                    }
                    if until(&self.markers) {
                        return Ok(Outcome::Satisfied);
                    }
                }
            }
            // A condition can also come true with time alone (a grace period after some
            // marker), while the guests print nothing more.
            if until(&self.markers) {
                return Ok(Outcome::Satisfied);
            }
            if let Some(status) = exited {
                return Ok(Outcome::EmulatorExited(status.to_string()));
            }
            if interrupted.load(Ordering::Relaxed) {
                return Ok(Outcome::Interrupted);
            }
            if let Some(limit) = timeout {
                if started.elapsed() >= limit {
                    return Ok(Outcome::TimedOut(limit));
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the emulator (its logs stay in the run dir).
    pub fn stop(&mut self) -> Result<()> {
        self.emulator.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::EmulatorKind;
    use std::process::Command;

    /// A session whose "emulator" is a shell script writing `script`'s output to COM2.
    fn fake(name: &str, script: &str) -> Session {
        let dir =
            std::env::temp_dir().join(format!("tandem-session-{name}-{}", std::process::id()));
        let run_dir = RunDir::fresh(&dir).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("exec >> com2.log\n{script}"));
        let emulator = Emulator::spawn(EmulatorKind::QemuTcg, cmd, Vec::new(), &run_dir).unwrap();
        Session::with_emulator(emulator, run_dir)
    }

    fn watch(session: &mut Session, until_ev: &str, timeout_ms: u64) -> Outcome {
        let outcome = session
            .watch(
                |markers| markers.iter().any(|m| m.ev() == until_ev),
                Some(Duration::from_millis(timeout_ms)),
                &AtomicBool::new(false),
                |_, _| {},
            )
            .unwrap();
        session.stop().unwrap();
        std::fs::remove_dir_all(session.run_dir().path()).unwrap();
        outcome
    }

    #[test]
    fn stops_at_the_awaited_marker() {
        let mut s = fake(
            "until",
            "echo '[hv] hello'; echo '[hv] @@tandem {\"ev\":\"idle\"}'; sleep 30",
        );
        assert_eq!(watch(&mut s, "idle", 20_000), Outcome::Satisfied);
        assert_eq!(s.markers().len(), 1);
        assert_eq!(s.markers()[0].line, 2);
        assert_eq!(s.markers()[0].port, Port::Com2);
    }

    #[test]
    fn a_condition_that_comes_true_with_time_ends_the_wait_without_more_output() {
        let mut s = fake("grace", "echo '[hv] @@tandem {\"ev\":\"idle\"}'; sleep 30");
        let mut seen_at = None;
        let started = Instant::now();
        let outcome = s
            .watch(
                |markers| {
                    !markers.is_empty()
                        && seen_at.get_or_insert_with(Instant::now).elapsed()
                            > Duration::from_millis(200)
                },
                Some(Duration::from_secs(20)),
                &AtomicBool::new(false),
                |_, _| {},
            )
            .unwrap();
        s.stop().unwrap();
        std::fs::remove_dir_all(s.run_dir().path()).unwrap();
        assert_eq!(outcome, Outcome::Satisfied);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn stops_at_a_terminal_marker() {
        let mut s = fake(
            "fatal",
            "sleep 0.2; echo '[hv] @@tandem {\"ev\":\"fatal\",\"code\":\"no_vmx\"}'; sleep 30",
        );
        let Outcome::Terminal(marker) = watch(&mut s, "idle", 20_000) else {
            panic!("expected a terminal marker");
        };
        assert_eq!(marker.value["code"], "no_vmx");
    }

    #[test]
    fn malformed_marker_is_reported_with_its_line() {
        let mut s = fake("malformed", "echo '[hv] @@tandem {oops'; sleep 30");
        let Outcome::Malformed { text, line, .. } = watch(&mut s, "idle", 20_000) else {
            panic!("expected a malformed marker");
        };
        assert_eq!((text.as_str(), line), ("[hv] @@tandem {oops", 1));
    }

    #[test]
    fn last_unterminated_line_counts_when_the_emulator_exits() {
        let mut s = fake("exit", "printf '@@tandem {\"ev\":\"panic\",\"cpu\":1}'");
        let Outcome::Terminal(marker) = watch(&mut s, "idle", 20_000) else {
            panic!("expected the panic marker");
        };
        assert_eq!(marker.ev(), "panic");
    }

    #[test]
    fn emulator_exit_without_markers() {
        let mut s = fake("quiet", "echo '[hv] bye'; exit 3");
        assert_eq!(
            watch(&mut s, "idle", 20_000),
            Outcome::EmulatorExited("exit status: 3".into())
        );
    }

    #[test]
    fn time_limit_stops_the_wait_and_stop_ends_the_process() {
        let mut s = fake("slow", "sleep 30");
        let started = Instant::now();
        assert_eq!(
            watch(&mut s, "idle", 300),
            Outcome::TimedOut(Duration::from_millis(300))
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
