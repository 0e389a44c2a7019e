//! The Linux guest's kernel: Debian's stock cloud kernel, pinned to one version and checksum.
//!
//! The kernel is a stock distribution kernel on purpose (see docs/architecture.md): it is fetched
//! with `apt-get download`, so it comes from the Debian mirror the machine already trusts, and
//! its `.deb` is pinned by SHA-256 so every run boots the same bytes. The `.deb` and the
//! extracted `vmlinuz` are cached in `target/tandem/cache/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::tools;

/// The pinned package. 6.1.0-50 / 6.1.176-1 is in bookworm's main pool (not only in
/// bookworm-security, whose older builds are dropped when a new one lands), so the pin lasts
/// until the next Debian point release at least.
pub const PACKAGE: &str = "linux-image-6.1.0-50-cloud-amd64";
pub const VERSION: &str = "6.1.176-1";
/// SHA-256 of `linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb` (as listed in the
/// bookworm `Packages` index).
pub const DEB_SHA256: &str = "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791";

fn cache_dir() -> PathBuf {
    crate::tandem_dir().join("cache")
}

fn vmlinuz_path() -> PathBuf {
    cache_dir().join(format!("vmlinuz-{PACKAGE}_{VERSION}"))
}

/// The kernel to boot: `user_kernel` when given (its bzImage header checked), else the
/// pinned Debian kernel, downloaded and extracted on first use.
pub fn linux_kernel(user_kernel: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = user_kernel {
        crate::bzimage::check_file(path)?;
        // Absolute: the path is handed to the scenarios, which run in another directory.
        return fs::canonicalize(path)
            .with_context(|| format!("--linux-kernel {}", path.display()));
    }
    let vmlinuz = vmlinuz_path();
    if vmlinuz.is_file() {
        // Only ever written (atomically, by rename) from a .deb whose checksum matched.
        return Ok(vmlinuz);
    }
    let deb = pinned_deb(PACKAGE, VERSION, DEB_SHA256)?;
    extract_vmlinuz(&deb, &vmlinuz)?;
    println!("    {}", vmlinuz.display());
    Ok(vmlinuz)
}

/// The `.deb` of `package=version` in the cache, downloaded when missing, and refused unless
/// its SHA-256 is `sha256`.
pub fn pinned_deb(package: &str, version: &str, sha256_pin: &str) -> Result<PathBuf> {
    fs::create_dir_all(cache_dir())?;
    let deb = cache_dir().join(format!("{package}_{version}_amd64.deb"));
    if deb.is_file() && sha256(&deb)? != sha256_pin {
        println!(
            "==> cached {} has the wrong SHA-256; fetching it again",
            deb.display()
        );
        fs::remove_file(&deb)?;
    }
    if !deb.is_file() {
        download_with_fresh_lists(package, version, &cache_dir())?;
    }
    let actual = sha256(&deb)?;
    if actual != sha256_pin {
        fs::remove_file(&deb)?;
        bail!(
            "{package}={version} from the mirror has SHA-256 {actual}, but the pin in \
             xtask/src is {sha256_pin}; refusing to use it. Pass --linux-kernel PATH to boot \
             a kernel of your own."
        );
    }
    Ok(deb)
}

/// [`download`], and when that fails and we are root, `apt-get update` and [`download`]
/// again: a machine's package lists older than the pin do not name it (a new machine's
/// image may carry lists months old), and as root the refresh is ours to make. Not as root,
/// the error says to run it.
fn download_with_fresh_lists(package: &str, version: &str, dir: &Path) -> Result<()> {
    let Err(first) = download(package, version, dir) else {
        return Ok(());
    };
    if !tools::is_root() {
        return Err(first);
    }
    println!(
        "==> apt-get could not download {package}={version}; refreshing the package lists \
         (apt-get update) and trying once more"
    );
    let mut update = tools::APT_GET.command()?;
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Err(refresh) = tools::output(update.stdin(Stdio::null())) {
        bail!("{first:#}\nRefreshing the package lists (`apt-get update`) failed too: {refresh:#}");
    }
    download(package, version, dir)
}

/// `apt-get download package=version` into `dir`.
fn download(package: &str, version: &str, dir: &Path) -> Result<()> {
    println!("==> downloading {package}={version} with apt-get download");
    let mut cmd = tools::APT_GET.command()?;
    cmd.current_dir(dir)
        .args(["download", &format!("{package}={version}")]);
    tools::apt_download_as_root(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", tools::describe(&cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`apt-get download {package}={version}` failed:\n{}\n\
             The pinned kernel may be gone from the Debian mirror (or `apt-get update` was never \
             run on this machine). Run `sudo apt-get update` and retry, or pass \
             --linux-kernel PATH to boot a bzImage of your own (and update the pin in \
             xtask/src/kernel.rs).",
            stderr.trim_end()
        );
    }
    Ok(())
}

/// SHA-256 of a file, lowercase hex. `sha256sum` is used instead of a hashing crate because
/// xtask runs unoptimised (`cargo run`), where a pure-Rust hash of 26 MB takes seconds.
pub fn sha256(path: &Path) -> Result<String> {
    let out = tools::output(tools::SHA256SUM.command()?.arg(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let digest = text
        .split_whitespace()
        .next()
        .with_context(|| format!("sha256sum printed nothing for {}", path.display()))?;
    Ok(digest.to_string())
}

/// The pinned kernel's modules the agent loads for the doorbell into Linux (in load order:
/// `uio_pci_generic` needs `uio`), from the same package as the kernel, so they match it.
pub const DOORBELL_MODULES: [&str; 2] = ["uio.ko", "uio_pci_generic.ko"];

/// The doorbell modules (`DOORBELL_MODULES`, each `(file name, bytes)`) for the kernel Linux
/// boots: the pinned kernel's, extracted from its package on first use; none for a kernel of
/// the user's (`--linux-kernel`), whose modules Tandem does not have: the agent then polls.
pub fn doorbell_modules(user_kernel: Option<&Path>) -> Result<Vec<(String, Vec<u8>)>> {
    if user_kernel.is_some() {
        return Ok(Vec::new());
    }
    let dir = cache_dir().join(format!("modules-{PACKAGE}_{VERSION}"));
    if !DOORBELL_MODULES.iter().all(|m| dir.join(m).is_file()) {
        let deb = pinned_deb(PACKAGE, VERSION, DEB_SHA256)?;
        let staging = cache_dir().join("modules.tmp");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        let patterns: Vec<String> = DOORBELL_MODULES
            .iter()
            .map(|m| format!("./lib/modules/*/kernel/drivers/uio/{m}"))
            .collect();
        extract(&deb, &staging, &patterns)?;
        let found = staging.join("flat");
        fs::create_dir_all(&found)?;
        for module in DOORBELL_MODULES {
            let path = find_file(&staging.join("lib"), module)?
                .with_context(|| format!("{} contains no {module}", deb.display()))?;
            fs::rename(&path, found.join(module))?;
        }
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::rename(&found, &dir)?;
        fs::remove_dir_all(&staging)?;
    }
    DOORBELL_MODULES
        .iter()
        .map(|m| {
            let bytes = fs::read(dir.join(m)).with_context(|| format!("reading {m}"))?;
            Ok((m.to_string(), bytes))
        })
        .collect()
}

/// The first file named `name` under `dir`, depth first.
fn find_file(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name)? {
                return Ok(Some(found));
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Extracts `boot/vmlinuz-*` from the package. Only `./boot/` is unpacked (not the ~100 MB of
/// modules that `dpkg-deb -x` would write); the result is renamed into place so a half-written
/// kernel is never taken for a good one.
fn extract_vmlinuz(deb: &Path, dest: &Path) -> Result<()> {
    println!("==> extracting the kernel from {}", deb.display());
    let staging = cache_dir().join("extract.tmp");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    extract(deb, &staging, &["./boot/vmlinuz-*".to_string()])?;
    let boot = staging.join("boot");
    let found = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", deb.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} contains no boot/vmlinuz-*", deb.display()))?;
    fs::rename(&found, dest)?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// Unpacks the package's members matching `patterns` (tar wildcards, e.g.
/// `./boot/vmlinuz-*`) into `dir`.
pub fn extract(deb: &Path, dir: &Path, patterns: &[String]) -> Result<()> {
    let mut dpkg = tools::DPKG_DEB.command()?;
    dpkg.arg("--fsys-tarfile").arg(deb).stdout(Stdio::piped());
    let mut dpkg_child = dpkg
        .spawn()
        .with_context(|| format!("could not start `{}`", tools::describe(&dpkg)))?;
    let tar_input = dpkg_child.stdout.take().expect("stdout was piped");
    let mut tar: Command = tools::TAR.command()?;
    tar.current_dir(dir)
        .args(["-x", "--wildcards"])
        .args(patterns)
        .stdin(tar_input);
    let tar_result = tools::output(&mut tar);
    let dpkg_status = dpkg_child.wait()?;
    tar_result
        .with_context(|| format!("unpacking {} from {}", patterns.join(" "), deb.display()))?;
    if !dpkg_status.success() {
        bail!("`{}` failed ({dpkg_status})", tools::describe(&dpkg));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_kernel_must_exist() {
        let err = linux_kernel(Some(Path::new("/nonexistent/bzImage")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--linux-kernel /nonexistent/bzImage"), "{err}");
    }

    #[test]
    fn user_kernel_must_be_a_bzimage() {
        let file = std::env::temp_dir().join(format!("tandem-kernel-test-{}", std::process::id()));
        fs::write(&file, b"not really a kernel").unwrap();
        let err = format!("{:#}", linux_kernel(Some(&file)).unwrap_err());
        assert!(err.contains("not a bzImage"), "{err}");
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn vanished_version_points_to_linux_kernel_option() {
        // apt refuses an unknown version from its local index, without any download.
        let err = download(PACKAGE, "0.0.0-tandem-none", &std::env::temp_dir())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--linux-kernel PATH"), "{err}");
        assert!(err.contains("0.0.0-tandem-none"), "{err}");
    }

    #[test]
    fn sha256_of_known_content() {
        let file = std::env::temp_dir().join(format!("tandem-sha-test-{}", std::process::id()));
        fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        fs::remove_file(&file).unwrap();
    }
}
