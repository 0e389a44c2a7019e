//! PID-1 duties: the file systems, the console, signals, reaping and shutting down.
//!
//! Signals are never handled asynchronously: [`block_signals`] blocks the ones PID 1 acts on
//! before anything else runs (so every thread started later inherits the mask), and the main
//! loop reads them from a `signalfd` (see `crate::shell`).

use std::fs;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sync, Pid};

use crate::report;

/// The environment every program the agent starts gets (PID 1 itself gets almost none from
/// the kernel).
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("PATH", "/sbin:/bin:/usr/sbin:/usr/bin"),
    ("HOME", "/"),
    ("SHELL", "/bin/sh"),
    // A serial console understands the VT100 subset busybox's line editor uses.
    ("TERM", "vt100"),
];

/// How long processes get to exit after SIGTERM at shutdown before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Where the kernel's console log level is set (its first field).
const PRINTK: &str = "/proc/sys/kernel/printk";
/// The console log level from PID 1 on: the kernel itself writes warnings and worse
/// (levels 0 to 4) to the console, and keeps the rest in its log (`dmesg`; `dmesg -n 8` shows
/// everything on the console again). Linux writes a console message synchronously: the CPU
/// that logs it sends every byte down the serial line (87 µs a byte at 115200 baud) before
/// it goes on. A CPU hotplug logs three or four informational lines (`smpboot: Booting Node
/// 0 Processor 1 APIC 0x3`, `CPU 1 is now offline`), which made a core move between the guests
/// wait 10 to 40 ms of Linux's time under Bochs for the line, and would on hardware too.
const CONSOLE_LOGLEVEL: &str = "5";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: "",
    },
    // /dev/mem and the tty devices come from devtmpfs; the initramfs ships only /dev/console,
    // which the kernel needs before any file system is mounted.
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
];

/// Blocks the signals PID 1 acts on, so they queue for the signalfd instead of being lost
/// (PID 1 ignores signals it has no handler for). Call first, before any thread exists.
pub fn block_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set.thread_block()?;
    Ok(set)
}

/// Mounts the pseudo file systems and sets the process state everything else expects. A
/// failure is reported and skipped: a shell without /tmp beats no shell.
pub fn prepare_system() {
    umask(Mode::from_bits_truncate(0o022));
    if let Err(e) = std::env::set_current_dir("/") {
        report::emit(&report::error("chdir", &e, |o| {
            o.str("path", "/");
        }));
    }
    for m in MOUNTS {
        if let Err(e) = mount_one(m) {
            report::emit(&report::error("mount", &e, |o| {
                o.str("target", m.target).str("fstype", m.fstype);
            }));
        }
    }
    if let Err(e) = fs::write(PRINTK, CONSOLE_LOGLEVEL) {
        report::emit(&report::error("console_loglevel", &e, |o| {
            o.str("path", PRINTK);
        }));
    }
    // Ctrl-Alt-Del then sends SIGINT to PID 1 (a clean reboot) instead of resetting at once.
    if let Err(e) = set_cad_enabled(false) {
        report::emit(&report::error("ctrl_alt_del", &e.desc(), |_| {}));
    }
}

fn mount_one(m: &Mount) -> io::Result<()> {
    fs::create_dir_all(m.target)?;
    let data = (!m.data.is_empty()).then_some(m.data);
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
        // Already mounted (e.g. the kernel's CONFIG_DEVTMPFS_MOUNT): nothing to do.
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What became of one child [`reap`] collected.
pub struct Exited {
    pub pid: Pid,
    pub status: WaitStatus,
}

/// Collects every child that has ended (PID 1 inherits all orphans, so this includes
/// processes the agent never started). Never blocks.
pub fn reap() -> Vec<Exited> {
    let mut exited = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    exited.push(Exited { pid, status });
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                report::emit(&report::error("waitpid", &e.desc(), |_| {}));
                break;
            }
        }
    }
    exited
}

/// The orderly end of the system: SIGTERM to every process, SIGKILL to what is left after
/// [`SHUTDOWN_GRACE`], sync, then power off (SIGTERM) or reboot (SIGINT). PID 1 must never
/// exit (the kernel panics), so if the final call fails the agent stays, idle.
pub fn shutdown(signal: Signal) -> ! {
    let (mode, action) = match signal {
        Signal::SIGINT => (RebootMode::RB_AUTOBOOT, "reboot"),
        _ => (RebootMode::RB_POWER_OFF, "poweroff"),
    };
    report::emit(&report::shutdown(signal.as_str(), action));
    // Pid -1: every process except PID 1 itself (kill(2)).
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        reap();
        if kill(everyone, None) == Err(Errno::ESRCH) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(everyone, Signal::SIGKILL);
    reap();
    sync();
    let Err(e) = reboot(mode);
    report::emit(&report::error("shutdown", &e.desc(), |o| {
        o.str("action", action);
    }));
    loop {
        thread::sleep(Duration::from_secs(3600));
        reap();
    }
}
