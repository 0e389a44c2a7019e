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
use crate::image::{GuestImages, ImageSpec};
use crate::initramfs::{self, Entry};
use crate::marker::Marker;
use crate::session::{Outcome, Session};
use crate::{kernel, tools};

/// The scenario's name: its run dir is `target/tandem/runs/nested_kvm/`.
pub const SCENARIO: &str = "nested_kvm";

/// How long the scenario waits for the agent's self-test. Runs reached `agent_ready` in 5 to
/// 6 minutes of wall time on 2 cores with a load average of 2 to 5; with the moves and the
/// self-test's other checks (each wait stretched 12 times) a working run would need some 10
/// to 15 more. An L1 CPU stuck in KVM for 100 s ends the run sooner (`nested_error`).
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
const APPLETS: [&str; 10] = [
    "sh", "mount", "insmod", "cat", "echo", "poweroff", "dmesg", "grep", "sleep", "taskset",
];

/// The L1 machine Bochs emulates: one CPU for each of QEMU's vCPU threads, which `/init`
/// pins one to a CPU, and memory for the initramfs, QEMU and Tandem's 1 GiB: 2048 MiB.
/// The layout comes from runs on an unfixed Bochs (docs/nested-kvm.md), which made no VM
/// exit for the L1 machine's own interrupts while a KVM guest ran with RFLAGS.IF clear:
/// sharing a CPU, a spinning vCPU's partner never ran; moving between CPUs, KVM waited for
/// the old CPU to VMCLEAR the vCPU's VMCS. With the fix ([`crate::emulator::patched_bochs`])
/// that no longer happens; one CPU per vCPU, pinned, is also what an Intel host running
/// Tandem for real would give it.
pub const L1_CPUS: u32 = 4;
pub const L1_MEMORY_MIB: u32 = 2048;

/// What Tandem gets from QEMU inside: the machine every other scenario boots.
pub const L2_CPUS: u32 = 4;
pub const L2_MEMORY_MIB: u32 = 1024;

const _: () = assert!(L1_CPUS == L2_CPUS, "one L1 CPU per vCPU thread");

/// The L1 kernel's command line: its own console on COM1 until QEMU takes it over, quiet.
/// `tsc_early_khz` gives it the TSC rate Bochs really has: Bochs's TSC counts instructions
/// (`ips`, so 50 MHz against its PIT and HPET), while its CPUID leaf 16H claims 3500 MHz
/// and leaf 15H names no crystal. Without it the kernel takes the TSC for 3500 MHz, and its
/// clock, and every timer KVM runs for its guest, go 70 times slower than Bochs's time.
/// `idle=halt`: an idle L1 CPU waits in HLT rather than MWAIT. With MWAIT (intel_idle) the
/// 4-CPU L1 kernel took 170 to 445 s of its own time to reach `/init`, against 30 s with
/// HLT, and a vCPU woken on an idle CPU came too late for the hypervisor's 100 ms wait for
/// an AP to answer INIT-SIPI-SIPI.
pub fn l1_cmdline() -> String {
    format!(
        "console=ttyS0 loglevel=3 mitigations=off idle=halt tsc_early_khz={}",
        crate::emulator::bochs::IPS / 1000
    )
}

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
            // APIC virtualization off: Bochs 3.0 offers posted interrupts, so KVM would
            // turn it on, and Bochs's emulation of them fails VM entries that real VMX
            // takes (docs/nested-kvm.md); under Bochs 2.7, KVM ran without it too.
            let args = if name == "kvm-intel.ko" {
                " nested=1 enable_apicv=0"
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
# The L1 kernel's own clock (seconds since it booted), to set beside the wall time.
l1_uptime() {{ read -r up _ < /proc/uptime; echo "$up"; }}
marker "{{\"ev\":\"nested_l1_up\",\"l1_uptime\":\"$(l1_uptime)\"}}"
{insmods}p=/sys/module/kvm_intel/parameters
marker "{{\"ev\":\"nested_kvm_loaded\",\"nested\":\"$(cat $p/nested)\",\"ept\":\"$(cat $p/ept)\",\"unrestricted_guest\":\"$(cat $p/unrestricted_guest)\",\"vpid\":\"$(cat $p/vpid)\",\"preemption_timer\":\"$(cat $p/preemption_timer)\",\"enable_apicv\":\"$(cat $p/enable_apicv)\",\"enable_shadow_vmcs\":\"$(cat $p/enable_shadow_vmcs)\",\"clocksource\":\"$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"}}"
# What the L1 kernel made of its TSC, its clock and VMX, for the log (docs/nested-kvm.md).
dmesg | grep -iE 'tsc|clocksource|kvm|vmx|xsave|xstate|fpu' | while read -r line; do echo "[l1] $line"; done > /dev/ttyS1
marker "{{\"ev\":\"nested_qemu_start\",\"l1_uptime\":\"$(l1_uptime)\"}}"
/usr/bin/qemu-system-x86_64 {qemu} &
qemu=$!
# Each vCPU thread ("CPU n/KVM") on L1 CPU n, for good (see L1_CPUS in nested_kvm.rs).
pinned=0
tries=0
while [ $pinned -lt {vcpus} ] && [ $tries -lt 60 ]; do
  sleep 1
  tries=$((tries+1))
  pinned=0
  for t in /proc/$qemu/task/*; do
    read -r name < $t/comm
    case "$name" in
      "CPU "*/KVM) n=${{name#CPU }}; n=${{n%/KVM}}; taskset -p -c $n ${{t##*/}} > /dev/null && pinned=$((pinned+1));;
    esac
  done
done
[ $pinned -eq {vcpus} ] || fail "pinning vCPU threads ($pinned of {vcpus})"
marker "{{\"ev\":\"nested_vcpus_pinned\",\"vcpus\":$pinned,\"l1_uptime\":\"$(l1_uptime)\"}}"
# An L1 CPU stuck in KVM for 100 s or more (docs/nested-kvm.md) ends the run at once rather
# than at its timeout; shorter stalls end by themselves.
while sleep 30; do
  stuck=$(dmesg | grep -m 1 -E 'soft lockup - .* stuck for [0-9]{{3,}}s')
  [ -n "$stuck" ] && marker "{{\"ev\":\"nested_error\",\"step\":\"L1 ${{stuck#*watchdog: }}\"}}" && break
done &
wait $qemu || fail qemu
poweroff -f
"#,
        qemu = qemu_args().join(" "),
        vcpus = L2_CPUS,
    )
}

/// QEMU inside the L1 machine: KVM with the L1 CPU's VMX, the Tandem ISO on virtio-scsi
/// (as `cargo xtask run --emulator qemu-kvm` has it).
pub fn qemu_args() -> Vec<String> {
    let mut args: Vec<String> = [
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
        // Names the vCPU threads "CPU n/KVM", for /init to pin them.
        "-name",
        "tandem,debug-threads=on",
        "-vga",
        "none",
        "-display",
        "none",
    ]
    .map(String::from)
    .to_vec();
    args.extend(crate::emulator::qemu::cdrom(
        EmulatorKind::QemuKvm,
        Path::new("/tandem.iso"),
    ));
    args.extend(
        [
            "-boot",
            "d",
            "-serial",
            "/dev/ttyS0",
            "-serial",
            "/dev/ttyS1",
            "-no-reboot",
        ]
        .map(String::from),
    );
    args
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

/// The milestones whose wall time the scenario records, in the order they come. Bochs's
/// start is 0 s.
pub const MILESTONES: [&str; 8] = [
    "l1_init",
    "qemu_start",
    "tandem_first_line",
    "lavender_hello",
    "agent_ready",
    "core_to_lavender",
    "core_back_to_linux",
    "vmctl_done",
];

/// The milestone `marker` reaches, if any (the first such marker counts).
fn milestone(marker: &Marker) -> Option<&'static str> {
    Some(match (marker.ev(), marker.value["to"].as_str()) {
        ("nested_l1_up", _) => "l1_init",
        ("nested_qemu_start", _) => "qemu_start",
        // The hypervisor's first line: printed before it reads anything of the machine.
        ("hv_start", _) => "tandem_first_line",
        ("lavender_hello", _) => "lavender_hello",
        ("agent_ready", _) => "agent_ready",
        ("vmctl_move", Some("lavender")) => "core_to_lavender",
        ("vmctl_move", Some("linux")) => "core_back_to_linux",
        ("vmctl_moves_done", _) => "vmctl_done",
        _ => return None,
    })
}

/// The partition configuration of the Tandem image QEMU boots: the default one with the
/// PV agent's `vmctl` self-test cut to its bad inputs and one round trip (`tandem.selftest=vmctl-basic:1`).
pub fn config() -> PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("configs")
        .join("nested-kvm.toml")
}

/// The core the self-test moves: Linux's last CPU, core 3 in [`config`].
const MOVED_CORE: u64 = 3;

/// Events that mean something went wrong, whenever they come.
const FAILURES: [&str; 6] = [
    "nested_error",
    "fatal",
    "panic",
    "agent_error",
    "guest_stopped",
    "isolation_violation",
];

/// The scenario has its answer: the self-test finished, or something failed.
fn finished(markers: &[Marker]) -> bool {
    markers
        .iter()
        .any(|m| m.ev() == "vmctl_moves_done" || FAILURES.contains(&m.ev()))
}

/// The hypervisor's and Lavender's side of the moves (COM2) is in: Bochs writes its
/// capture files in blocks, so these may reach the log after the agent's last marker (COM1).
fn moves_seen_by_hypervisor_and_lavender(markers: &[Marker]) -> bool {
    let core_moves = markers.iter().filter(|m| m.ev() == "core_move").count();
    let online = markers
        .iter()
        .any(|m| m.ev() == "lavender_core_online" && m.value["core"] == MOVED_CORE);
    core_moves >= 2 && online
}

/// How long to wait for the COM2 side once the agent reported (see
/// [`moves_seen_by_hypervisor_and_lavender`]).
const COM2_GRACE: Duration = Duration::from_secs(180);

/// Each of `vmctl`'s refusals the self-test provokes: the case, vmctl's exit status and the
/// start of its message (as the Bochs scenario `bochs_vmctl_moves_cores_between_linux_and_
/// lavender` checks them).
const REFUSALS: [(&str, i64, &str); 6] = [
    ("unknown_core", 3, "no core 9"),
    ("unknown_guest", 3, "no guest named 'nobody'"),
    ("not_allowed", 3, "guest 'linux' may not hold core 2"),
    ("already_there", 3, "already"),
    ("usage", 2, "required"),
    ("not_root", 6, "needs root"),
];

/// Everything the scenario asks of Tandem under nested KVM, as a list of what is wrong
/// (empty: passed): every core turns VMX on (4 distinct `core_vmx_on`), Lavender says hello,
/// the Linux agent is ready, `vmctl` refuses bad requests, and one round trip of core 3
/// from Linux to Lavender and back is done and seen alike by Linux (`/proc/cpuinfo`), the
/// hypervisor (`QUERY_CORE`, its `core_move` markers), `vmctl status` and Lavender (the
/// core came online there).
pub fn problems(markers: &[Marker]) -> Vec<String> {
    let mut problems = Vec::new();
    let events = |ev: &str| -> Vec<&Marker> { markers.iter().filter(|m| m.ev() == ev).collect() };
    for ev in FAILURES {
        for m in events(ev) {
            problems.push(format!("{ev}: {}", m.value));
        }
    }
    let cores: BTreeSet<String> = events("core_vmx_on")
        .iter()
        .map(|m| m.value["apic_id"].to_string())
        .collect();
    if cores.len() != L2_CPUS as usize {
        problems.push(format!(
            "{} of {L2_CPUS} cores turned VMX on (APIC IDs {cores:?})",
            cores.len()
        ));
    }
    if !events("lavender_hello")
        .iter()
        .any(|m| m.value["ok"] == true)
    {
        problems.push("no lavender_hello with ok:true".into());
    }
    if events("agent_ready").is_empty() {
        problems.push("no agent_ready".into());
    }
    let refusals = events("vmctl_refusal");
    for (case, exit, says) in REFUSALS {
        match refusals.iter().find(|m| m.value["case"] == case) {
            Some(m)
                if m.value["exit"] == exit
                    && m.value["stderr"].as_str().unwrap_or("").contains(says) => {}
            Some(m) => problems.push(format!("vmctl refusal {case}: {}", m.value)),
            None => problems.push(format!("no vmctl refusal {case}")),
        }
    }
    for (case, code) in [
        ("socket_not_root", "permission"),
        ("no_token", "PermissionDenied"),
    ] {
        if !refusals
            .iter()
            .any(|m| m.value["case"] == case && m.value["code"] == code)
        {
            problems.push(format!("no refusal {case} with code {code}"));
        }
    }
    // The agent's view: vmctl's exit status and outcome, and whether /proc/cpuinfo, the
    // hypervisor and `vmctl status` agree.
    let moves = events("vmctl_move");
    let destinations: Vec<&str> = moves
        .iter()
        .map(|m| m.value["to"].as_str().unwrap_or("?"))
        .collect();
    if destinations != ["lavender", "linux"] {
        problems.push(format!(
            "vmctl moves went to {destinations:?}, not lavender then linux"
        ));
    }
    for m in &moves {
        let v = &m.value;
        let linux_cpus = if v["to"] == "lavender" { 1 } else { 2 };
        if v["core"] != MOVED_CORE
            || v["exit"] != 0
            || v["outcome"] != "done"
            || v["agree"] != true
            || v["cpuinfo_cpus"] != linux_cpus
        {
            problems.push(format!("vmctl move-core: {v}"));
        }
    }
    match events("vmctl_moves_done").first() {
        Some(m) if m.value["ok"] == true && m.value["moves"] == 2 => {}
        Some(m) => problems.push(format!("vmctl_moves_done: {}", m.value)),
        None => problems.push("the vmctl self-test did not finish".into()),
    }
    // The hypervisor's record of each move, and Lavender taking the core up.
    let hv_moves: Vec<String> = events("core_move")
        .iter()
        .map(|m| {
            let v = &m.value;
            let ok = v["core"] == MOVED_CORE && v["outcome"] == "done" && v["forced"] == false;
            format!(
                "{}{}",
                v["to"].as_str().unwrap_or("?"),
                if ok { "" } else { "(!)" }
            )
        })
        .collect();
    if hv_moves != ["lavender", "linux"] {
        problems.push(format!("the hypervisor's core_move markers: {hv_moves:?}"));
    }
    if !events("lavender_core_online")
        .iter()
        .any(|m| m.value["core"] == MOVED_CORE)
    {
        problems.push(format!("Lavender never brought core {MOVED_CORE} online"));
    }
    problems
}

/// The scenario's verdict and where its logs are.
#[derive(Debug)]
pub struct Verdict {
    pub passed: bool,
    pub why: String,
    pub wall: Duration,
    pub run_dir: PathBuf,
    /// Each milestone reached, with its wall time in seconds since Bochs started.
    pub milestones: Vec<(&'static str, f64)>,
}

impl Verdict {
    /// The milestone table for the summary: one line each, `name  seconds`.
    pub fn milestone_lines(&self) -> Vec<String> {
        std::iter::once(("bochs_start", 0.0))
            .chain(self.milestones.iter().copied())
            .map(|(name, at)| format!("{name:<20} {at:7.1}s"))
            .collect()
    }
}

/// The Tandem image QEMU boots: the test image's parts with [`config`].
fn tandem_iso(
    hypervisor: &Path,
    guests: &GuestImages,
    keep_debug_info: bool,
    run_dir: &RunDir,
) -> Result<PathBuf> {
    let partitions = run_dir.file("tandem.partitions");
    crate::partitions::pack(
        &config(),
        crate::partitions::BuildMachine {
            cpus: L2_CPUS,
            memory_mib: L2_MEMORY_MIB,
        },
        &partitions,
    )?;
    let guests = GuestImages {
        partitions,
        ..guests.clone()
    };
    let mut spec = ImageSpec::standard(hypervisor, &guests, "log=info");
    spec.keep_debug_info = keep_debug_info;
    let iso = run_dir.file("tandem.iso");
    println!("==> writing the Tandem image {}", iso.display());
    crate::image::build_iso(&spec, &iso)?;
    Ok(iso)
}

/// Builds the Tandem image (the test image's parts with [`config`]; `keep_debug_info`
/// leaves our ELFs unstripped, to measure what that costs) and the L1 image around it,
/// boots the L1 image under Bochs, waits until the agent's `vmctl` self-test finished or
/// something failed, and judges the markers ([`problems`]), printing each milestone's wall
/// time since Bochs started as it comes. Writes `result.json` (outcome, problems,
/// milestones) into the run dir, which is always kept.
pub fn run(hypervisor: &Path, guests: &GuestImages, keep_debug_info: bool) -> Result<Verdict> {
    let bochs = crate::emulator::patched_bochs::program()?;
    let run_dir = RunDir::fresh(&crate::runs_dir().join(SCENARIO))?;
    let tandem_iso = tandem_iso(hypervisor, guests, keep_debug_info, &run_dir)?;
    let kernel = l1_kernel()?;
    let initrd = run_dir.file("l1-initramfs.cpio");
    println!("==> writing the L1 initramfs {}", initrd.display());
    write_initramfs(&kernel, &tandem_iso, &initrd)?;
    let iso = run_dir.file("l1.iso");
    crate::image::build_linux_iso(&kernel.vmlinuz, &initrd, &l1_cmdline(), &iso)?;
    fs::remove_file(&initrd)?;
    let machine = Machine {
        emulator: EmulatorKind::Bochs,
        cpus: L1_CPUS,
        memory_mib: L1_MEMORY_MIB,
    };
    println!(
        "==> booting {} under Bochs ({L1_CPUS} CPUs, {L1_MEMORY_MIB} MiB); QEMU+KVM inside \
         boots Tandem ({L2_CPUS} CPUs, {L2_MEMORY_MIB} MiB), whose Linux moves core \
         {MOVED_CORE} to Lavender and back with vmctl. Logs: {}",
        iso.display(),
        run_dir.path().display()
    );
    println!("    {:7.1}s  bochs_start", 0.0);
    let started = Instant::now();
    let mut session = Session::start_on_bochs(&bochs, &machine, &iso, run_dir.clone())?;
    let mut reached: Vec<(&'static str, f64)> = Vec::new();
    let mut note_milestones = |markers: &[Marker]| {
        for name in markers.iter().filter_map(milestone) {
            if !reached.iter().any(|(r, _)| *r == name) {
                let at = started.elapsed().as_secs_f64();
                println!("    {at:7.1}s  {name}");
                reached.push((name, at));
            }
        }
    };
    let never = AtomicBool::new(false);
    let mut outcome = session.watch(
        |markers| {
            note_milestones(markers);
            finished(markers)
        },
        Some(TIMEOUT),
        &never,
        |_, _| {},
    );
    let agent_done = session
        .markers()
        .iter()
        .any(|m| m.ev() == "vmctl_moves_done");
    if matches!(outcome, Ok(Outcome::Satisfied))
        && agent_done
        && !moves_seen_by_hypervisor_and_lavender(session.markers())
    {
        println!(
            "    waiting up to {} s for the hypervisor's and Lavender's lines (COM2)",
            COM2_GRACE.as_secs()
        );
        outcome = session.watch(
            moves_seen_by_hypervisor_and_lavender,
            Some(COM2_GRACE),
            &never,
            |_, _| {},
        );
    }
    let wall = started.elapsed();
    session.stop()?;
    let outcome = outcome?;
    let problems = problems(session.markers());
    // A grace period that ran out is not a failure by itself: `problems` says what is missing.
    let ended = matches!(outcome, Outcome::Satisfied) || agent_done;
    let passed = ended && problems.is_empty();
    let why = if problems.is_empty() {
        outcome.to_string()
    } else {
        format!("{outcome}; {}", problems.join("; "))
    };
    let reached_copy = reached.clone();
    let result = json!({
        "scenario": SCENARIO,
        "outcome": if passed { "passed" } else { "failed" },
        "end": outcome.to_string(),
        "problems": problems,
        "wall_seconds": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "milestones_seconds": std::iter::once(("bochs_start", 0.0))
            .chain(reached_copy)
            .map(|(ev, at)| (ev.to_string(), json!((at * 10.0).round() / 10.0)))
            .collect::<serde_json::Map<_, _>>(),
        "tandem": {
            "config": "tests/configs/nested-kvm.toml",
            "debug_info_on_iso": keep_debug_info,
        },
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
        milestones: reached,
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
            init.contains(
                "-device virtio-scsi-pci,id=scsi \
                 -drive file=/tandem.iso,if=none,id=cd,media=cdrom,readonly=on \
                 -device scsi-cd,drive=cd,bus=scsi.0"
            ),
            "{init}"
        );
        assert!(
            init.contains("-serial /dev/ttyS0 -serial /dev/ttyS1"),
            "{init}"
        );
        // Each vCPU thread pinned to an L1 CPU of its own.
        assert!(init.contains("-name tandem,debug-threads=on"), "{init}");
        assert!(init.contains("taskset -p -c $n"), "{init}");
    }

    #[test]
    fn init_is_a_valid_shell_script() {
        let dir = std::env::temp_dir().join(format!("tandem-l1-init-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let script = dir.join("init");
        fs::write(&script, init_script()).unwrap();
        let checked = Command::new("sh").arg("-n").arg(&script).output().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            checked.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&checked.stderr),
            init_script()
        );
    }

    fn marker(json: &str) -> Marker {
        Marker {
            port: crate::emulator::Port::Com2,
            line: 1,
            value: serde_json::from_str(json).unwrap(),
        }
    }

    /// The markers of a run that did everything the scenario asks.
    fn good_run() -> Vec<Marker> {
        let mut json: Vec<String> = (0..4)
            .map(|id| format!(r#"{{"ev":"core_vmx_on","apic_id":{id}}}"#))
            .collect();
        json.push(r#"{"ev":"lavender_hello","ok":true}"#.into());
        json.push(r#"{"ev":"agent_ready"}"#.into());
        for (case, exit, says) in REFUSALS {
            json.push(format!(
                r#"{{"ev":"vmctl_refusal","case":"{case}","exit":{exit},"stderr":"vmctl: {}"}}"#,
                says
            ));
        }
        json.push(r#"{"ev":"vmctl_refusal","case":"socket_not_root","code":"permission"}"#.into());
        json.push(r#"{"ev":"vmctl_refusal","case":"no_token","code":"PermissionDenied"}"#.into());
        json.push(
            r#"{"ev":"core_move","core":3,"to":"lavender","outcome":"done","forced":false}"#.into(),
        );
        json.push(r#"{"ev":"lavender_core_online","core":3}"#.into());
        json.push(r#"{"ev":"vmctl_move","core":3,"to":"lavender","exit":0,"outcome":"done","agree":true,"cpuinfo_cpus":1}"#.into());
        json.push(
            r#"{"ev":"core_move","core":3,"to":"linux","outcome":"done","forced":false}"#.into(),
        );
        json.push(r#"{"ev":"vmctl_move","core":3,"to":"linux","exit":0,"outcome":"done","agree":true,"cpuinfo_cpus":2}"#.into());
        json.push(r#"{"ev":"vmctl_moves_done","moves":2,"agreed":2,"ok":true}"#.into());
        json.iter().map(|j| marker(j)).collect()
    }

    #[test]
    fn a_run_with_everything_passes_and_reaches_every_milestone() {
        let markers = good_run();
        assert_eq!(problems(&markers), Vec::<String>::new());
        assert!(finished(&markers));
        assert!(moves_seen_by_hypervisor_and_lavender(&markers));
        let reached: Vec<&str> = markers.iter().filter_map(milestone).collect();
        for name in [
            "lavender_hello",
            "agent_ready",
            "core_to_lavender",
            "core_back_to_linux",
            "vmctl_done",
        ] {
            assert!(reached.contains(&name), "{name} in {reached:?}");
        }
    }

    #[test]
    fn each_missing_or_wrong_step_is_a_problem() {
        let without =
            |ev: &str| -> Vec<Marker> { good_run().into_iter().filter(|m| m.ev() != ev).collect() };
        for ev in [
            "agent_ready",
            "lavender_hello",
            "vmctl_moves_done",
            "lavender_core_online",
            "core_move",
            "vmctl_move",
            "vmctl_refusal",
        ] {
            assert!(!problems(&without(ev)).is_empty(), "passed without {ev}");
        }
        let mut twice = good_run();
        twice[3] = marker(r#"{"ev":"core_vmx_on","apic_id":0}"#);
        assert!(
            !problems(&twice).is_empty(),
            "the same core twice is not four cores"
        );

        let mut failed_move = good_run();
        let at = failed_move
            .iter()
            .position(|m| m.ev() == "vmctl_move")
            .unwrap();
        failed_move[at] = marker(
            r#"{"ev":"vmctl_move","core":3,"to":"lavender","exit":5,"outcome":"timeout","agree":false,"cpuinfo_cpus":2}"#,
        );
        assert!(!problems(&failed_move).is_empty());

        let mut error = good_run();
        error.push(marker(r#"{"ev":"agent_error","code":"selftest"}"#));
        assert!(!problems(&error).is_empty());
        assert!(!finished(&error[..6]) && finished(&error));
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
