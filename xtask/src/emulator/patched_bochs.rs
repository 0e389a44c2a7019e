//! The Bochs that `cargo xtask test --nested-kvm` runs on: Bochs 3.0 from Debian's source
//! (the `bochs` package of Debian 13, whose original tarball is pinned by SHA-256) with two
//! fixes to its emulation ([`FIXES`]), built once into `target/tandem/cache/`.
//!
//! **The VM-entry fix.** Bochs keeps a cached mask of which pending events may be delivered and
//! recomputes it when EFLAGS.IF changes or the CPU's context changes. VM entry recomputes it
//! while loading the guest state, that is while the CPU is still in VMX root operation, so
//! entering a guest with IF clear from a host with IF clear leaves external interrupts
//! masked, although with the "external-interrupt exiting" control set the guest's IF does
//! not block them: they must cause a VM exit (Intel SDM Vol. 3C §26.2, Table 26-1 and §27.2).
//! KVM enters its guests with the host's interrupts off, and Tandem's hypervisor, a guest of
//! KVM in the nested scenario, always runs with IF clear: the L1 CPU running it then missed
//! its own timer and IPIs until Tandem happened to exit for another reason, which stalled the
//! L1 machine for tens of seconds when a CPU hotplug sent every L1 CPU an IPI (the runs of
//! docs/nested-kvm.md). The fix recomputes the mask once the CPU is in VMX non-root
//! operation. Bochs 2.7 (Debian 12's) has the same code.
//!
//! **The instruction-boundary fix.** Bochs restores RIP to `prev_rip`, the start of the
//! current instruction, when an instruction faults or causes a fault-like VM exit, and
//! commits `prev_rip` after each instruction and after each exception's or VM exit's
//! `longjmp()` back to its CPU loop. With several CPUs and no internal debugger, Bochs 3.0
//! runs them from `bx_main`'s loop one trace at a time (`cpu_run_trace()`), and that loop
//! catches the `longjmp()` without committing. After a guest's exception was delivered (CS,
//! RSP and RIP those of the handler), `prev_rip` still named the faulting instruction, and a
//! VM exit before the handler's first instruction (an external interrupt for the L1 kernel,
//! say) saved the faulting instruction's RIP with the handler's CS and stack: the guest
//! resumed its user-mode instruction in kernel mode. Under nested KVM that killed Linux in
//! most runs (`BUG: ENTRY_TRAMPOLINE stack guard page was hit` after a fault at `0010:0x7f...`).
//! The fix commits the boundary at the start of each trace. Bochs 2.7 built with its debugger
//! (as Debian's is: `-rc` needs it) always ran the debugger's loop, which commits; 3.0 runs
//! that loop only with `-dbg`.
//!
//! The default emulator stays the host's Bochs 2.7: Tandem runs in its VMX root operation
//! there, where the mask is right, and its debugger loop commits the boundary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::tools::{self, DataFile, Tool};

/// Debian 13's Bochs 3.0 source, as its `Sources` index lists it.
const SOURCE_URL: &str =
    "http://deb.debian.org/debian/pool/main/b/bochs/bochs_3.0+dfsg.orig.tar.xz";
const SOURCE_SHA256: &str = "78f6c73d4a6472d5130a87ab9dc306d02c7c71ed8e25b3a8ef642e2a7acd282b";
/// The directory the tarball unpacks into.
const SOURCE_DIR: &str = "bochs-3.0";
/// Names the build: change it whenever [`FIXES`] or [`CONFIGURE`] change, so the cache is
/// rebuilt.
const BUILD: &str = "bochs-3.0+dfsg-tandem2";

/// A change to one Bochs source file: `anchor`, which must be there exactly once, becomes
/// `text`.
struct Fix {
    file: &'static str,
    anchor: &'static str,
    text: &'static str,
}

/// The VM-entry fix (at the end of VM entry's switch to non-root operation) and the
/// instruction-boundary fix (at the start of a trace of the SMP loop); the module's
/// documentation says why.
const FIXES: [Fix; 2] = [
    Fix {
        file: "cpu/vmx.cc",
        anchor: "  BX_CPU_THIS_PTR in_vmx_guest = true;\n\n  unmask_event(BX_EVENT_INIT);\n",
        text: "  BX_CPU_THIS_PTR in_vmx_guest = true;\n\n  unmask_event(BX_EVENT_INIT);\n\n  \
            // Loading the guest state above recomputed the event mask in VMX root operation; \
            with\n  \
            // external-interrupt exiting, EFLAGS.IF no longer blocks external interrupts.\n  \
            handleInterruptMaskChange();\n",
    },
    Fix {
        file: "cpu/cpu.cc",
        anchor: "void BX_CPU_C::cpu_run_trace(void)\n{\n",
        text: "void BX_CPU_C::cpu_run_trace(void)\n{\n  \
            // At an instruction boundary: commit it, as cpu_loop() does after its setjmp(); \
            bx_main's\n  \
            // SMP loop catches an exception's or a VM exit's longjmp() without doing so.\n  \
            BX_CPU_THIS_PTR prev_rip = RIP;\n  \
            BX_CPU_THIS_PTR speculative_rsp = false;\n\n",
    },
];

/// What the scenario's machine needs (`emulator::bochs::config`: RFB display, the
/// `corei7_skylake_x` model with VMX, EPT and AVX-512, SMP, PCI, an ATAPI CD-ROM, the
/// dummy sound driver) and the internal debugger its `-rc` script drives, without GUI
/// libraries or plugins.
const CONFIGURE: [&str; 26] = [
    "--with-rfb",
    "--with-nogui",
    "--enable-x86-64",
    "--enable-vmx=2",
    "--enable-svm",
    "--enable-smp",
    "--enable-cpu-level=6",
    "--enable-avx",
    "--enable-evex",
    "--enable-amx",
    "--enable-cet",
    "--enable-pci",
    "--enable-cdrom",
    "--enable-a20-pin",
    "--enable-fpu",
    "--enable-repeat-speedups",
    "--enable-all-optimizations",
    "--enable-x86-debugger",
    "--enable-debugger",
    "--enable-disasm",
    "--enable-sb16",
    "--enable-es1370",
    "--enable-protection-keys",
    "--enable-uintr",
    "--enable-memtype",
    "--disable-docbook",
];

const APT_HELPER: DataFile = DataFile {
    path: "/usr/lib/apt/apt-helper",
    package: "apt",
    purpose: "downloading Bochs's source for --nested-kvm",
};
const MAKE: Tool = Tool {
    program: "make",
    package: "make",
    purpose: "building Bochs for --nested-kvm",
};
const XZ: Tool = Tool {
    program: "xz",
    package: "xz-utils",
    purpose: "unpacking Bochs's source for --nested-kvm",
};

fn build_dir() -> PathBuf {
    crate::tandem_dir().join("cache").join(BUILD)
}

/// The fixed Bochs, built on first use (1 to 4 minutes on two cores; the log of each
/// step is kept next to it).
pub fn program() -> Result<PathBuf> {
    let dir = build_dir();
    let bochs = dir.join("bochs");
    if bochs.is_file() {
        // Only ever copied into place by a build that succeeded.
        return Ok(bochs);
    }
    for tool in [tools::CXX, MAKE, XZ, tools::TAR] {
        tool.find()?;
    }
    let helper = APT_HELPER.find()?;
    fs::create_dir_all(&dir)?;
    let tarball = dir.join("bochs_3.0+dfsg.orig.tar.xz");
    // A download cut short leaves a file that is not the pinned one: fetch it again.
    if tarball.is_file() && crate::kernel::sha256(&tarball)? != SOURCE_SHA256 {
        fs::remove_file(&tarball)?;
    }
    if !tarball.is_file() {
        println!("==> downloading Bochs 3.0's source (Debian 13, SHA-256 pinned)");
        let mut download = Command::new(helper);
        tools::apt_download_as_root(&mut download);
        // apt-helper refuses a file whose SHA-256 differs from the pin.
        tools::run(
            download
                .args(["download-file", SOURCE_URL])
                .arg(&tarball)
                .arg(format!("SHA256:{SOURCE_SHA256}"))
                .stdin(Stdio::null()),
        )
        .context("Bochs's source is fetched from Debian's mirror once: is the network up?")?;
    }
    let source = dir.join(SOURCE_DIR);
    if source.exists() {
        fs::remove_dir_all(&source)?;
    }
    tools::run(
        tools::TAR
            .command()?
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir),
    )?;
    for fix in &FIXES {
        apply(fix, &source)?;
    }
    let started = Instant::now();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "==> building Bochs 3.0 with its two fixes in {} (once; 1 to 4 minutes on two cores)",
        source.display()
    );
    logged(
        Command::new(source.join("configure"))
            .args(CONFIGURE)
            .current_dir(&source),
        &dir.join("configure.log"),
    )?;
    logged(
        MAKE.command()?
            .arg(format!("-j{jobs}"))
            .current_dir(&source),
        &dir.join("make.log"),
    )?;
    let staging = dir.join("bochs.new");
    fs::copy(source.join("bochs"), &staging)?;
    fs::rename(&staging, &bochs)?;
    fs::remove_dir_all(&source)?;
    println!(
        "    built {} in {:.0} s",
        bochs.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(bochs)
}

/// Applies `fix` to its file under `source`; refuses a source that differs from the one the
/// fix was written for.
fn apply(fix: &Fix, source: &Path) -> Result<()> {
    let file = source.join(fix.file);
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let fixed = with_fix(&text, fix).with_context(|| {
        format!(
            "{}: a fix's anchor is not there exactly once (a different Bochs source?)",
            file.display()
        )
    })?;
    fs::write(&file, fixed)?;
    Ok(())
}

/// `source` with `fix.text` in place of its one `fix.anchor`.
fn with_fix(source: &str, fix: &Fix) -> Option<String> {
    (source.matches(fix.anchor).count() == 1).then(|| source.replacen(fix.anchor, fix.text, 1))
}

/// Runs `cmd` with its output into `log`; on failure, says where the log is and quotes its
/// end.
fn logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let out = fs::File::create(log)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("could not start `{}`", tools::describe(cmd)))?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "`{}` failed ({status}); its log is {}:\n{}",
            tools::describe(cmd),
            log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fix_keeps_its_anchor_and_adds_one_statement() {
        let [entry, boundary] = &FIXES;
        let fixed = with_fix(&format!("a\n{}b\n", entry.anchor), entry).unwrap();
        assert!(fixed.starts_with("a\n  BX_CPU_THIS_PTR in_vmx_guest = true;"));
        assert!(fixed.ends_with("  handleInterruptMaskChange();\nb\n"));
        assert_eq!(fixed.matches("handleInterruptMaskChange").count(), 1);
        let fixed = with_fix(&format!("a\n{}b\n", boundary.anchor), boundary).unwrap();
        assert!(fixed.starts_with("a\nvoid BX_CPU_C::cpu_run_trace(void)\n{\n"));
        assert!(fixed.ends_with("  BX_CPU_THIS_PTR speculative_rsp = false;\n\nb\n"));
        assert_eq!(fixed.matches("prev_rip = RIP;").count(), 1);
    }

    #[test]
    fn a_source_without_an_anchor_or_with_two_is_refused() {
        for fix in &FIXES {
            assert!(with_fix("nothing here", fix).is_none());
            assert!(with_fix(&format!("{}{}", fix.anchor, fix.anchor), fix).is_none());
        }
    }
}
