//! Tandem's developer tooling: `cargo xtask build | image | run | test | bench`.
//!
//! The binary (`main.rs`) is a thin command-line layer; everything it does lives in this
//! library so the end-to-end harness (`tests/`, crate `tandem-e2e`) boots images exactly the
//! way `cargo xtask run` does.
//!
//! | module | concern |
//! |---|---|
//! | [`tools`] | finding host programs (with the Debian package to install), running commands |
//! | [`toolchain`] | installing what rustup can give: `rust-toolchain.toml`'s targets, nightly, cargo-fuzz |
//! | [`build`] | `cargo build` of every crate for its target, artifact paths |
//! | [`kernel`] | the pinned Debian cloud kernel: download, checksum, extract |
//! | [`bzimage`] | the host's early check of a `--linux-kernel` bzImage header |
//! | [`image`] | the GRUB ISO: staging tree, `grub.cfg`, `grub-mkrescue` |
//! | [`initramfs`] | the Linux guest's initramfs (PV agent as `/init`, busybox), newc cpio |
//! | [`emulator`] | Bochs / QEMU machine configs, launching and stopping them, run dirs |
//! | [`console`] | following the serial-console capture files line by line |
//! | [`marker`] | parsing `@@tandem {json}` marker lines |
//! | [`nested_kvm`] | the Bochs image that boots Tandem under nested KVM (`test --nested-kvm`) |
//! | [`session`] | one boot: emulator + consoles + markers, watched until an outcome |
//! | [`run`] | `cargo xtask run` (interactive boot) |
//! | [`shell`] | `run`'s terminal: a pty as the Linux guest's COM1, relayed to the user's terminal |
//! | [`test`] | `cargo xtask test` (every test stage and the summary) |
//! | [`core_moves`] | the core-move test's figures from its markers (bench and e2e scenario) |
//! | [`bench`] | `cargo xtask bench` (timings as tables and saved JSON, never pass/fail) |
//! | [`bench_delegation`] | its system-call delegation part |
//! | [`bench_policies`] | its policy part (workloads under each policy: tables, JSON, plots) |
//! | [`bench_policies_plot`] | the policy part's plots (SVG and PNG) |

use std::path::{Path, PathBuf};

pub mod bench;
pub mod bench_delegation;
pub mod bench_exec;
pub mod bench_moves;
pub mod bench_policies;
pub mod bench_policies_plot;
pub mod bench_policies_quick;
pub mod build;
pub mod bzimage;
pub mod console;
pub mod core_moves;
pub mod emulator;
pub mod image;
pub mod initramfs;
pub mod kernel;
pub mod marker;
pub mod nested_kvm;
pub mod partitions;
pub mod policy_model;
pub mod run;
pub mod session;
pub mod shell;
pub mod test;
pub mod toolchain;
pub mod tools;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the root; this is fixed at compile time, so the tool works
    // from any current directory.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// xtask's version and the repository's commit, e.g. `0.1.0 (commit 1a2b3c4d5e6f)` or
/// `0.1.0 (commit 1a2b3c4d5e6f, modified)`: what a bug report needs to name the tree.
/// Asked from git at run time (xtask always runs from its source tree), so it is never stale.
pub fn version() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let modified = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|changes| !changes.is_empty());
            format!("commit {hash}{}", if modified { ", modified" } else { "" })
        }
        None => "commit unknown".to_string(),
    };
    format!("{} ({commit})", env!("CARGO_PKG_VERSION"))
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Everything Tandem's tooling produces besides cargo's own output: the ISO, the download
/// cache and the run dirs (`target/tandem/`).
pub fn tandem_dir() -> PathBuf {
    target_dir().join("tandem")
}

/// Where the console logs of every boot are kept (`target/tandem/runs/`).
pub fn runs_dir() -> PathBuf {
    tandem_dir().join("runs")
}
