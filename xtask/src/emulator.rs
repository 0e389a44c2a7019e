//! The emulated machines the image boots on, and their run dirs.
//!
//! Every boot gets a run dir holding the generated emulator config, both serial consoles
//! (`com1.log`: the Linux guest; `com2.log`: the hypervisor and Lavender) and the emulator's
//! own logs. The emulator runs in its own process group so a Ctrl-C on the terminal reaches
//! only xtask (Debian's Bochs would otherwise drop into its debugger prompt), and xtask stops
//! the whole group itself.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod bochs;
pub mod patched_bochs;
pub mod qemu;

/// Which emulator runs the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmulatorKind {
    /// Bochs 2.7: emulates VMX with EPT, VPID and unrestricted guest; slow but runs anywhere.
    Bochs,
    /// QEMU with KVM: needs an Intel host with nested VMX (`kvm_intel nested=1`).
    QemuKvm,
    /// QEMU with TCG: fast, but has no VMX (tests the no-VMX error path and non-VMX code).
    QemuTcg,
}

impl EmulatorKind {
    pub fn name(self) -> &'static str {
        match self {
            EmulatorKind::Bochs => "bochs",
            EmulatorKind::QemuKvm => "qemu-kvm",
            EmulatorKind::QemuTcg => "qemu-tcg",
        }
    }

    /// `qemu-kvm` when this host can run a VMX hypervisor inside KVM, else `bochs`; with the
    /// reason, to print.
    pub fn auto() -> (EmulatorKind, String) {
        match nested_vmx_unusable() {
            None => (
                EmulatorKind::QemuKvm,
                "the host has usable nested VMX".into(),
            ),
            Some(why) => (EmulatorKind::Bochs, why),
        }
    }
}

/// `None` when QEMU+KVM can give a guest VMX, else why not.
fn nested_vmx_unusable() -> Option<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_vmx = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|flag| flag == "vmx"));
    if !has_vmx {
        return Some("the host CPU shows no `vmx` flag".into());
    }
    if let Ok(nested) = fs::read_to_string("/sys/module/kvm_intel/parameters/nested") {
        if !matches!(nested.trim(), "Y" | "1") {
            return Some("kvm_intel is loaded with nested=0".into());
        }
    }
    kvm_can_create_vm().err()
}

/// Opens /dev/kvm and creates (and drops) an empty VM: the device existing is not enough
/// (e.g. a paravirtual KVM that exposes no VMX to its guests).
fn kvm_can_create_vm() -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // From <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01), KVMIO = 0xAE.
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_API_VERSION: libc::c_int = 12;

    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    // SAFETY: both ioctls take no argument pointer; the fd is open for the whole call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!("/dev/kvm reports API version {version}"));
    }
    // SAFETY: as above; a non-negative result is a new fd that we own.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(format!(
            "/dev/kvm cannot create a VM ({})",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `vm` is a fresh fd returned by KVM_CREATE_VM and owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// The machine to emulate.
#[derive(Debug, Clone)]
pub struct Machine {
    pub emulator: EmulatorKind,
    pub cpus: u32,
    pub memory_mib: u32,
}

impl Machine {
    /// Refuses machines the emulators cannot run (checked again at launch).
    pub fn check(&self) -> Result<()> {
        // Bochs is built with at most 32 emulated CPUs; the hypervisor needs room for itself
        // and two guests' partitions.
        if !(1..=32).contains(&self.cpus) {
            bail!("--cpus {}: must be between 1 and 32", self.cpus);
        }
        if !(128..=16384).contains(&self.memory_mib) {
            bail!(
                "--memory {}: must be between 128 and 16384 MiB",
                self.memory_mib
            );
        }
        Ok(())
    }
}

/// The serial ports captured in every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Port {
    /// 0x3F8: the Linux guest's console.
    Com1,
    /// 0x2F8: the hypervisor's log (`[hv] ...`) and later Lavender's.
    Com2,
}

impl Port {
    pub const ALL: [Port; 2] = [Port::Com1, Port::Com2];

    pub fn name(self) -> &'static str {
        match self {
            Port::Com1 => "com1",
            Port::Com2 => "com2",
        }
    }
}

/// A directory holding everything one boot produced.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `path`, emptying it first if a previous run left files there.
    pub fn fresh(path: &Path) -> Result<RunDir> {
        if path.exists() {
            fs::remove_dir_all(path)
                .with_context(|| format!("removing old run dir {}", path.display()))?;
        }
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        // Absolute, because the paths are written into emulator configs.
        let path = fs::canonicalize(path)?;
        Ok(RunDir { path })
    }

    /// Creates `parent/stem`, or `parent/stem-2`, `-3`, ... when that is taken: each run gets
    /// a directory of its own, even two started in the same second.
    pub fn unique(parent: &Path, stem: &str) -> Result<RunDir> {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        for n in 1u32.. {
            let name = if n == 1 {
                stem.to_string()
            } else {
                format!("{stem}-{n}")
            };
            let path = parent.join(name);
            // create_dir (not _all) fails if the directory exists: the claim is atomic.
            match fs::create_dir(&path) {
                Ok(()) => {
                    let path = fs::canonicalize(&path)?;
                    return Ok(RunDir { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        unreachable!("u32 suffixes run out only after 4 billion runs in one second")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The capture file of a serial console.
    ///
    /// Consoles are captured to files (Bochs `mode=file`, QEMU `-serial file:`). When the
    /// user types into the Linux shell (interactive `cargo xtask run`), COM1 is a pty instead
    /// ([`Com1::Tty`]) and the relay in [`crate::shell`] copies what it reads to this same
    /// file, so readers of the capture do not change.
    pub fn console(&self, port: Port) -> PathBuf {
        self.path.join(format!("{}.log", port.name()))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// Where the emulated COM1 (the Linux console) is connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Com1 {
    /// Output appended to the run dir's `com1.log`; no input.
    #[default]
    File,
    /// A terminal device, in practice the slave side of a pty whose master xtask holds
    /// (Bochs `mode=term`, QEMU `-chardev serial`): output and input both go through it.
    Tty(PathBuf),
}

/// A running emulator. Dropping it stops the emulator.
pub struct Emulator {
    kind: EmulatorKind,
    child: Child,
    logs: Vec<PathBuf>,
    exit: Option<ExitStatus>,
}

/// Starts `machine` booting `iso`, with all its files in `run_dir`.
pub fn launch(machine: &Machine, iso: &Path, run_dir: &RunDir) -> Result<Emulator> {
    launch_with(machine, iso, run_dir, &Com1::File)
}

/// [`launch`], with COM1 connected to `com1` (COM2 is always `com2.log`).
pub fn launch_with(
    machine: &Machine,
    iso: &Path,
    run_dir: &RunDir,
    com1: &Com1,
) -> Result<Emulator> {
    let bochs = match machine.emulator {
        EmulatorKind::Bochs => Some(crate::tools::BOCHS.find()?),
        EmulatorKind::QemuKvm | EmulatorKind::QemuTcg => None,
    };
    launch_program(machine, iso, run_dir, com1, bochs.as_deref())
}

/// [`launch`] on a Bochs machine run by the Bochs program `bochs` instead of the host's
/// (the nested-KVM scenario's [`patched_bochs`]).
pub fn launch_bochs(
    bochs: &Path,
    machine: &Machine,
    iso: &Path,
    run_dir: &RunDir,
) -> Result<Emulator> {
    if machine.emulator != EmulatorKind::Bochs {
        bail!(
            "a Bochs program was given for a {:?} machine",
            machine.emulator
        );
    }
    launch_program(machine, iso, run_dir, &Com1::File, Some(bochs))
}

/// Launches `machine`; `bochs` is the Bochs program for a Bochs machine.
fn launch_program(
    machine: &Machine,
    iso: &Path,
    run_dir: &RunDir,
    com1: &Com1,
    bochs: Option<&Path>,
) -> Result<Emulator> {
    machine.check()?;
    if !iso.is_file() {
        bail!(
            "image {} does not exist (build it with `cargo xtask image`)",
            iso.display()
        );
    }
    let iso = fs::canonicalize(iso)?;
    let (cmd, logs) = match machine.emulator {
        EmulatorKind::Bochs => {
            let program = bochs.context("a Bochs machine needs a Bochs program")?;
            bochs::command(program, machine, &iso, run_dir, com1)?
        }
        EmulatorKind::QemuKvm | EmulatorKind::QemuTcg => {
            qemu::command(machine, &iso, run_dir, com1)?
        }
    };
    Emulator::spawn(machine.emulator, cmd, logs, run_dir)
}

impl Emulator {
    /// Starts `cmd` in a process group of its own, stdin closed and stdout/stderr in the
    /// run dir's `emulator.out` (added to `logs`); the command line goes to `command.txt`.
    pub(crate) fn spawn(
        kind: EmulatorKind,
        mut cmd: Command,
        mut logs: Vec<PathBuf>,
        run_dir: &RunDir,
    ) -> Result<Emulator> {
        let output = run_dir.file("emulator.out");
        let out = fs::File::create(&output)?;
        cmd.current_dir(run_dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", crate::tools::describe(&cmd)))?;
        fs::write(
            run_dir.file("command.txt"),
            crate::tools::describe(&cmd) + "\n",
        )?;
        logs.push(output);
        Ok(Emulator {
            kind,
            child,
            logs,
            exit: None,
        })
    }

    pub fn kind(&self) -> EmulatorKind {
        self.kind
    }

    /// The emulator's own log files (not the consoles), for showing on failure.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// `Some(status)` once the emulator has exited by itself.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Stops the emulator and everything it started: SIGTERM to its process group (so it can
    /// flush its logs), then SIGKILL if it is still there after a grace period.
    pub fn stop(&mut self) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: kill() has no memory-safety preconditions; the group is our child's.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        self.exit = Some(self.child.wait()?);
        Ok(())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // Never leave an emulator running behind a failed test or an error.
        let _ = self.stop();
    }
}

/// The last `n` lines of a file (lossy UTF-8), or why it could not be read.
pub fn tail(path: &Path, n: usize) -> String {
    let mut bytes = Vec::new();
    match fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        // Emulators create a console's file only when the guest first writes to the port.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "(nothing written)".into(),
        Err(e) => format!("(cannot read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_limits_are_checked() {
        let machine = |cpus, memory_mib| Machine {
            emulator: EmulatorKind::Bochs,
            cpus,
            memory_mib,
        };
        assert!(machine(4, 1024).check().is_ok());
        assert!(machine(0, 1024)
            .check()
            .unwrap_err()
            .to_string()
            .contains("--cpus 0"));
        assert!(machine(4, 16)
            .check()
            .unwrap_err()
            .to_string()
            .contains("--memory 16"));
    }

    #[test]
    fn tail_keeps_last_lines() {
        let file = std::env::temp_dir().join(format!("tandem-tail-{}", std::process::id()));
        fs::write(&file, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&file, 2), "c\nd");
        assert_eq!(tail(&file, 10), "a\nb\nc\nd");
        fs::remove_file(&file).unwrap();
        assert_eq!(tail(&file, 2), "(nothing written)");
    }

    #[test]
    fn run_dir_is_emptied() {
        let path = std::env::temp_dir().join(format!("tandem-rundir-{}", std::process::id()));
        fs::create_dir_all(&path).unwrap();
        fs::write(path.join("old.log"), "stale").unwrap();
        let dir = RunDir::fresh(&path).unwrap();
        assert!(!dir.file("old.log").exists());
        assert!(dir.console(Port::Com2).ends_with("com2.log"));
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn unique_run_dirs_never_collide() {
        let parent = std::env::temp_dir().join(format!("tandem-runs-{}", std::process::id()));
        let stem = "run-bochs-20261201T233533Z";
        let first = RunDir::unique(&parent, stem).unwrap();
        let second = RunDir::unique(&parent, stem).unwrap();
        let third = RunDir::unique(&parent, stem).unwrap();
        assert!(first.path().ends_with(stem));
        assert!(second.path().ends_with(format!("{stem}-2")));
        assert!(third.path().ends_with(format!("{stem}-3")));
        fs::remove_dir_all(&parent).unwrap();
    }
}
