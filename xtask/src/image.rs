//! The boot ISO: GRUB 2 loading the hypervisor (multiboot2) and its modules (module2).
//!
//! A module's GRUB command line is its name (`linux`, later `lavender`, `initrd`,
//! `partitions`): the hypervisor finds its modules by that name in the multiboot2 info.
//!
//! The ELFs on the ISO carry no debug info (`objcopy --strip-debug`; the symbol table stays):
//! GRUB reads every byte of every file it loads, and the debug sections are more than nine
//! tenths of the release builds. The full ELFs are kept beside the ISO, in `<iso>.debug/`
//! (e.g. `target/tandem/tandem.debug/hypervisor`), to symbolise panics with `addr2line`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::partitions::BuildMachine;
use crate::tools;

/// Where `cargo xtask image` writes by default.
pub fn default_iso() -> PathBuf {
    crate::tandem_dir().join("tandem.iso")
}

/// The hypervisor's `log=` levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// What an image is made of, as command-line options (shared by `image` and `run`).
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Boot this Linux kernel (a bzImage) instead of the pinned Debian cloud kernel. Its
    /// header (x86 boot protocol 2.12+, 64-bit entry) is checked before anything is built.
    #[arg(long, value_name = "PATH")]
    pub linux_kernel: Option<PathBuf>,

    /// Hypervisor log level (its `log=` command-line option).
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log: LogLevel,

    /// More words for the hypervisor's command line, e.g. --cmdline "core_test=42:60".
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub cmdline: String,

    /// Partition configuration (TOML): which cores and memory each guest gets.
    /// It is validated here (errors name the offending entry) and again at boot.
    #[arg(long, value_name = "PATH", default_value_os_t = crate::partitions::default_config())]
    pub config: PathBuf,

    /// Put the hypervisor and Lavender on the ISO with their debug info (GRUB then reads
    /// about 13 MB more), to measure what stripping saves. By default they are stripped and
    /// the full ELFs kept in `<iso>.debug/`.
    #[arg(long)]
    pub keep_debug_info: bool,
}

impl ImageArgs {
    /// The hypervisor's full command line.
    pub fn hv_cmdline(&self) -> String {
        format!("log={} {}", self.log.name(), self.cmdline)
            .trim_end()
            .to_string()
    }

    /// Validates the configuration for `machine`, builds the hypervisor and Lavender,
    /// fetches the kernel and writes the ISO to `out`.
    pub fn build(&self, out: &Path, machine: BuildMachine) -> Result<PathBuf> {
        // Cheap checks first: a bad configuration or --linux-kernel is reported before a build.
        let partitions = out.with_extension("partitions");
        crate::partitions::pack(&self.config, machine, &partitions)?;
        println!(
            "==> partition configuration {} is valid",
            self.config.display()
        );
        let linux_kernel = crate::kernel::linux_kernel(self.linux_kernel.as_deref())?;
        let built = crate::build::bare_metal()?;
        let modules = crate::kernel::doorbell_modules(self.linux_kernel.as_deref())?;
        let initrd = crate::initramfs::build(&crate::initramfs::default_path(), &modules)?;
        let guests = GuestImages {
            lavender: built.lavender,
            partitions,
            linux_kernel,
            initrd,
        };
        let mut spec = ImageSpec::standard(&built.hypervisor, &guests, &self.hv_cmdline());
        spec.keep_debug_info = self.keep_debug_info;
        println!("==> writing {}", out.display());
        build_iso(&spec, out)?;
        Ok(out.to_path_buf())
    }
}

/// One file GRUB loads next to the hypervisor.
#[derive(Debug, Clone)]
pub struct Module {
    /// Both the file name under `/boot/` on the ISO and the module's command line.
    pub name: String,
    pub source: PathBuf,
    /// An ELF of ours: its debug info is stripped on the ISO and the full file is kept in
    /// `<iso>.debug/`.
    pub elf: bool,
}

impl Module {
    /// A file copied to the ISO as it is.
    pub fn new(name: &str, source: impl Into<PathBuf>) -> Self {
        Module {
            name: name.to_string(),
            source: source.into(),
            elf: false,
        }
    }

    /// An ELF built here, stripped of its debug info on the ISO.
    pub fn elf(name: &str, source: impl Into<PathBuf>) -> Self {
        Module {
            elf: true,
            ..Module::new(name, source)
        }
    }
}

/// The files of the guests and their configuration.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The Lavender ELF.
    pub lavender: PathBuf,
    /// The packed partition configuration (see `crate::partitions`).
    pub partitions: PathBuf,
    /// The Linux bzImage.
    pub linux_kernel: PathBuf,
    /// The Linux initramfs (see `crate::initramfs`).
    pub initrd: PathBuf,
}

/// What goes on an ISO.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub hypervisor: PathBuf,
    /// The hypervisor's command line, e.g. `log=debug`.
    pub cmdline: String,
    /// Loaded in this order.
    pub modules: Vec<Module>,
    /// Put our ELFs on the ISO as built, debug info included (only to measure what
    /// stripping saves).
    pub keep_debug_info: bool,
}

impl ImageSpec {
    /// The standard image: the hypervisor and every guest module. Adding a module (Lavender,
    /// the initramfs, the partition config) is one line here.
    pub fn standard(hypervisor: &Path, guests: &GuestImages, cmdline: &str) -> Self {
        ImageSpec {
            hypervisor: hypervisor.to_path_buf(),
            cmdline: cmdline.to_string(),
            modules: vec![
                Module::elf("lavender", &guests.lavender),
                Module::new("partitions", &guests.partitions),
                Module::new("linux", &guests.linux_kernel),
                Module::new("initrd", &guests.initrd),
            ],
            keep_debug_info: false,
        }
    }

    /// The `grub.cfg` that boots this image at once, without a menu.
    pub fn grub_cfg(&self) -> String {
        let mut cfg = String::new();
        cfg.push_str("set timeout=0\nset default=0\n\n");
        cfg.push_str("menuentry \"Tandem\" {\n");
        let _ = writeln!(cfg, "    multiboot2 /boot/hypervisor {}", self.cmdline);
        for module in &self.modules {
            let _ = writeln!(cfg, "    module2 /boot/{0} {0}", module.name);
        }
        cfg.push_str("    boot\n}\n");
        cfg
    }

    fn check(&self) -> Result<()> {
        if !self.hypervisor.is_file() {
            bail!(
                "hypervisor ELF {} does not exist (build it with `cargo xtask build`)",
                self.hypervisor.display()
            );
        }
        for (i, module) in self.modules.iter().enumerate() {
            let valid_name = !module.name.is_empty()
                && module
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !valid_name || module.name == "hypervisor" {
                bail!("invalid module name {:?}", module.name);
            }
            if self.modules[..i].iter().any(|m| m.name == module.name) {
                bail!("module {:?} is listed twice", module.name);
            }
            if !module.source.is_file() {
                bail!(
                    "module {:?}: {} does not exist",
                    module.name,
                    module.source.display()
                );
            }
        }
        Ok(())
    }
}

/// Where the full (unstripped) ELFs of the ISO at `iso` are kept: `<iso>.debug/`, one file
/// per ELF, named as on the ISO (`hypervisor`, `lavender`).
pub fn debug_dir(iso: &Path) -> PathBuf {
    iso.with_extension("debug")
}

/// Builds the ISO at `out` with `grub-mkrescue`. The staging tree sits next to it
/// (`<out>.d/`), so images built in parallel (one per scenario) never share files. The
/// ELFs go on it without debug info; their full builds are copied to [`debug_dir`].
pub fn build_iso(spec: &ImageSpec, out: &Path) -> Result<()> {
    spec.check()?;
    let grub_mkrescue = tools::GRUB_MKRESCUE.find()?;
    // grub-mkrescue calls these itself and fails with obscure messages when they are missing.
    tools::XORRISO.find()?;
    tools::MFORMAT.find()?;
    tools::GRUB_PC.find()?;
    let objcopy = tools::OBJCOPY.find()?;

    let staging = out.with_extension("iso.d");
    remove_dir_if_present(&staging)?;
    let boot = staging.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    // Like the ISO, the debug ELFs replace the previous ones only once the ISO is built.
    let debug_partial = out.with_extension("debug.partial");
    remove_dir_if_present(&debug_partial)?;
    fs::create_dir_all(&debug_partial)?;
    let elfs = std::iter::once(("hypervisor", spec.hypervisor.as_path())).chain(
        spec.modules
            .iter()
            .filter(|m| m.elf)
            .map(|m| (m.name.as_str(), m.source.as_path())),
    );
    for (name, source) in elfs {
        let on_iso = boot.join(name);
        if spec.keep_debug_info {
            copy(source, &on_iso)?;
        } else {
            strip_debug(&objcopy, source, &on_iso)?;
        }
        copy(source, &debug_partial.join(name))?;
        println!(
            "    {name}: {} KiB on the ISO ({} KiB with debug info in {})",
            file_kib(&on_iso)?,
            file_kib(source)?,
            debug_dir(out).display()
        );
    }
    for module in spec.modules.iter().filter(|m| !m.elf) {
        copy(&module.source, &boot.join(&module.name))?;
    }
    fs::write(boot.join("grub").join("grub.cfg"), spec.grub_cfg())?;
    mkrescue(&grub_mkrescue, &staging, out)?;
    let debug = debug_dir(out);
    remove_dir_if_present(&debug)?;
    fs::rename(&debug_partial, &debug)
        .with_context(|| format!("moving {} to {}", debug_partial.display(), debug.display()))?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// An ISO on which GRUB boots a Linux `kernel` (bzImage) with `initrd` and `cmdline`: the
/// nested-KVM scenario's outer machine (see `crate::nested_kvm`).
pub fn build_linux_iso(kernel: &Path, initrd: &Path, cmdline: &str, out: &Path) -> Result<()> {
    let grub_mkrescue = tools::GRUB_MKRESCUE.find()?;
    tools::XORRISO.find()?;
    tools::MFORMAT.find()?;
    tools::GRUB_PC.find()?;
    let staging = out.with_extension("iso.d");
    remove_dir_if_present(&staging)?;
    let boot = staging.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    copy(kernel, &boot.join("vmlinuz"))?;
    copy(initrd, &boot.join("initrd"))?;
    let cfg = format!(
        "set timeout=0\nset default=0\n\nmenuentry \"Linux\" {{\n    \
         linux /boot/vmlinuz {cmdline}\n    initrd /boot/initrd\n    boot\n}}\n"
    );
    fs::write(boot.join("grub").join("grub.cfg"), cfg)?;
    mkrescue(&grub_mkrescue, &staging, out)?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// `grub-mkrescue` of the tree `staging` into `out`.
fn mkrescue(grub_mkrescue: &Path, staging: &Path, out: &Path) -> Result<()> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    // Written next to `out` and renamed over it only when complete: a failed build leaves
    // the previous, good ISO in place.
    let partial = out.with_extension("iso.partial");
    let mut cmd = std::process::Command::new(grub_mkrescue);
    // Only the BIOS platform: Bochs and QEMU boot it from their BIOS; no fonts, locales or
    // themes because nothing is shown on screen.
    cmd.arg("--directory=/usr/lib/grub/i386-pc")
        .args(["--fonts=", "--locales=", "--themes="])
        .arg("-o")
        .arg(&partial)
        .arg(staging);
    let built = tools::output(&mut cmd).context("grub-mkrescue could not build the ISO");
    if built.is_err() {
        let _ = fs::remove_file(&partial);
    }
    built?;
    fs::rename(&partial, out)
        .with_context(|| format!("moving {} to {}", partial.display(), out.display()))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `from` without its debug sections to `to` (the symbol table stays, so a stripped
/// ELF still names its functions).
pub fn strip_debug(objcopy: &Path, from: &Path, to: &Path) -> Result<()> {
    let mut cmd = std::process::Command::new(objcopy);
    cmd.arg("--strip-debug").arg(from).arg(to);
    tools::output(&mut cmd)
        .map(drop)
        .with_context(|| format!("stripping the debug info of {}", from.display()))
}

fn file_kib(path: &Path) -> Result<u64> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(meta.len().div_ceil(1024))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guests(dir: &Path) -> GuestImages {
        GuestImages {
            lavender: dir.join("lv"),
            partitions: dir.join("partitions"),
            linux_kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
        }
    }

    #[test]
    fn grub_cfg_boots_hypervisor_with_named_modules() {
        let spec = ImageSpec::standard(Path::new("hv"), &guests(Path::new(".")), "log=debug");
        let cfg = spec.grub_cfg();
        assert!(cfg.contains("set timeout=0\n"), "{cfg}");
        assert!(
            cfg.contains("multiboot2 /boot/hypervisor log=debug\n"),
            "{cfg}"
        );
        let linux = cfg.find("module2 /boot/linux linux\n").expect(&cfg);
        let lavender = cfg.find("module2 /boot/lavender lavender\n").expect(&cfg);
        assert!(lavender < linux, "modules keep their order:\n{cfg}");
        assert!(
            cfg.contains("module2 /boot/partitions partitions\n"),
            "{cfg}"
        );
    }

    #[test]
    fn stripping_drops_debug_sections_and_keeps_symbols() {
        // This test binary is an ELF built with debug info (cargo's test profile).
        let me = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-strip-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("stripped");
        strip_debug(&tools::OBJCOPY.find().unwrap(), &me, &out).unwrap();
        let full = fs::read(&me).unwrap();
        let stripped = fs::read(&out).unwrap();
        let sections = |bytes: &[u8]| -> Vec<String> {
            let elf = xmas_elf::ElfFile::new(bytes).unwrap();
            elf.section_iter()
                .filter_map(|s| s.get_name(&elf).ok().map(str::to_string))
                .collect()
        };
        let (full_sections, stripped_sections) = (sections(&full), sections(&stripped));
        assert!(full_sections.iter().any(|s| s == ".debug_info"));
        // (`.debug_gdb_scripts` is loaded with the program: not debug info, it stays.)
        for gone in [".debug_info", ".debug_line", ".debug_str", ".debug_abbrev"] {
            assert!(
                !stripped_sections.iter().any(|s| s == gone),
                "{gone} left in {stripped_sections:?}"
            );
        }
        assert!(
            stripped_sections.iter().any(|s| s == ".symtab"),
            "the symbol table stays"
        );
        assert!(stripped.len() < full.len());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_elfs_sit_beside_the_iso() {
        assert_eq!(
            debug_dir(Path::new("/t/tandem.iso")),
            Path::new("/t/tandem.debug")
        );
    }

    #[test]
    fn only_our_elfs_are_stripped() {
        let spec = ImageSpec::standard(Path::new("hv"), &guests(Path::new(".")), "");
        let stripped: Vec<_> = spec.modules.iter().filter(|m| m.elf).collect();
        assert_eq!(stripped.len(), 1);
        assert_eq!(stripped[0].name, "lavender");
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = std::env::temp_dir().join(format!("tandem-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let hv = dir.join("hv");
        fs::write(&hv, b"elf").unwrap();

        let mut missing = ImageSpec::standard(&hv, &guests(&dir), "");
        for module in &mut missing.modules {
            module.source = hv.clone();
        }
        missing.modules[2].source = dir.join("nope");
        let err = missing.check().unwrap_err().to_string();
        assert!(
            err.contains("\"linux\"") && err.contains("does not exist"),
            "{err}"
        );

        let mut twice = ImageSpec::standard(&hv, &guests(&dir), "");
        for module in &mut twice.modules {
            module.source = hv.clone();
        }
        twice.modules.push(Module::new("linux", &hv));
        assert!(twice.check().unwrap_err().to_string().contains("twice"));

        let mut spaced = ImageSpec::standard(&hv, &guests(&dir), "");
        spaced.modules[0].name = "two words".into();
        assert!(spaced.check().unwrap_err().to_string().contains("invalid"));

        fs::remove_dir_all(&dir).unwrap();
    }
}
