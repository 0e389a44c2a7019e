//! Host programs the tooling drives, and running them with useful errors.
//!
//! Every external program is declared once here with the Debian package that provides it,
//! so a missing tool is reported as "install package X" instead of a bare `ENOENT`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// A program found on `PATH`, provided by a Debian package.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    /// What we need it for, shown in the error when it is missing.
    pub purpose: &'static str,
}

pub const GRUB_MKRESCUE: Tool = Tool {
    program: "grub-mkrescue",
    package: "grub-common",
    purpose: "building the boot ISO",
};
pub const XORRISO: Tool = Tool {
    program: "xorriso",
    package: "xorriso",
    purpose: "writing the ISO (used by grub-mkrescue)",
};
pub const MFORMAT: Tool = Tool {
    program: "mformat",
    package: "mtools",
    purpose: "the ISO's FAT image (used by grub-mkrescue)",
};
pub const BOCHS: Tool = Tool {
    program: "bochs",
    package: "bochs",
    purpose: "emulating a VMX-capable machine",
};
pub const QEMU: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
    purpose: "running the image under QEMU",
};
pub const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
    purpose: "downloading the pinned Debian kernel package",
};
pub const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
    purpose: "unpacking the Debian kernel package",
};
pub const SHA256SUM: Tool = Tool {
    program: "sha256sum",
    package: "coreutils",
    purpose: "checking the kernel package's SHA-256",
};
pub const CXX: Tool = Tool {
    program: "c++",
    package: "g++",
    purpose: "building libFuzzer for the fuzz stage, and Bochs for --nested-kvm",
};
pub const OBJCOPY: Tool = Tool {
    program: "objcopy",
    package: "binutils",
    purpose: "stripping the debug info of the ELFs on the boot ISO and in the initramfs",
};
pub const TAR: Tool = Tool {
    program: "tar",
    package: "tar",
    purpose: "unpacking the Debian kernel package",
};

/// A data file some package installs (BIOS images, GRUB platform files).
#[derive(Debug, Clone, Copy)]
pub struct DataFile {
    pub path: &'static str,
    pub package: &'static str,
    pub purpose: &'static str,
}

pub const BOCHS_BIOS: DataFile = DataFile {
    path: "/usr/share/bochs/BIOS-bochs-latest",
    package: "bochsbios",
    purpose: "the Bochs system BIOS",
};
pub const VGA_BIOS: DataFile = DataFile {
    path: "/usr/share/vgabios/vgabios.bin",
    package: "vgabios",
    purpose: "the Bochs VGA BIOS",
};
pub const GRUB_PC: DataFile = DataFile {
    path: "/usr/lib/grub/i386-pc",
    package: "grub-pc-bin",
    purpose: "GRUB's BIOS platform files, so the ISO boots from a BIOS",
};

impl Tool {
    /// The program's full path, or an error naming the package to install.
    pub fn find(&self) -> Result<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(self.program))
            .find(|candidate| is_executable(candidate))
            .with_context(|| {
                format!(
                    "`{}` is not installed (needed for {}); install it with: \
                     sudo apt-get install {}",
                    self.program, self.purpose, self.package
                )
            })
    }

    /// A `Command` for this program, after checking that it exists.
    pub fn command(&self) -> Result<Command> {
        Ok(Command::new(self.find()?))
    }
}

impl DataFile {
    pub fn find(&self) -> Result<&'static Path> {
        let path = Path::new(self.path);
        if path.exists() {
            Ok(path)
        } else {
            bail!(
                "{} is missing ({}); install it with: sudo apt-get install {}",
                self.path,
                self.purpose,
                self.package
            )
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// How a command line reads in an error message.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command with inherited stdio; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs a command capturing its output; fails (quoting stderr) unless it exits successfully.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out)
}

/// Whether xtask runs as root (may refresh the machine's package lists).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For an apt program about to download (`apt-get download`, `apt-helper download-file`):
/// as root, apt drops privileges to `_apt` for downloads, which cannot write into a build
/// tree owned by root and warns about it; downloading as root is what happens anyway.
pub fn apt_download_as_root(cmd: &mut Command) {
    if is_root() {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
}

/// The cargo that started us (so `cargo +nightly xtask` stays on nightly), else `cargo`.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let tool = Tool {
            program: "tandem-no-such-program",
            package: "tandem-pkg",
            purpose: "testing",
        };
        let err = tool.find().unwrap_err().to_string();
        assert!(err.contains("apt-get install tandem-pkg"), "{err}");
        assert!(err.contains("tandem-no-such-program"), "{err}");
    }

    #[test]
    fn present_tool_is_found() {
        // `sh` is on every system this runs on.
        let sh = Tool {
            program: "sh",
            package: "dash",
            purpose: "testing",
        };
        assert!(sh.find().unwrap().ends_with("sh"));
    }

    #[test]
    fn failing_command_reports_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("oops"), "{err}");
    }
}
