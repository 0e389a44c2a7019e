//! The Rust toolchain pieces the build needs beyond the compiler itself, installed through
//! rustup when they are missing, so `cargo xtask run` and `cargo xtask test` work on a fresh
//! machine.
//!
//! | piece | needed by | installed with |
//! |---|---|---|
//! | the targets listed in `rust-toolchain.toml` | every bare-metal and musl build | `rustup target add --toolchain T ...` |
//! | the nightly toolchain | the fuzz stage of `test` (`cargo +nightly fuzz`) | `rustup toolchain install nightly --profile minimal` |
//! | `cargo-fuzz` | the fuzz stage of `test` | `cargo install cargo-fuzz --locked` |
//!
//! rustup adds the file's targets to a toolchain that already exists (say `stable`, from
//! rustup's own installer) only when it may install implicitly: with `RUSTUP_AUTO_INSTALL=0`,
//! or in rustup 1.28.0, the toolchain is used as it is, without the targets, and the
//! bare-metal build then fails with "can't find crate for `core`". Each install is printed with its reason; when it
//! cannot be done (no rustup, no network) the error gives the exact command to run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tools;

/// What `rust-toolchain.toml` asks for (the parts xtask acts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolchainFile {
    pub channel: String,
    pub targets: Vec<String>,
}

#[derive(serde::Deserialize)]
struct FileToml {
    toolchain: ToolchainToml,
}

#[derive(serde::Deserialize)]
struct ToolchainToml {
    channel: String,
    #[serde(default)]
    targets: Vec<String>,
}

impl ToolchainFile {
    pub fn path() -> PathBuf {
        crate::workspace_root().join("rust-toolchain.toml")
    }

    pub fn parse(text: &str) -> Result<ToolchainFile> {
        let file: FileToml = toml::from_str(text)?;
        Ok(ToolchainFile {
            channel: file.toolchain.channel,
            targets: file.toolchain.targets,
        })
    }

    pub fn load() -> Result<ToolchainFile> {
        let path = Self::path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{} is malformed", path.display()))
    }
}

/// The toolchain cargo builds with here: its sysroot, and its rustup name when rustup
/// manages it (rustup keeps toolchains in `$RUSTUP_HOME/toolchains/<name>/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveToolchain {
    pub sysroot: PathBuf,
    pub rustup_name: Option<String>,
}

impl ActiveToolchain {
    /// Asks `rustc` from the workspace root, so `rust-toolchain.toml`, `RUSTUP_TOOLCHAIN` and
    /// `RUSTC` resolve exactly as they do for the builds that follow.
    pub fn find() -> Result<ActiveToolchain> {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let out = tools::output(
            Command::new(rustc)
                .args(["--print", "sysroot"])
                .current_dir(crate::workspace_root()),
        )
        .context("asking rustc for its sysroot")?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Self::from_sysroot(sysroot))
    }

    pub fn from_sysroot(sysroot: PathBuf) -> ActiveToolchain {
        let under_rustup = sysroot
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|dir| dir == "toolchains");
        let rustup_name = under_rustup
            .then(|| sysroot.file_name())
            .flatten()
            .map(|name| name.to_string_lossy().into_owned());
        ActiveToolchain {
            sysroot,
            rustup_name,
        }
    }

    /// A target's standard library is installed in `lib/rustlib/<target>/lib/`.
    pub fn has_target(&self, target: &str) -> bool {
        self.sysroot
            .join("lib/rustlib")
            .join(target)
            .join("lib")
            .is_dir()
    }
}

/// `rustup target add` for `targets` of `toolchain` (the exact command, printed and run).
pub fn target_add_command(toolchain: &str, targets: &[String]) -> Vec<String> {
    let mut cmd: Vec<String> = ["rustup", "target", "add", "--toolchain", toolchain]
        .map(String::from)
        .to_vec();
    cmd.extend(targets.iter().cloned());
    cmd
}

pub const NIGHTLY_INSTALL: [&str; 6] = [
    "rustup",
    "toolchain",
    "install",
    "nightly",
    "--profile",
    "minimal",
];
pub const CARGO_FUZZ_INSTALL: [&str; 4] = ["cargo", "install", "cargo-fuzz", "--locked"];

/// Whether `rustup toolchain list` shows the toolchain `cargo +nightly` uses: `nightly-<host>`
/// (a dated `nightly-2025-01-01-<host>` is a different one).
pub fn lists_nightly(toolchain_list: &str) -> bool {
    toolchain_list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn rustup_available() -> bool {
    Command::new("rustup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn shell_words(cmd: &[String]) -> String {
    cmd.join(" ")
}

/// Runs an install command with its output shown; on failure the error names the command to
/// run by hand.
fn install(cmd: &[String], what: &str) -> Result<()> {
    println!("    $ {}", shell_words(cmd));
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(crate::workspace_root())
        .status();
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!(
            "installing {what} failed ({status}; offline?). Run it by hand when the network \
             is back: {}",
            shell_words(cmd)
        ),
        Err(e) => bail!(
            "could not start `{}` ({e}) to install {what}. Run it by hand: {}",
            cmd[0],
            shell_words(cmd)
        ),
    }
}

/// Adds the targets of `rust-toolchain.toml` that the active toolchain lacks.
pub fn ensure_targets() -> Result<()> {
    let file = ToolchainFile::load()?;
    let active = ActiveToolchain::find()?;
    let missing: Vec<String> = file
        .targets
        .iter()
        .filter(|t| !active.has_target(t))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(", ");
    let Some(name) = &active.rustup_name else {
        bail!(
            "the Rust toolchain at {} lacks the target(s) {list} that rust-toolchain.toml lists, \
             and it is not managed by rustup, so xtask cannot add them. Install rustup \
             (https://rustup.rs) or add these targets to that toolchain.",
            active.sysroot.display()
        );
    };
    let cmd = target_add_command(name, &missing);
    if !rustup_available() {
        bail!(
            "the Rust target(s) {list} are missing and `rustup` is not on PATH; run: {}",
            shell_words(&cmd)
        );
    }
    println!(
        "==> installing Rust target(s) {list} into toolchain {name}: rust-toolchain.toml lists \
         them and the toolchain lacks them (rustup adds them to an installed toolchain only \
         when it may install implicitly)"
    );
    install(&cmd, &format!("the Rust target(s) {list}"))
}

/// Makes sure `cargo +nightly fuzz` works: the nightly toolchain, then cargo-fuzz.
pub fn ensure_fuzzing() -> Result<()> {
    let skip = "(or pass --fuzz-seconds 0 to skip fuzzing)";
    let nightly: Vec<String> = NIGHTLY_INSTALL.map(String::from).to_vec();
    if !rustup_available() {
        bail!(
            "fuzzing needs the nightly toolchain through rustup, and `rustup` is not on PATH; \
             install rustup (https://rustup.rs), then run: {} {skip}",
            shell_words(&nightly)
        );
    }
    let list = tools::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !lists_nightly(&String::from_utf8_lossy(&list.stdout)) {
        println!(
            "==> installing the nightly Rust toolchain: the fuzz stage runs `cargo +nightly \
             fuzz` (libFuzzer needs nightly's sanitizer flags)"
        );
        install(&nightly, "the nightly toolchain").context(skip)?;
    }
    let fuzz_present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .current_dir(crate::workspace_root())
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz_present {
        println!("==> installing cargo-fuzz: the fuzz stage drives libFuzzer with it");
        let cmd: Vec<String> = CARGO_FUZZ_INSTALL.map(String::from).to_vec();
        install(&cmd, "cargo-fuzz").context(skip)?;
    }
    // libfuzzer-sys compiles libFuzzer (C++) on first use.
    tools::CXX.find()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repositorys_toolchain_file_parses() {
        let file = ToolchainFile::load().unwrap();
        assert_eq!(file.channel, "stable");
        assert!(file.targets.contains(&"x86_64-unknown-none".to_string()));
        assert!(file
            .targets
            .contains(&"x86_64-unknown-linux-musl".to_string()));
    }

    #[test]
    fn toolchain_file_without_targets_needs_none() {
        let file = ToolchainFile::parse("[toolchain]\nchannel = \"1.80\"\n").unwrap();
        assert_eq!(
            file,
            ToolchainFile {
                channel: "1.80".into(),
                targets: vec![]
            }
        );
        assert!(ToolchainFile::parse("[toolchain]\ntargets = []\n").is_err());
    }

    #[test]
    fn rustup_toolchains_are_named_by_their_directory() {
        let active = ActiveToolchain::from_sysroot(PathBuf::from(
            "/home/u/.rustup/toolchains/stable-x86_64-unknown-linux-gnu",
        ));
        assert_eq!(
            active.rustup_name.as_deref(),
            Some("stable-x86_64-unknown-linux-gnu")
        );
        let distro = ActiveToolchain::from_sysroot(PathBuf::from("/usr"));
        assert_eq!(distro.rustup_name, None);
    }

    #[test]
    fn targets_are_looked_up_in_the_sysroot() {
        let dir = std::env::temp_dir().join(format!("tandem-sysroot-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lib/rustlib/x86_64-unknown-none/lib")).unwrap();
        let active = ActiveToolchain::from_sysroot(dir.clone());
        assert!(active.has_target("x86_64-unknown-none"));
        assert!(!active.has_target("x86_64-unknown-linux-musl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn target_add_names_the_toolchain_and_every_target() {
        let cmd = target_add_command(
            "stable-x86_64-unknown-linux-gnu",
            &[
                "x86_64-unknown-none".into(),
                "x86_64-unknown-linux-musl".into(),
            ],
        );
        assert_eq!(
            shell_words(&cmd),
            "rustup target add --toolchain stable-x86_64-unknown-linux-gnu \
             x86_64-unknown-none x86_64-unknown-linux-musl"
        );
    }

    #[test]
    fn nightly_is_recognised_in_the_toolchain_list() {
        let with = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n";
        assert!(lists_nightly(with));
        let dated_only = "stable-x86_64-unknown-linux-gnu (default)\n\
                          nightly-2024-05-01-x86_64-unknown-linux-gnu\n";
        assert!(!lists_nightly(dated_only));
        assert!(!lists_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)\n"
        ));
        assert!(!lists_nightly(""));
    }
}
