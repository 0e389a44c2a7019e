//! The boot ISO: GRUB 2 loading the hypervisor (multiboot2) and its modules (module2).
//!
//! A module's GRUB command line is its name (`linux`, later `lavender`, `initrd`,
//! `partitions`): the hypervisor finds its modules by that name in the multiboot2 info.

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
        let initrd = crate::initramfs::build(&crate::initramfs::default_path())?;
        let guests = GuestImages {
            lavender: built.lavender,
            partitions,
            linux_kernel,
            initrd,
        };
        let spec = ImageSpec::standard(&built.hypervisor, &guests, &self.hv_cmdline());
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
}

impl Module {
    pub fn new(name: &str, source: impl Into<PathBuf>) -> Self {
        Module {
            name: name.to_string(),
            source: source.into(),
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
}

impl ImageSpec {
    /// The standard image: the hypervisor and every guest module. Adding a module (Lavender,
    /// the initramfs, the partition config) is one line here.
    pub fn standard(hypervisor: &Path, guests: &GuestImages, cmdline: &str) -> Self {
        ImageSpec {
            hypervisor: hypervisor.to_path_buf(),
            cmdline: cmdline.to_string(),
            modules: vec![
                Module::new("lavender", &guests.lavender),
                Module::new("partitions", &guests.partitions),
                Module::new("linux", &guests.linux_kernel),
                Module::new("initrd", &guests.initrd),
            ],
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

/// Builds the ISO at `out` with `grub-mkrescue`. The staging tree sits next to it
/// (`<out>.d/`), so images built in parallel (one per scenario) never share files.
pub fn build_iso(spec: &ImageSpec, out: &Path) -> Result<()> {
    spec.check()?;
    let grub_mkrescue = tools::GRUB_MKRESCUE.find()?;
    // grub-mkrescue calls these itself and fails with obscure messages when they are missing.
    tools::XORRISO.find()?;
    tools::MFORMAT.find()?;
    tools::GRUB_PC.find()?;

    let staging = out.with_extension("iso.d");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("removing old staging tree {}", staging.display()))?;
    }
    let boot = staging.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    copy(&spec.hypervisor, &boot.join("hypervisor"))?;
    for module in &spec.modules {
        copy(&module.source, &boot.join(&module.name))?;
    }
    fs::write(boot.join("grub").join("grub.cfg"), spec.grub_cfg())?;

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
        .arg(&staging);
    let built = tools::output(&mut cmd).context("grub-mkrescue could not build the ISO");
    if built.is_err() {
        let _ = fs::remove_file(&partial);
    }
    built?;
    fs::rename(&partial, out)
        .with_context(|| format!("moving {} to {}", partial.display(), out.display()))?;
    fs::remove_dir_all(&staging)?;
    Ok(())
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
