//! The Linux guest's initramfs: a newc cpio archive with the PV agent as `/init` and
//! Debian's static busybox for a shell.
//!
//! The archive is written here rather than with `cpio` from a staging tree because then it
//! needs neither root (for `/dev/console`, a device node) nor fixed timestamps on disk, and
//! the output is byte-for-byte reproducible: every entry has owner 0:0, mtime 0 and an inode
//! number given by its position. It is not compressed: the kernel unpacks plain cpio at once.
//! The agent and vmctl go in without their debug info (`objcopy --strip-debug`, as on the
//! ISO): with it they are nine tenths of the archive, which GRUB reads byte by byte at boot
//! (the full binaries stay in `target/x86_64-unknown-linux-musl/release/`).
//!
//! Layout: `/init` (tandem-agent), `/bin/vmctl`, `/bin/busybox` with applet symlinks in `/bin`,
//! Lavender's programs in [`LAVENDER_PROGRAMS`] (for `vmctl exec`),
//! `/dev/console` (the kernel opens it for init's stdio before any file system is mounted),
//! a minimal `/etc/passwd` and `/etc/group` (root and `nobody`) so `ps` and `ls -l` show names, and the empty
//! mount points `/proc`, `/sys`, `/tmp`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::build;
use crate::tools::DataFile;

/// The agent binary's name (guest-linux-pv's `[[bin]]`).
pub const AGENT: &str = "tandem-agent";
/// The management CLI (guest-linux-pv's other `[[bin]]`), installed as `/bin/vmctl`.
pub const VMCTL: &str = "vmctl";

pub const BUSYBOX: DataFile = DataFile {
    path: "/bin/busybox",
    package: "busybox-static",
    purpose: "the shell and tools of the Linux guest's initramfs",
};

/// Busybox applets linked into `/bin`: what a person at the console needs to look around.
pub const APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "mount",
    "umount",
    "dmesg",
    "grep",
    "ps",
    "sleep",
    "uname",
    "head",
    "tail",
    "kill",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "free",
    "top",
    "uptime",
    "sync",
    "poweroff",
    "reboot",
    "hexdump",
    "devmem",
    "nproc",
    "wc",
    "sed",
    "awk",
    "vi",
    "env",
    "test",
    "[",
    "true",
    "false",
    "printf",
    "stat",
    "find",
    "xargs",
    "sort",
    "uniq",
    "tr",
    "cut",
    "date",
    "sha256sum",
    "cmp",
    "df",
    "du",
    "id",
    "hostname",
    "pwd",
    "readlink",
    "tee",
    "time",
    "timeout",
    "watch",
    "su",
];

/// Where Lavender's programs are installed, for `vmctl exec /usr/lib/tandem/lavender/NAME`.
pub const LAVENDER_PROGRAMS: &str = "usr/lib/tandem/lavender";

/// Where `cargo xtask image` writes the archive.
pub fn default_path() -> PathBuf {
    crate::tandem_dir().join("initramfs.cpio")
}

/// Where cargo puts the agent built by [`build::linux_user`].
pub fn agent_binary() -> PathBuf {
    build::release_binary(build::LINUX_TARGET, AGENT)
}

/// Where the kernel modules the agent loads go (`crate::kernel::doorbell_modules`).
pub const MODULES: &str = "lib/modules/tandem";

/// Builds guest-linux-pv and writes the initramfs to `out`, with `modules` (file name,
/// bytes) under [`MODULES`].
pub fn build(out: &Path, modules: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    build::linux_user()?;
    write(&agent_binary(), out, modules)?;
    Ok(out.to_path_buf())
}

/// Writes the initramfs for an already built agent to `out` (atomically: a reader never
/// sees a half-written archive), with `modules` under [`MODULES`].
pub fn write(agent: &Path, out: &Path, modules: &[(String, Vec<u8>)]) -> Result<()> {
    let objcopy = crate::tools::OBJCOPY.find()?;
    let stripped = out.with_extension("stripped");
    let agent_bytes = read_stripped_elf(
        &objcopy,
        agent,
        &stripped,
        "the PV agent (build it with `cargo xtask build`)",
    )?;
    let busybox = BUSYBOX.find()?;
    let busybox_bytes = read_elf(busybox, BUSYBOX.purpose)?;
    if is_dynamic_elf(&busybox_bytes) {
        bail!(
            "{} is dynamically linked (Debian's `busybox` package) and cannot run in the \
             initramfs; install the static one with: sudo apt-get install {}",
            busybox.display(),
            BUSYBOX.package
        );
    }
    if is_dynamic_elf(&agent_bytes) {
        bail!(
            "{} is dynamically linked; it must be built for {}",
            agent.display(),
            build::LINUX_TARGET
        );
    }
    // vmctl, the management CLI, is built next to the agent (same package and target).
    let vmctl = agent.with_file_name(VMCTL);
    let vmctl_bytes = read_stripped_elf(
        &objcopy,
        &vmctl,
        &stripped,
        "vmctl (build it with `cargo xtask build`)",
    )?;
    if is_dynamic_elf(&vmctl_bytes) {
        bail!(
            "{} is dynamically linked; it must be built for {}",
            vmctl.display(),
            build::LINUX_TARGET
        );
    }
    let mut entries = standard_entries(agent_bytes, busybox_bytes);
    entries.push(Entry::file("bin/vmctl", 0o755, vmctl_bytes));
    entries.extend(lavender_program_entries(&build::lavender_programs_dir())?);
    if !modules.is_empty() {
        entries.push(Entry::dir("lib", 0o755));
        entries.push(Entry::dir("lib/modules", 0o755));
        entries.push(Entry::dir(MODULES, 0o755));
        for (name, bytes) in modules {
            entries.push(Entry::file(
                &format!("{MODULES}/{name}"),
                0o644,
                bytes.clone(),
            ));
        }
    }
    let mut archive = Vec::new();
    write_newc(&entries, &mut archive)?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let partial = out.with_extension("cpio.tmp");
    fs::write(&partial, &archive).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))?;
    println!("==> wrote {} ({} KiB)", out.display(), archive.len() / 1024);
    Ok(())
}

/// Lavender's programs (every `[[bin]]` of `guest-lavender/programs/Cargo.toml`, built by
/// `build::lavender_programs` into `dir`) under [`LAVENDER_PROGRAMS`], with their parents.
fn lavender_program_entries(dir: &Path) -> Result<Vec<Entry>> {
    let manifest = crate::workspace_root().join("guest-lavender/programs/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let parsed: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", manifest.display()))?;
    let mut entries = Vec::new();
    let mut parent = String::new();
    for part in LAVENDER_PROGRAMS.split('/') {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(part);
        entries.push(Entry::dir(&parent, 0o755));
    }
    let bins = parsed.get("bin").and_then(toml::Value::as_array);
    for name in bins
        .into_iter()
        .flatten()
        .filter_map(|bin| bin.get("name")?.as_str())
    {
        let bytes = read_elf(
            &dir.join(name),
            "a Lavender program (built by `cargo xtask build`)",
        )?;
        entries.push(Entry::file(
            &format!("{LAVENDER_PROGRAMS}/{name}"),
            0o755,
            bytes,
        ));
    }
    Ok(entries)
}

/// The ELF at `path` without its debug info, stripped through the scratch file `scratch`.
fn read_stripped_elf(objcopy: &Path, path: &Path, scratch: &Path, what: &str) -> Result<Vec<u8>> {
    read_elf(path, what)?;
    crate::image::strip_debug(objcopy, path, scratch)?;
    let bytes = read_elf(scratch, what);
    let _ = fs::remove_file(scratch);
    bytes
}

fn read_elf(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {} ({what})", path.display()))?;
    if !bytes.starts_with(b"\x7fELF") {
        bail!("{} ({what}) is not an ELF executable", path.display());
    }
    Ok(bytes)
}

/// Whether a 64-bit little-endian ELF asks for a program interpreter (`PT_INTERP`), i.e. is
/// dynamically linked. Parsed by hand: three header fields, not worth a dependency.
fn is_dynamic_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|base| base.checked_add(i * usize::from(phentsize)))
            .and_then(u32_at)
            == Some(PT_INTERP)
    })
}

/// One member of the archive. Paths are relative to the root (`bin/sh`), as cpio stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode,
        }
    }

    pub fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode,
            data: data.into(),
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDevice { path, .. } => path,
        }
    }
}

/// The initramfs's members, parents before children (the kernel's unpacker does not create
/// missing parent directories).
pub fn standard_entries(agent: Vec<u8>, busybox: Vec<u8>) -> Vec<Entry> {
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::dir("dev", 0o755),
        Entry::CharDevice {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::dir("etc", 0o755),
        // `nobody`: a user without privileges, to try what needs root (`su nobody -c ...`).
        Entry::file(
            "etc/passwd",
            0o644,
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        Entry::file("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n"),
        Entry::dir("proc", 0o555),
        Entry::dir("sys", 0o555),
        Entry::dir("tmp", 0o1777),
        Entry::file("init", 0o755, agent),
        Entry::file("bin/busybox", 0o755, busybox),
    ];
    entries.extend(APPLETS.iter().map(|applet| Entry::Symlink {
        path: format!("bin/{applet}"),
        target: "busybox".into(),
    }));
    entries
}

/// Writes `entries` as a newc ("new ASCII", magic `070701`) cpio archive, the format the
/// kernel's initramfs unpacker reads (`Documentation/driver-api/early-userspace/
/// buffer-format.rst`).
pub fn write_newc(entries: &[Entry], out: &mut impl Write) -> io::Result<()> {
    let mut writer = NewcWriter { out, offset: 0 };
    for (index, entry) in entries.iter().enumerate() {
        // Inode 0 is avoided: some readers take it for "no inode".
        let ino = u32::try_from(index + 1).map_err(|_| invalid("too many entries"))?;
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir { mode, .. } => (S_IFDIR | mode, 2, &[], (0, 0)),
            Entry::File { mode, data, .. } => (S_IFREG | mode, 1, data, (0, 0)),
            Entry::Symlink { target, .. } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Entry::CharDevice {
                mode, major, minor, ..
            } => (S_IFCHR | mode, 1, &[], (*major, *minor)),
        };
        let path = entry.path();
        if path.is_empty() || path.starts_with('/') || path.contains('\0') {
            return Err(invalid(&format!("bad archive path {path:?}")));
        }
        writer.member(
            &Header {
                ino,
                mode,
                nlink,
                rdev,
            },
            path,
            data,
        )?;
    }
    writer.member(
        &Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            rdev: (0, 0),
        },
        "TRAILER!!!",
        &[],
    )
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
}

struct NewcWriter<'a, W: Write> {
    out: &'a mut W,
    offset: usize,
}

impl<W: Write> NewcWriter<'_, W> {
    fn member(&mut self, header: &Header, name: &str, data: &[u8]) -> io::Result<()> {
        let file_size = u32::try_from(data.len()).map_err(|_| invalid("member over 4 GiB"))?;
        let name_size = u32::try_from(name.len() + 1).map_err(|_| invalid("name too long"))?;
        // Fields in order: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check, each 8 hex digits.
        let fields = [
            header.ino,
            header.mode,
            0,
            0,
            header.nlink,
            0,
            file_size,
            0,
            0,
            header.rdev.0,
            header.rdev.1,
            name_size,
            0,
        ];
        let mut text = String::from("070701");
        for field in fields {
            text.push_str(&format!("{field:08x}"));
        }
        self.put(text.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len();
        Ok(())
    }

    /// Names and data each end on a 4-byte boundary of the archive.
    fn pad(&mut self) -> io::Result<()> {
        let padding = self.offset.next_multiple_of(4) - self.offset;
        self.put(&[0; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::Tool;

    /// (path, mode, (rdevmajor, rdevminor), data)
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// A minimal newc reader: every member before the trailer.
    fn parse_newc(mut archive: &[u8]) -> Vec<Member> {
        let mut members = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(&archive[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                let text = std::str::from_utf8(&archive[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap() as usize
            };
            let (mode, size, name_size) = (field(1), field(6), field(11));
            let rdev = (field(9) as u32, field(10) as u32);
            let name = std::str::from_utf8(&archive[110..110 + name_size - 1])
                .unwrap()
                .to_string();
            assert_eq!(archive[110 + name_size - 1], 0);
            let data_start = (offset + 110 + name_size).next_multiple_of(4) - offset;
            let data = archive[data_start..data_start + size].to_vec();
            let next = (offset + data_start + size).next_multiple_of(4) - offset;
            if name == "TRAILER!!!" {
                assert_eq!(next, archive.len(), "nothing after the trailer");
                return members;
            }
            members.push((name, mode as u32, rdev, data));
            archive = &archive[next..];
            offset += next;
        }
    }

    fn sample() -> Vec<Entry> {
        vec![
            Entry::dir("bin", 0o755),
            Entry::file("bin/a", 0o644, b"12345".to_vec()),
            Entry::file("empty", 0o600, Vec::new()),
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "busybox".into(),
            },
            Entry::CharDevice {
                path: "console".into(),
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        ]
    }

    #[test]
    fn newc_round_trip() {
        let mut archive = Vec::new();
        write_newc(&sample(), &mut archive).unwrap();
        assert_eq!(archive.len() % 4, 0);
        let members = parse_newc(&archive);
        assert_eq!(
            members,
            vec![
                ("bin".into(), 0o040755, (0, 0), vec![]),
                ("bin/a".into(), 0o100644, (0, 0), b"12345".to_vec()),
                ("empty".into(), 0o100600, (0, 0), vec![]),
                ("bin/sh".into(), 0o120777, (0, 0), b"busybox".to_vec()),
                ("console".into(), 0o020600, (5, 1), vec![]),
            ]
        );
        let mut again = Vec::new();
        write_newc(&sample(), &mut again).unwrap();
        assert_eq!(archive, again, "output is deterministic");
    }

    #[test]
    fn cpio_tool_reads_the_archive() {
        let cpio = Tool {
            program: "cpio",
            package: "cpio",
            purpose: "checking the initramfs writer",
        };
        let Ok(cpio) = cpio.find() else {
            eprintln!("skipped: `cpio` is not installed (sudo apt-get install cpio)");
            return;
        };
        let mut archive = Vec::new();
        write_newc(&sample(), &mut archive).unwrap();
        let mut child = std::process::Command::new(cpio)
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"));
        assert!(lines[1].starts_with("-rw-r--r--") && lines[1].ends_with(" bin/a"));
        assert!(lines[3].starts_with("lrwxrwxrwx") && lines[3].ends_with(" bin/sh -> busybox"));
        assert!(lines[4].starts_with("crw-------") && lines[4].ends_with(" console"));
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in ["", "/abs", "nul\0"] {
            let mut archive = Vec::new();
            assert!(write_newc(&[Entry::dir(path, 0o755)], &mut archive).is_err());
        }
    }

    #[test]
    fn standard_layout_has_init_shell_and_parents_first() {
        let entries = standard_entries(b"agent".to_vec(), b"bb".to_vec());
        let paths: Vec<&str> = entries.iter().map(Entry::path).collect();
        for needed in [
            "init",
            "bin/busybox",
            "dev/console",
            "proc",
            "sys",
            "tmp",
            "etc",
            "bin/sh",
            "bin/ls",
            "bin/cat",
            "bin/echo",
            "bin/mount",
            "bin/dmesg",
            "bin/grep",
            "bin/ps",
            "bin/sleep",
            "bin/uname",
            "bin/head",
            "bin/tail",
        ] {
            assert!(paths.contains(&needed), "{needed} missing");
        }
        for (i, path) in paths.iter().enumerate() {
            if let Some((parent, _)) = path.rsplit_once('/') {
                assert!(paths[..i].contains(&parent), "{path} before {parent}");
            }
        }
        assert!(entries.contains(&Entry::file("init", 0o755, b"agent".to_vec())));
    }

    #[test]
    fn dynamic_elf_is_detected() {
        // An ELF64 header with one program header at 0x40: PT_INTERP (3), then PT_LOAD (1).
        let mut elf = vec![0u8; 0x40 + 2 * 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        assert!(!is_dynamic_elf(&elf));
        elf[0x40 + 0x38..0x40 + 0x3c].copy_from_slice(&3u32.to_le_bytes());
        assert!(is_dynamic_elf(&elf));
        assert!(
            !is_dynamic_elf(&elf[..0x50]),
            "truncated input is not a panic"
        );
        assert!(!is_dynamic_elf(b"\x7fELF"));
    }

    #[test]
    fn real_dynamic_executable_is_detected() {
        // This test binary is built for the host's glibc target: it has an interpreter.
        let me = fs::read("/proc/self/exe").unwrap();
        assert!(is_dynamic_elf(&me));
    }
}
