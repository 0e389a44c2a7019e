//! The console shell and PID 1's main loop: respawn the shell, reap, act on signals.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use nix::unistd::{setsid, Pid};

use crate::init;
use crate::report;

pub const SHELL: &str = "/bin/sh";
/// Lists the console devices, the one `/dev/console` writes to last.
const CONSOLE_ACTIVE: &str = "/sys/class/tty/console/active";
const CONSOLE: &str = "/dev/console";
/// A shell that dies sooner than this after starting is restarted only after
/// [`RESPAWN_DELAY`], so a broken shell cannot make PID 1 spin.
const MIN_SHELL_LIFE: Duration = Duration::from_secs(1);
const RESPAWN_DELAY: Duration = Duration::from_secs(1);

/// The tty device behind `/dev/console`, from the text of [`CONSOLE_ACTIVE`] (`tty0 ttyS0`:
/// the last one is the primary console).
///
/// The shell needs it because `/dev/console` itself works badly as a controlling terminal:
/// job control and Ctrl-C want the real device (busybox's `cttyhack` does the same).
pub fn console_device(active: &str) -> Option<PathBuf> {
    let name = active.split_whitespace().last()?;
    let plausible = name.len() <= 32 && name.bytes().all(|b| b.is_ascii_alphanumeric());
    plausible.then(|| PathBuf::from("/dev").join(name))
}

fn open_console() -> io::Result<File> {
    let open = |path: &std::path::Path| OpenOptions::new().read(true).write(true).open(path);
    fs::read_to_string(CONSOLE_ACTIVE)
        .ok()
        .and_then(|active| console_device(&active))
        .and_then(|device| open(&device).ok())
        .map_or_else(|| open(CONSOLE.as_ref()), Ok)
}

/// Starts `sh` on the console in a session of its own, with the console as its controlling
/// terminal (so job control and Ctrl-C work).
fn spawn_shell() -> io::Result<Pid> {
    let tty = open_console()?;
    let mut command = Command::new(SHELL);
    command
        .env_clear()
        .envs(init::ENVIRONMENT.iter().copied())
        .current_dir("/")
        .stdin(tty.try_clone()?)
        .stdout(tty.try_clone()?)
        .stderr(tty);
    let take_terminal = || {
        // Children inherit the blocked-signal mask across exec, and PID 1 blocks SIGINT,
        // SIGTERM and SIGCHLD (std does not reset it): without this, Ctrl-C would not reach
        // the shell's jobs.
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        setsid()?;
        // Argument 1: take the terminal even if a previous shell's session still has it.
        // SAFETY: TIOCSCTTY takes an int argument by value and touches no memory of ours;
        // fd 0 is the tty set above.
        if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 1) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: sigprocmask(2), setsid(2) and ioctl(2) are, and nothing in it
    // allocates or locks.
    unsafe {
        command.pre_exec(take_terminal);
    }
    let child = command.spawn()?;
    // PID 1 reaps with waitpid(-1); the `Child` handle is not needed (dropping it neither
    // kills nor waits).
    Ok(Pid::from_raw(child.id() as i32))
}

struct Running {
    pid: Pid,
    started: Instant,
}

/// PID 1's loop, forever: keeps a shell on the console, reaps every child, and shuts the
/// system down on SIGTERM / SIGINT. `signals` must already be blocked.
pub fn supervise(signals: &SigSet) -> ! {
    let signal_fd =
        match SignalFd::with_flags(signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                // Without it PID 1 cannot learn of exits or shutdown requests; a shell is still
                // better than nothing, and SIGCHLD stays blocked so zombies wait for a reboot.
                report::emit(&report::error("signalfd", &e.desc(), |_| {}));
                let _ = spawn_shell();
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        };
    let mut shell: Option<Running> = None;
    let mut respawn_at = Some(Instant::now());
    loop {
        if let Some(at) = respawn_at.filter(|&at| at <= Instant::now()) {
            match spawn_shell() {
                Ok(pid) => {
                    shell = Some(Running {
                        pid,
                        started: Instant::now(),
                    });
                    respawn_at = None;
                }
                Err(e) => {
                    report::emit(&report::error("shell", &e, |o| {
                        o.str("path", SHELL);
                    }));
                    respawn_at = Some(at.max(Instant::now()) + RESPAWN_DELAY);
                }
            }
        }
        let timeout = match respawn_at {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
        // EINTR and other poll failures just mean "look again".
        let _ = poll(&mut fds, timeout);
        while let Ok(Some(info)) = signal_fd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => {
                    for exited in init::reap() {
                        // The delegation server is restarted by its own supervisor.
                        if crate::delegation::server::exited(exited.pid) {
                            continue;
                        }
                        let Some(running) = shell.take_if(|s| s.pid == exited.pid) else {
                            continue;
                        };
                        eprintln!(
                            "tandem-agent: shell ended ({}); restarting it",
                            describe(exited.status)
                        );
                        let lived = running.started.elapsed();
                        respawn_at = Some(if lived < MIN_SHELL_LIFE {
                            Instant::now() + RESPAWN_DELAY
                        } else {
                            Instant::now()
                        });
                    }
                }
                Ok(signal @ (Signal::SIGTERM | Signal::SIGINT)) => init::shutdown(signal),
                _ => {}
            }
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {}", signal.as_str()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_device_is_the_last_active_console() {
        assert_eq!(console_device("ttyS0\n"), Some("/dev/ttyS0".into()));
        assert_eq!(console_device("tty0 ttyS0\n"), Some("/dev/ttyS0".into()));
        assert_eq!(console_device(""), None);
        assert_eq!(console_device("../mem"), None);
    }
}
