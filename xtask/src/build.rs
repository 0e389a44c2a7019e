//! Building every crate for the target it runs on.
//!
//! | crate | target | why |
//! |---|---|---|
//! | default members (vmcall-proto, xtask, ...) | host | tooling and host unit tests |
//! | `hypervisor`, `guest-lavender` | `x86_64-unknown-none`, release | bare-metal ELFs GRUB loads |
//! | `guest-linux-pv` | `x86_64-unknown-linux-musl`, release | static binaries for the Linux initramfs |
//! | `guest-lavender/programs` | `x86_64-unknown-none`, release, own workspace | Lavender programs installed in the initramfs for `vmctl exec` |

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::tools;

pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";
pub const LINUX_TARGET: &str = "x86_64-unknown-linux-musl";

/// The bare-metal ELFs that go on the boot ISO.
#[derive(Debug, Clone)]
pub struct BareMetal {
    pub hypervisor: PathBuf,
    pub lavender: PathBuf,
}

/// Where cargo puts a release binary for `target`.
pub fn release_binary(target: &str, name: &str) -> PathBuf {
    crate::target_dir().join(target).join("release").join(name)
}

fn cargo_build(what: &str, packages: &[&str], target: Option<&str>) -> Result<()> {
    println!("==> building {what}");
    let mut cmd = tools::cargo();
    cmd.arg("build");
    for package in packages {
        cmd.args(["--package", package]);
    }
    if let Some(target) = target {
        cmd.args(["--release", "--target", target]);
    }
    tools::run(&mut cmd).with_context(|| format!("building {what} failed"))
}

/// The host crates (the workspace's default members), debug profile.
pub fn host() -> Result<()> {
    cargo_build("host crates (workspace default members)", &[], None)?;
    println!("    {}/", crate::target_dir().join("debug").display());
    Ok(())
}

/// Only the hypervisor: what `cargo xtask image` needs today.
pub fn hypervisor() -> Result<PathBuf> {
    cargo_build(
        "hypervisor for x86_64-unknown-none",
        &["hypervisor"],
        Some(BARE_METAL_TARGET),
    )?;
    let path = release_binary(BARE_METAL_TARGET, "hypervisor");
    println!("    {}", path.display());
    Ok(path)
}

/// The hypervisor and the Lavender guest, release, for bare metal.
pub fn bare_metal() -> Result<BareMetal> {
    cargo_build(
        "hypervisor + guest-lavender for x86_64-unknown-none",
        &["hypervisor", "guest-lavender"],
        Some(BARE_METAL_TARGET),
    )?;
    let built = BareMetal {
        hypervisor: release_binary(BARE_METAL_TARGET, "hypervisor"),
        lavender: release_binary(BARE_METAL_TARGET, "guest-lavender"),
    };
    println!("    {}", built.hypervisor.display());
    println!("    {}", built.lavender.display());
    Ok(built)
}

/// The Linux-side user space (the PV agent, vmctl), static musl binaries, and the Lavender
/// programs the initramfs carries for `vmctl exec`. Returns the agent's directory.
pub fn linux_user() -> Result<PathBuf> {
    cargo_build(
        "guest-linux-pv for x86_64-unknown-linux-musl",
        &["guest-linux-pv"],
        Some(LINUX_TARGET),
    )?;
    lavender_programs()?;
    let dir = crate::target_dir().join(LINUX_TARGET).join("release");
    println!("    {}/", dir.display());
    Ok(dir)
}

/// Where [`lavender_programs`] puts the programs' ELF files.
pub fn lavender_programs_dir() -> PathBuf {
    crate::target_dir()
        .join("lavender-programs")
        .join(BARE_METAL_TARGET)
        .join("release")
}

/// Lavender's user programs (`guest-lavender/programs`, a workspace of its own), built as
/// guest-lavender's `build.rs` builds them for embedding: release, for bare metal, with the
/// target's default code generation (static position-independent executables), not the
/// kernel's flags from `.cargo/config.toml`.
pub fn lavender_programs() -> Result<PathBuf> {
    println!("==> building Lavender's programs for {BARE_METAL_TARGET}");
    let mut cmd = tools::cargo();
    cmd.current_dir(
        crate::workspace_root()
            .join("guest-lavender")
            .join("programs"),
    )
    .args([
        "build",
        "--release",
        "--target",
        BARE_METAL_TARGET,
        "--target-dir",
    ])
    .arg(crate::target_dir().join("lavender-programs"))
    .env("CARGO_ENCODED_RUSTFLAGS", "")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET");
    tools::run(&mut cmd).context("building Lavender's programs failed")?;
    let dir = lavender_programs_dir();
    println!("    {}/", dir.display());
    Ok(dir)
}

/// Everything: host crates, bare-metal ELFs, Linux user space.
pub fn all() -> Result<BareMetal> {
    host()?;
    let bare_metal = bare_metal()?;
    linux_user()?;
    Ok(bare_metal)
}
