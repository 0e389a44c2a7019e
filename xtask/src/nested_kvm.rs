//! The QEMU+KVM path without VMX hardware: Tandem under nested KVM inside Bochs.
//!
//! Bochs emulates VMX with EPT, so a stock Linux booted in it can load `kvm_intel nested=1`
//! and run QEMU with `-enable-kvm -cpu host`, which gives its guest VMX again: Tandem boots
//! there exactly as on an Intel host with nested VMX, under the real KVM code.
//!
//! The Bochs image (the "L1" machine) is a GRUB ISO booting Debian's generic kernel (pinned
//! like the guest kernel, see [`crate::kernel`]) with an initramfs holding busybox, the
//! kernel's `irqbypass`, `kvm` and `kvm-intel` modules, this host's Debian QEMU with every
//! library `ldd` names and the firmware it loads, and the Tandem ISO. Its `/init` loads the
//! modules and starts QEMU with the Tandem ISO on a virtio-scsi CD-ROM (an IDE CD-ROM is far
//! slower under KVM) and QEMU's COM1 and COM2 on the L1 machine's own: Tandem's consoles
//! reach Bochs's capture files unchanged and are judged by the same markers as every
//! other scenario. `/init` prints markers of its own on COM2: `nested_l1_up` (the kernel
//! ran `/init`), `nested_kvm_loaded` (with kvm_intel's parameters) and `nested_qemu_start`;
//! `nested_error` when a step fails.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::emulator::{EmulatorKind, Machine, RunDir};
use crate::initramfs::{self, Entry};
use crate::marker::Marker;
use crate::session::{Outcome, Session};
use crate::{kernel, tools};

/// The scenario's name: its run dir is `target/tandem/runs/nested_kvm/`.
pub const SCENARIO: &str = "nested_kvm";

/// How long the scenario waits for Tandem's markers. A boot took 13 minutes of wall time
/// on 2 shared cores (`agent_ready` 781 s after Bochs started).
pub const TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Debian's generic kernel (the cloud kernel has no KVM), the same upstream release as the
/// guest kernel.
pub const PACKAGE: &str = "linux-image-6.1.0-50-amd64";
pub const VERSION: &str = "6.1.176-1";
/// SHA-256 of `linux-image-6.1.0-50-amd64_6.1.176-1_amd64.deb` (as listed in the bookworm
/// `Packages` index).
pub const DEB_SHA256: &str = "7b5597492a0a65aee61985a492e6bcc3f2cde830072a0e3b3d8c7e1b90279bd3";

/// The modules `/init` loads, in dependency order, under `lib/modules/<release>/`.
const MODULES: [&str; 3] = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-intel.ko",
];

/// The firmware QEMU loads for a PC without display or NIC (`-nodefaults`): SeaBIOS and
/// the TPR-patching option ROM KVM guests get.
const FIRMWARE: [&str; 2] = [
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/kvmvapic.bin",
];

/// Busybox applets `/init` uses.
const APPLETS: [&str; 6] = ["sh", "mount", "insmod", "cat", "echo", "poweroff"];

/// The L1 machine Bochs emulates: 2 CPUs (Bochs runs its CPUs in turn, so more only slow
/// each down) and memory for the initramfs, QEMU and Tandem's 1 GiB: 2048 MiB, the most
/// Bochs 2.7 gives a guest.
pub const L1_CPUS: u32 = 2;
pub const L1_MEMORY_MIB: u32 = 2048;

/// What Tandem gets from QEMU inside: the machine every other scenario boots.
pub const L2_CPUS: u32 = 4;
pub const L2_MEMORY_MIB: u32 = 1024;

/// The L1 kernel's command line: its own console on COM1 until QEMU takes it over, quiet.
pub const L1_CMDLINE: &str = "console=ttyS0 loglevel=3 mitigations=off";

fn cache_dir() -> PathBuf {
    crate::tandem_dir().join("cache")
}

/// The generic kernel and its KVM modules, extracted once from the pinned package.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    pub vmlinuz: PathBuf,
    /// In load order (see [`MODULES`]).
    pub modules: Vec<PathBuf>,
}

/// Downloads (once, checksum-pinned) and extracts the L1 kernel and modules.
pub fn l1_kernel() -> Result<L1Kernel> {
    let dir = cache_dir().join(format!("{PACKAGE}_{VERSION}"));
    let release = PACKAGE.trim_start_matches("linux-image-");
    let modules: Vec<PathBuf> = MODULES
        .iter()
        .map(|m| dir.join("lib/modules").join(release).join(m))
        .collect();
    let kernel = L1Kernel {
        vmlinuz: dir.join(format!("boot/vmlinuz-{release}")),
        modules,
    };
    if kernel.vmlinuz.is_file() && kernel.modules.iter().all(|m| m.is_file()) {
        // Only ever renamed into place from a package whose checksum matched.
        return Ok(kernel);
    }
    let deb = kernel::pinned_deb(PACKAGE, VERSION, DEB_SHA256)?;
    println!(
        "==> extracting the L1 kernel and its KVM modules from {}",
        deb.display()
    );
    let staging = cache_dir().join(format!("{PACKAGE}.tmp"));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    let mut members = vec![format!("./boot/vmlinuz-{release}")];
    members.extend(
        MODULES
            .iter()
            .map(|m| format!("./lib/modules/{release}/{m}")),
    );
    kernel::extract(&deb, &staging, &members)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&staging, &dir)?;
    Ok(kernel)
}

/// The `/init` of the L1 machine. QEMU's first two serial ports are the L1 machine's COM1
/// and COM2, so Tandem's consoles land in the run dir's `com1.log` and `com2.log`.
pub fn init_script() -> String {
    let insmods: String = MODULES
        .iter()
        .map(|m| {
            let name = Path::new(m).file_name().unwrap().to_string_lossy();
            let args = if name == "kvm-intel.ko" {
                " nested=1"
            } else {
                ""
            };
            format!("insmod /modules/{name}{args} || fail 'insmod {name}'\n")
        })
        .collect();
    format!(
        r#"#!/bin/sh
# The nested-KVM L1 machine (generated by xtask/src/nested_kvm.rs).
marker() {{ echo "[l1] @@tandem $1" > /dev/ttyS1; }}
fail() {{ marker "{{\"ev\":\"nested_error\",\"step\":\"$1\"}}"; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
marker '{{"ev":"nested_l1_up"}}'
{insmods}p=/sys/module/kvm_intel/parameters
marker "{{\"ev\":\"nested_kvm_loaded\",\"nested\":\"$(cat $p/nested)\",\"ept\":\"$(cat $p/ept)\",\"unrestricted_guest\":\"$(cat $p/unrestricted_guest)\",\"vpid\":\"$(cat $p/vpid)\"}}"
marker '{{"ev":"nested_qemu_start"}}'
/usr/bin/qemu-system-x86_64 {qemu} || fail qemu
poweroff -f
"#,
        qemu = qemu_args().join(" ")
    )
}

/// QEMU inside the L1 machine: KVM with the L1 CPU's VMX, the Tandem ISO on virtio-scsi.
pub fn qemu_args() -> Vec<String> {
    [
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        &L2_CPUS.to_string(),
        "-m",
        &L2_MEMORY_MIB.to_string(),
        "-L",
        "/firmware",
        "-nodefaults",
        "-vga",
        "none",
        "-display",
        "none",
        "-device",
        "virtio-scsi-pci,id=scsi",
        "-drive",
        "file=/tandem.iso,if=none,id=cd,media=cdrom,readonly=on",
        "-device",
        "scsi-cd,drive=cd,bus=scsi.0",
        "-boot",
        "d",
        "-serial",
        "/dev/ttyS0",
        "-serial",
        "/dev/ttyS1",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec()
}

/// The shared libraries `ldd` says `program` loads (the dynamic loader included).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = tools::output(Command::new("ldd").arg(program))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output: `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x..)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` is in the kernel.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Adds the file `at` (a path in the archive) after those of its parent directories not
/// added yet: the kernel's unpacker does not create missing parents.
fn add_file(entries: &mut Vec<Entry>, dirs: &mut BTreeSet<String>, at: &str, data: Vec<u8>) {
    let parents: Vec<String> = Path::new(at)
        .ancestors()
        .skip(1)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.to_string_lossy().into_owned())
        .collect();
    for dir in parents.into_iter().rev() {
        if dirs.insert(dir.clone()) {
            entries.push(Entry::dir(&dir, 0o755));
        }
    }
    entries.push(Entry::file(at, 0o755, data));
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes the L1 initramfs (see the module doc) to `out`.
pub fn write_initramfs(kernel: &L1Kernel, tandem_iso: &Path, out: &Path) -> Result<()> {
    let qemu = tools::QEMU.find()?;
    let busybox = initramfs::BUSYBOX.find()?;
    let mut entries = Vec::new();
    let mut dirs = BTreeSet::new();
    for dir in ["dev", "proc", "sys"] {
        dirs.insert(dir.to_string());
        entries.push(Entry::dir(dir, 0o755));
    }
    entries.push(Entry::CharDevice {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    add_file(&mut entries, &mut dirs, "init", init_script().into_bytes());
    add_file(&mut entries, &mut dirs, "bin/busybox", read(busybox)?);
    entries.extend(APPLETS.iter().map(|applet| Entry::Symlink {
        path: format!("bin/{applet}"),
        target: "busybox".into(),
    }));
    for module in &kernel.modules {
        let name = module.file_name().unwrap().to_string_lossy();
        add_file(
            &mut entries,
            &mut dirs,
            &format!("modules/{name}"),
            read(module)?,
        );
    }
    for firmware in FIRMWARE {
        let path = Path::new(firmware);
        let name = path.file_name().unwrap().to_string_lossy();
        let data = read(path)
            .context("QEMU's firmware is missing: sudo apt-get install seabios qemu-system-data")?;
        add_file(&mut entries, &mut dirs, &format!("firmware/{name}"), data);
    }
    let rel = |p: &Path| p.to_string_lossy().trim_start_matches('/').to_string();
    add_file(&mut entries, &mut dirs, &rel(&qemu), read(&qemu)?);
    for lib in shared_libraries(&qemu)? {
        add_file(&mut entries, &mut dirs, &rel(&lib), read(&lib)?);
    }
    add_file(&mut entries, &mut dirs, "tandem.iso", read(tandem_iso)?);

    let partial = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(fs::File::create(&partial)?);
    initramfs::write_newc(&entries, &mut file)?;
    std::io::Write::flush(&mut file)?;
    drop(file);
    fs::rename(&partial, out)?;
    Ok(())
}

/// The milestones, in the order they come: each is the first marker with that `ev`.
const MILESTONES: [&str; 5] = [
    "nested_l1_up",
    "nested_qemu_start",
    "hv_start",
    "lavender_hello",
    "agent_ready",
];

/// What the scenario asks of Tandem under nested KVM: every core turns VMX on (4 distinct
/// `core_vmx_on`), Lavender says hello and the Linux agent is ready.
pub fn tandem_is_up(markers: &[Marker]) -> bool {
    let seen = |ev: &str| markers.iter().any(|m| m.ev() == ev);
    let cores: BTreeSet<String> = markers
        .iter()
        .filter(|m| m.ev() == "core_vmx_on")
        .map(|m| m.value["apic_id"].to_string())
        .collect();
    cores.len() == L2_CPUS as usize && seen("lavender_hello") && seen("agent_ready")
}

/// The scenario's verdict and where its logs are.
#[derive(Debug)]
pub struct Verdict {
    pub passed: bool,
    pub why: String,
    pub wall: Duration,
    pub run_dir: PathBuf,
}

/// Builds the L1 image around `tandem_iso`, boots it under Bochs and waits for
/// [`tandem_is_up`], printing each milestone's wall time since Bochs started. Writes
/// `result.json` (outcome, milestones) into the run dir, which is always kept.
pub fn run(tandem_iso: &Path) -> Result<Verdict> {
    let run_dir = RunDir::fresh(&crate::runs_dir().join(SCENARIO))?;
    let kernel = l1_kernel()?;
    let initrd = run_dir.file("l1-initramfs.cpio");
    println!("==> writing the L1 initramfs {}", initrd.display());
    write_initramfs(&kernel, tandem_iso, &initrd)?;
    let iso = run_dir.file("l1.iso");
    crate::image::build_linux_iso(&kernel.vmlinuz, &initrd, L1_CMDLINE, &iso)?;
    fs::remove_file(&initrd)?;
    let machine = Machine {
        emulator: EmulatorKind::Bochs,
        cpus: L1_CPUS,
        memory_mib: L1_MEMORY_MIB,
    };
    println!(
        "==> booting {} under Bochs ({L1_CPUS} CPUs, {L1_MEMORY_MIB} MiB); QEMU+KVM inside \
         boots Tandem ({L2_CPUS} CPUs, {L2_MEMORY_MIB} MiB). Logs: {}",
        iso.display(),
        run_dir.path().display()
    );
    let started = Instant::now();
    let mut session = Session::start(&machine, &iso, run_dir.clone())?;
    let mut reached: Vec<(&str, f64)> = Vec::new();
    let outcome = session.watch(
        |markers| {
            for ev in MILESTONES {
                if !reached.iter().any(|(r, _)| *r == ev) && markers.iter().any(|m| m.ev() == ev) {
                    let at = started.elapsed().as_secs_f64();
                    println!("    {at:7.1}s  {ev}");
                    reached.push((ev, at));
                }
            }
            tandem_is_up(markers)
        },
        Some(TIMEOUT),
        &AtomicBool::new(false),
        |_, _| {},
    );
    let wall = started.elapsed();
    session.stop()?;
    let outcome = outcome?;
    let errors: Vec<String> = session
        .markers()
        .iter()
        .filter(|m| ["nested_error", "fatal", "panic", "agent_error"].contains(&m.ev()))
        .map(|m| m.value.to_string())
        .collect();
    let passed = outcome == Outcome::Satisfied && errors.is_empty();
    let why = if errors.is_empty() {
        outcome.to_string()
    } else {
        format!("{outcome}; {}", errors.join(", "))
    };
    let result = json!({
        "scenario": SCENARIO,
        "outcome": if passed { "passed" } else { "failed" },
        "end": why,
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "milestones_seconds": reached
            .iter()
            .map(|(ev, at)| (ev.to_string(), json!((at * 10.0).round() / 10.0)))
            .collect::<serde_json::Map<_, _>>(),
        "l1": { "kernel": format!("{PACKAGE}={VERSION}"), "cpus": L1_CPUS, "memory_mib": L1_MEMORY_MIB },
        "l2": { "qemu": qemu_args(), "cpus": L2_CPUS, "memory_mib": L2_MEMORY_MIB },
    });
    fs::write(
        run_dir.file(crate::test::RESULT_FILE),
        serde_json::to_string_pretty(&result)?,
    )?;
    Ok(Verdict {
        passed,
        why,
        wall,
        run_dir: run_dir.path().to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_paths_are_found() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn init_loads_kvm_intel_nested_and_starts_qemu_on_virtio_scsi() {
        let init = init_script();
        let irqbypass = init.find("insmod /modules/irqbypass.ko").expect(&init);
        let kvm = init.find("insmod /modules/kvm.ko").expect(&init);
        let intel = init
            .find("insmod /modules/kvm-intel.ko nested=1")
            .expect(&init);
        assert!(irqbypass < kvm && kvm < intel, "{init}");
        assert!(
            init.contains("-device scsi-cd,drive=cd,bus=scsi.0"),
            "{init}"
        );
        assert!(
            init.contains("-serial /dev/ttyS0 -serial /dev/ttyS1"),
            "{init}"
        );
    }

    #[test]
    fn tandem_is_up_only_with_every_core_hello_and_agent() {
        let marker = |json: &str| Marker {
            port: crate::emulator::Port::Com2,
            line: 1,
            value: serde_json::from_str(json).unwrap(),
        };
        let mut markers: Vec<Marker> = (0..4)
            .map(|id| marker(&format!(r#"{{"ev":"core_vmx_on","apic_id":{id}}}"#)))
            .collect();
        markers.push(marker(r#"{"ev":"lavender_hello"}"#));
        assert!(!tandem_is_up(&markers), "no agent_ready yet");
        markers.push(marker(r#"{"ev":"agent_ready"}"#));
        assert!(tandem_is_up(&markers));
        markers[3] = marker(r#"{"ev":"core_vmx_on","apic_id":0}"#);
        assert!(
            !tandem_is_up(&markers),
            "the same core twice is not four cores"
        );
    }

    #[test]
    fn parents_come_before_their_files_once() {
        let (mut entries, mut dirs) = (Vec::new(), BTreeSet::new());
        add_file(&mut entries, &mut dirs, "usr/lib/a", vec![]);
        add_file(&mut entries, &mut dirs, "usr/lib/b", vec![]);
        let paths: Vec<&str> = entries.iter().map(|e| e.path()).collect();
        assert_eq!(paths, ["usr", "usr/lib", "usr/lib/a", "usr/lib/b"]);
    }
}
