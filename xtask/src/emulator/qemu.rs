//! QEMU command lines (TCG or KVM).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use super::{Com1, EmulatorKind, Machine, Port, RunDir};
use crate::tools;

/// The QEMU invocation for `machine`, and the log files it writes.
pub fn command(
    machine: &Machine,
    iso: &Path,
    run_dir: &RunDir,
    com1: &Com1,
) -> Result<(Command, Vec<PathBuf>)> {
    let mut cmd = tools::QEMU.command()?;
    let log = run_dir.file("qemu.log");
    cmd.args(args(machine, iso, run_dir, com1, &log));
    Ok((cmd, vec![log]))
}

fn args(machine: &Machine, iso: &Path, run_dir: &RunDir, com1: &Com1, log: &Path) -> Vec<String> {
    let (accel, cpu) = match machine.emulator {
        // `host` passes the host's VMX (with nested=1) through to the hypervisor.
        EmulatorKind::QemuKvm => ("kvm", "host"),
        // TCG has no VMX at all; an Intel vendor string makes the hypervisor reach its VMX
        // check (and report `no_vmx`) rather than stop at "not an Intel CPU".
        _ => ("tcg", "max,vendor=GenuineIntel"),
    };
    let mut args: Vec<String> = [
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        &machine.cpus.to_string(),
        "-m",
        &machine.memory_mib.to_string(),
        "-boot",
        "d",
        "-display",
        "none",
        "-monitor",
        "none",
        "-nic",
        "none",
        // A triple fault ends the run instead of rebooting into the same crash forever.
        "-no-reboot",
        "-d",
        "guest_errors",
        "-D",
        &log.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(cdrom(machine.emulator, iso));
    // The first -serial is COM1 (0x3F8), the second COM2 (0x2F8). A terminal for COM1 is
    // a `serial` (tty) chardev: QEMU opens the device and makes the line raw.
    if let Com1::Tty(tty) = com1 {
        args.push("-chardev".into());
        args.push(format!("serial,id=com1,path={}", tty.display()));
    }
    for port in Port::ALL {
        args.push("-serial".into());
        args.push(match (port, com1) {
            (Port::Com1, Com1::Tty(_)) => "chardev:com1".into(),
            _ => format!("file:{}", run_dir.console(port).display()),
        });
    }
    args
}

/// The ISO as the boot CD-ROM. Under KVM it sits on virtio-scsi: SeaBIOS (and GRUB through
/// it) reads an IDE CD-ROM by programmed I/O, each access a VM exit to QEMU, while a
/// virtio-scsi request moves its data by DMA with one notification; nested under another
/// hypervisor every exit costs far more (see docs/nested-kvm.md). TCG emulates both in
/// the same loop, so it keeps the plain IDE `-cdrom`.
pub fn cdrom(emulator: EmulatorKind, iso: &Path) -> Vec<String> {
    let file = iso.display();
    match emulator {
        EmulatorKind::QemuKvm => vec![
            "-device".into(),
            "virtio-scsi-pci,id=scsi".into(),
            "-drive".into(),
            format!("file={file},if=none,id=cd,media=cdrom,readonly=on"),
            "-device".into(),
            "scsi-cd,drive=cd,bus=scsi.0".into(),
        ],
        _ => vec!["-cdrom".into(), file.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_machine_has_both_serial_files_in_order() {
        let run_dir = RunDir {
            path: PathBuf::from("/runs/x"),
        };
        let machine = Machine {
            emulator: EmulatorKind::QemuTcg,
            cpus: 2,
            memory_mib: 512,
        };
        let args = args(
            &machine,
            Path::new("/t.iso"),
            &run_dir,
            &Com1::File,
            Path::new("/runs/x/q.log"),
        );
        let line = args.join(" ");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(line.contains("-smp 2 -m 512"), "{line}");
        assert!(line.contains("-cdrom /t.iso"), "{line}");
        assert!(line.contains("-no-reboot"), "{line}");
        assert!(
            line.ends_with("-serial file:/runs/x/com1.log -serial file:/runs/x/com2.log"),
            "{line}"
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let run_dir = RunDir {
            path: PathBuf::from("/r"),
        };
        let machine = Machine {
            emulator: EmulatorKind::QemuKvm,
            cpus: 4,
            memory_mib: 1024,
        };
        let line = args(
            &machine,
            Path::new("/t.iso"),
            &run_dir,
            &Com1::File,
            Path::new("/q"),
        )
        .join(" ");
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(
            line.contains(
                "-device virtio-scsi-pci,id=scsi \
                 -drive file=/t.iso,if=none,id=cd,media=cdrom,readonly=on \
                 -device scsi-cd,drive=cd,bus=scsi.0"
            ),
            "{line}"
        );
        assert!(!line.contains("-cdrom"), "{line}");
    }

    #[test]
    fn com1_can_be_a_terminal() {
        let run_dir = RunDir {
            path: PathBuf::from("/r"),
        };
        let machine = Machine {
            emulator: EmulatorKind::QemuTcg,
            cpus: 4,
            memory_mib: 1024,
        };
        let tty = Com1::Tty("/dev/pts/3".into());
        let line = args(
            &machine,
            Path::new("/t.iso"),
            &run_dir,
            &tty,
            Path::new("/q"),
        )
        .join(" ");
        assert!(
            line.ends_with(
                "-chardev serial,id=com1,path=/dev/pts/3 -serial chardev:com1 -serial file:/r/com2.log"
            ),
            "{line}"
        );
    }
}
