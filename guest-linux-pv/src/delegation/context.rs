//! One Lavender process's Linux-side context: its open files, working directory and umask,
//! and every delegated call run in it, confined to the served root.
//!
//! **Confinement.** Every path is resolved by `openat2` from the root's directory fd with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: an absolute path, a `..` that climbs above the
//! root, a symlink pointing outside it, and `/proc` magic links all fail inside Linux's own
//! lookup (`EXDEV` or `ELOOP`), before anything outside is touched. Calls that name an entry
//! rather than open it (unlink, mkdir, rmdir, rename) resolve the parent directory that way
//! and act on the last component with the `*at` calls, which never follow it.
//!
//! **Descriptors.** Lavender's fd numbers index this context's table of the files it opened;
//! the agent's own descriptors (console, `/dev/mem`) are not reachable through it. Fds 0, 1
//! and 2 are the process's standard streams when Linux started it with its launcher's
//! (`vmctl exec`): fetched from PID 1 at their first use (`crate::exec::broker`); without
//! them they are `EBADF` like any fd never opened.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::libc;
use nix::sys::stat::{fstat, mkdirat, Mode};
use nix::unistd::{fsync, ftruncate, lseek, unlinkat, UnlinkatFlags, Whence};
use vmcall_proto::delegation::{call, open_flags, DirEntry, FileKind, FileStat};
use vmcall_proto::message::SyscallRequest;
use vmcall_proto::region::{BufferRef, DataWindow};

/// The first fd number handed to Lavender (0-2 look like standard streams to programs).
const FIRST_FD: u64 = 3;
/// Longest path accepted (Linux's `PATH_MAX`).
const PATH_MAX: usize = 4096;

/// Per-process limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Files open at once; one more is `EMFILE`.
    pub open_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { open_files: 64 }
    }
}

/// The served root: a directory fd and its absolute path (to tell a working directory's
/// place under it).
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    pub fn open(path: &Path) -> Result<Root, Errno> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let path = std::fs::canonicalize(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Ok(Root { fd, path })
    }
}

pub struct Context<'r> {
    root: &'r Root,
    /// The Lavender process whose standard streams fds 0-2 are (if it has any).
    process: Option<u32>,
    /// Fds 0-2, once looked up.
    stdio: Option<[Option<OwnedFd>; 3]>,
    /// Relative to the root; empty at the root itself.
    cwd: PathBuf,
    files: Vec<Option<OwnedFd>>,
    limits: Limits,
}

impl<'r> Context<'r> {
    pub fn new(root: &'r Root, limits: Limits) -> Self {
        Self {
            root,
            process: None,
            stdio: None,
            cwd: PathBuf::new(),
            files: Vec::new(),
            limits,
        }
    }

    /// Fds 0-2 are the standard streams of Lavender process `process`, if Linux holds any.
    pub fn with_stdio_of(mut self, process: u32) -> Self {
        self.process = Some(process);
        self
    }

    /// Looks the standard streams up once, at the first call on fds 0-2.
    fn load_stdio(&mut self) {
        if self.stdio.is_none() {
            let fetched = self.process.and_then(crate::exec::broker::fetch);
            self.stdio = Some(fetched.map_or([None, None, None], |fds| fds.map(Some)));
        }
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.files.iter().flatten().count()
    }

    /// Runs `request` with its buffers in `window` (already checked to be the caller's).
    /// Returns the call's value or the errno for Lavender.
    pub fn run(&mut self, window: &DataWindow<'_>, request: &SyscallRequest) -> Result<u64, Errno> {
        let [a0, a1, a2, ..] = request.args;
        let [input, output] = request.buffers;
        if a0 < FIRST_FD && self.process.is_some() && takes_fd(request.number) {
            self.load_stdio();
        }
        match request.number {
            call::OPENAT => {
                let path = read_path(window, input)?;
                self.open(&path, a0, a1)
            }
            call::CLOSE if a0 < FIRST_FD => {
                let stream = self
                    .stdio
                    .as_mut()
                    .and_then(|fds| fds.get_mut(a0 as usize))
                    .and_then(Option::take);
                stream.map(|_| 0).ok_or(Errno::EBADF)
            }
            call::CLOSE => {
                let slot = self.slot(a0)?;
                self.files[slot] = None;
                Ok(0)
            }
            call::READ => {
                let fd = self.fd(a0)?.as_raw_fd();
                in_place(window, output, |ptr, len| {
                    // SAFETY: `ptr..ptr + len` is inside the mapped data window (`raw_parts`
                    // checked it); the kernel writes it, and no Rust reference to it exists.
                    Ok(unsafe { libc::read(fd, ptr.cast(), len) })
                })
            }
            call::PREAD => {
                let (fd, offset) = (self.fd(a0)?.as_raw_fd(), file_offset(a1)?);
                in_place(window, output, |ptr, len| {
                    // SAFETY: as for READ.
                    Ok(unsafe { libc::pread(fd, ptr.cast(), len, offset) })
                })
            }
            call::WRITE => {
                let fd = self.fd(a0)?.as_raw_fd();
                in_place(window, input, |ptr, len| {
                    // SAFETY: `ptr..ptr + len` is inside the mapped data window; the kernel
                    // only reads it.
                    Ok(unsafe { libc::write(fd, ptr.cast(), len) })
                })
            }
            call::PWRITE => {
                let (fd, offset) = (self.fd(a0)?.as_raw_fd(), file_offset(a1)?);
                in_place(window, input, |ptr, len| {
                    // SAFETY: as for WRITE.
                    Ok(unsafe { libc::pwrite(fd, ptr.cast(), len, offset) })
                })
            }
            call::LSEEK => {
                let whence = match a2 {
                    0 => Whence::SeekSet,
                    1 => Whence::SeekCur,
                    2 => Whence::SeekEnd,
                    _ => return Err(Errno::EINVAL),
                };
                let position = lseek(self.fd(a0)?, a1 as i64, whence)?;
                Ok(position as u64)
            }
            call::FSTAT => {
                let stat = fstat(self.fd(a0)?)?;
                write_record(window, output, &file_stat(&stat).encode())
            }
            call::STAT => {
                let path = read_path(window, input)?;
                let file = self.resolve(&path, OFlag::O_PATH, 0)?;
                write_record(window, output, &file_stat(&fstat(&file)?).encode())
            }
            call::FSYNC => fsync(self.fd(a0)?).map(|()| 0),
            call::FTRUNCATE => {
                ftruncate(self.fd(a0)?, i64::try_from(a1).map_err(|_| Errno::EINVAL)?).map(|()| 0)
            }
            call::GETCWD => {
                let cwd = if self.cwd.as_os_str().is_empty() {
                    OsStr::new(".")
                } else {
                    self.cwd.as_os_str()
                };
                write_record(window, output, cwd.as_bytes())
            }
            call::CHDIR => {
                let path = read_path(window, input)?;
                let directory = self.resolve(&path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
                self.cwd = self.place_of(&directory)?;
                Ok(0)
            }
            call::MKDIR => {
                let path = read_path(window, input)?;
                let (parent, name) = self.parent_of(&path)?;
                mkdirat(
                    &parent,
                    name.as_path(),
                    Mode::from_bits_truncate(a0 as u32 & 0o7777),
                )
                .map(|()| 0)
            }
            call::RMDIR | call::UNLINK => {
                let path = read_path(window, input)?;
                let (parent, name) = self.parent_of(&path)?;
                let flag = if request.number == call::RMDIR {
                    UnlinkatFlags::RemoveDir
                } else {
                    UnlinkatFlags::NoRemoveDir
                };
                unlinkat(&parent, name.as_path(), flag).map(|()| 0)
            }
            call::RENAME => {
                let both = read_bytes(window, input)?;
                let split = both.iter().position(|b| *b == 0).ok_or(Errno::EINVAL)?;
                let from = checked_path(&both[..split])?;
                let to = checked_path(&both[split + 1..])?;
                let (from_parent, from_name) = self.parent_of(&from)?;
                let (to_parent, to_name) = self.parent_of(&to)?;
                nix::fcntl::renameat(
                    &from_parent,
                    from_name.as_path(),
                    &to_parent,
                    to_name.as_path(),
                )
                .map(|()| 0)
            }
            call::GETDENTS => self.read_dir(window, a0, output),
            call::GETPID => Ok(nix::unistd::gettid().as_raw() as u64),
            _ => Err(Errno::ENOSYS),
        }
    }

    fn open(&mut self, path: &Path, flags: u64, mode: u64) -> Result<u64, Errno> {
        if flags & !open_flags::ALLOWED != 0 {
            return Err(Errno::EINVAL);
        }
        if self.open_files() >= self.limits.open_files {
            return Err(Errno::EMFILE);
        }
        let flags = OFlag::from_bits_truncate(flags as i32) | OFlag::O_CLOEXEC;
        let file = self.resolve(path, flags, mode as u32 & 0o7777)?;
        let slot = match self.files.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.files.push(None);
                self.files.len() - 1
            }
        };
        self.files[slot] = Some(file);
        Ok(FIRST_FD + slot as u64)
    }

    fn slot(&self, fd: u64) -> Result<usize, Errno> {
        let slot = fd
            .checked_sub(FIRST_FD)
            .and_then(|slot| usize::try_from(slot).ok())
            .ok_or(Errno::EBADF)?;
        match self.files.get(slot) {
            Some(Some(_)) => Ok(slot),
            _ => Err(Errno::EBADF),
        }
    }

    fn fd(&self, fd: u64) -> Result<&OwnedFd, Errno> {
        if fd < FIRST_FD {
            return self
                .stdio
                .as_ref()
                .and_then(|fds| fds[fd as usize].as_ref())
                .ok_or(Errno::EBADF);
        }
        let slot = self.slot(fd)?;
        self.files[slot].as_ref().ok_or(Errno::EBADF)
    }

    /// `path` as seen from the working directory, still to be resolved under the root.
    /// Absolute paths are passed on as they are: `openat2` refuses them (`EXDEV`).
    fn joined(&self, path: &Path) -> PathBuf {
        if path.is_absolute() || self.cwd.as_os_str().is_empty() {
            path.to_path_buf()
        } else {
            self.cwd.join(path)
        }
    }

    /// Opens `path` under the root, never leaving it.
    pub fn resolve(&self, path: &Path, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
        // openat2 refuses a mode without O_CREAT (EINVAL), where open ignores it.
        let mode = if flags.contains(OFlag::O_CREAT) {
            mode
        } else {
            0
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.root.fd.as_fd(), self.joined(path).as_path(), how)
    }

    /// The directory holding `path`'s last component (resolved under the root), and that
    /// component. `.` and `..` as the last component are refused (`EINVAL`).
    fn parent_of(&self, path: &Path) -> Result<(OwnedFd, PathBuf), Errno> {
        let name = path.file_name().ok_or(Errno::EINVAL)?;
        if name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let directory = self.resolve(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        Ok((directory, PathBuf::from(name)))
    }

    /// Where the open directory `directory` is, relative to the root.
    fn place_of(&self, directory: &OwnedFd) -> Result<PathBuf, Errno> {
        let link = format!("/proc/self/fd/{}", directory.as_raw_fd());
        let path = std::fs::read_link(link).map_err(|_| Errno::EIO)?;
        let relative = path
            .strip_prefix(&self.root.path)
            .map_err(|_| Errno::EXDEV)?;
        Ok(relative.to_path_buf())
    }

    fn read_dir(&self, window: &DataWindow<'_>, fd: u64, output: BufferRef) -> Result<u64, Errno> {
        let directory = self.fd(fd)?;
        // Linux's records are larger than ours (19 bytes + name + padding against 2 + name),
        // so what fits in `output.len` of Linux's fits ours too.
        let mut raw = vec![0u8; output.len as usize];
        // SAFETY: `raw` is a live, writable buffer of `raw.len()` bytes.
        let got = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                directory.as_raw_fd(),
                raw.as_mut_ptr(),
                raw.len(),
            )
        };
        let got = usize::try_from(got).map_err(|_| Errno::last())?;
        let mut out = vec![0u8; output.len as usize];
        let mut used = 0;
        let mut at = 0;
        while at + 19 <= got {
            let record_len = usize::from(u16::from_le_bytes([raw[at + 16], raw[at + 17]]));
            if record_len < 19 || at + record_len > got {
                return Err(Errno::EIO);
            }
            let kind = match raw[at + 18] {
                libc::DT_REG => FileKind::File,
                libc::DT_DIR => FileKind::Directory,
                libc::DT_LNK => FileKind::Symlink,
                _ => FileKind::Other,
            };
            let name_field = &raw[at + 19..at + record_len];
            let name = &name_field[..name_field
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_field.len())];
            used += DirEntry { kind, name }
                .encode(&mut out[used..])
                .ok_or(Errno::EIO)?;
            at += record_len;
        }
        write_record(window, output, &out[..used])
    }
}

/// Whether call `number` takes an fd in `args[0]`.
fn takes_fd(number: u32) -> bool {
    matches!(
        number,
        call::READ
            | call::WRITE
            | call::CLOSE
            | call::FSTAT
            | call::LSEEK
            | call::PREAD
            | call::PWRITE
            | call::FSYNC
            | call::FTRUNCATE
            | call::GETDENTS
    )
}

/// Runs a system call on the bytes of `buffer` in the window, in place.
fn in_place(
    window: &DataWindow<'_>,
    buffer: BufferRef,
    call: impl FnOnce(*mut u8, usize) -> Result<isize, Errno>,
) -> Result<u64, Errno> {
    let (ptr, len) = window.raw_parts(buffer).map_err(|_| Errno::EFAULT)?;
    let done = call(ptr, len)?;
    u64::try_from(done).map_err(|_| Errno::last())
}

fn file_offset(offset: u64) -> Result<libc::off_t, Errno> {
    libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)
}

fn read_bytes(window: &DataWindow<'_>, buffer: BufferRef) -> Result<Vec<u8>, Errno> {
    if buffer.len as usize > 2 * PATH_MAX + 1 {
        return Err(Errno::ENAMETOOLONG);
    }
    let mut bytes = vec![0u8; buffer.len as usize];
    window.read(buffer, &mut bytes).map_err(|_| Errno::EFAULT)?;
    Ok(bytes)
}

fn read_path(window: &DataWindow<'_>, buffer: BufferRef) -> Result<PathBuf, Errno> {
    checked_path(&read_bytes(window, buffer)?)
}

/// A path from Lavender: non-empty, at most `PATH_MAX` bytes, no NUL.
fn checked_path(bytes: &[u8]) -> Result<PathBuf, Errno> {
    if bytes.is_empty() {
        return Err(Errno::ENOENT);
    }
    if bytes.len() > PATH_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if bytes.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(PathBuf::from(OsStr::from_bytes(bytes)))
}

/// Writes `bytes` to the front of `output`; their length, or `ERANGE` if they do not fit.
fn write_record(window: &DataWindow<'_>, output: BufferRef, bytes: &[u8]) -> Result<u64, Errno> {
    if bytes.len() > output.len as usize {
        return Err(Errno::ERANGE);
    }
    if !bytes.is_empty() {
        window
            .write(output.offset, bytes)
            .map_err(|_| Errno::EFAULT)?;
    }
    Ok(bytes.len() as u64)
}

fn file_stat(stat: &libc::stat) -> FileStat {
    FileStat {
        size: stat.st_size as u64,
        mode: stat.st_mode,
        nlink: stat.st_nlink as u32,
        ino: stat.st_ino,
        mtime_sec: stat.st_mtime,
        mtime_nsec: stat.st_mtime_nsec as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::cores::CoreId;
    use vmcall_proto::delegation::{dir_entries, WindowPlan, RINGS};
    use vmcall_proto::message::{Caller, SyscallFlags};
    use vmcall_proto::region::{CacheLine, SharedRegion};

    /// A served root in a fresh temporary directory, with a secret next to it.
    struct Fixture {
        base: PathBuf,
        root: Root,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let base = std::env::temp_dir()
                .join(format!("tandem-delegation-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(base.join("root/sub")).unwrap();
            std::fs::write(base.join("secret"), "outside").unwrap();
            std::fs::write(base.join("root/hello.txt"), "hello, Lavender\n").unwrap();
            std::os::unix::fs::symlink("/", base.join("root/to-root")).unwrap();
            std::os::unix::fs::symlink("/proc/self/root", base.join("root/to-proc")).unwrap();
            std::os::unix::fs::symlink("../secret", base.join("root/up")).unwrap();
            std::os::unix::fs::symlink("hello.txt", base.join("root/inside")).unwrap();
            let root = Root::open(&base.join("root")).unwrap();
            Fixture { base, root }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    /// A region laid out as the hypervisor lays out the one Lavender and Linux share.
    fn window(lines: &[CacheLine]) -> (DataWindow<'_>, WindowPlan) {
        let region = SharedRegion::from_cache_lines(lines);
        region.initialize(&RINGS, 0).unwrap();
        let view = region.attach().unwrap();
        let window = view.data_window();
        let plan = WindowPlan::for_region(&view).unwrap();
        (window, plan)
    }

    fn request(number: u32, args: [u64; 3], buffers: [BufferRef; 2]) -> SyscallRequest {
        SyscallRequest {
            request_id: 1,
            caller: Caller {
                core: CoreId::new(2).unwrap(),
                process: 7,
                thread: 0,
            },
            number,
            args: [args[0], args[1], args[2], 0, 0, 0],
            flags: SyscallFlags::CONTINUATION,
            buffers,
        }
    }

    /// Runs `number` with `input` in slice 0 of connection 1 and room for `output` bytes.
    fn run(
        context: &mut Context<'_>,
        (window, plan): (DataWindow<'_>, WindowPlan),
        number: u32,
        args: [u64; 3],
        input: &[u8],
        output: usize,
    ) -> (Result<u64, Errno>, Vec<u8>) {
        let slice = plan.slice(1, 0).unwrap();
        let input_ref = window.write(slice.offset, input).unwrap();
        let output_ref = if output == 0 {
            BufferRef::EMPTY
        } else {
            BufferRef {
                offset: slice.offset + 4096,
                len: output as u32,
            }
        };
        let result = context.run(&window, &request(number, args, [input_ref, output_ref]));
        let mut out = vec![0u8; output];
        if let Some(n) = result.ok().filter(|n| *n > 0) {
            let n = (n as usize).min(output);
            out.truncate(n);
            window
                .read(
                    BufferRef {
                        offset: output_ref.offset,
                        len: n as u32,
                    },
                    &mut out,
                )
                .unwrap();
        }
        (result, out)
    }

    fn lines() -> Vec<CacheLine> {
        (0..4096).map(|_| CacheLine::default()).collect()
    }

    #[test]
    fn files_round_trip_through_the_window() {
        let fixture = Fixture::new("round-trip");
        let lines = lines();
        let w = window(&lines);
        let mut context = Context::new(&fixture.root, Limits::default());
        let flags = open_flags::READ_WRITE | open_flags::CREATE | open_flags::TRUNCATE;
        let (fd, _) = run(
            &mut context,
            w,
            call::OPENAT,
            [flags, 0o600, 0],
            b"sub/new.bin",
            0,
        );
        let fd = fd.unwrap();
        assert_eq!(fd, FIRST_FD);
        let (written, _) = run(&mut context, w, call::WRITE, [fd, 0, 0], b"0123456789", 0);
        assert_eq!(written, Ok(10));
        let (read, bytes) = run(&mut context, w, call::PREAD, [fd, 4, 0], b"", 100);
        assert_eq!((read, bytes.as_slice()), (Ok(6), &b"456789"[..]));
        let (stat, record) = run(&mut context, w, call::FSTAT, [fd, 0, 0], b"", 48);
        assert_eq!(stat, Ok(48));
        let stat = FileStat::decode(&record).unwrap();
        assert_eq!(
            (stat.size, stat.kind(), stat.mode & 0o777),
            (10, FileKind::File, 0o600)
        );
        assert_eq!(
            run(&mut context, w, call::LSEEK, [fd, 2, 0], b"", 0).0,
            Ok(2)
        );
        let (read, bytes) = run(&mut context, w, call::READ, [fd, 0, 0], b"", 3);
        assert_eq!((read, bytes.as_slice()), (Ok(3), &b"234"[..]));
        assert_eq!(
            run(&mut context, w, call::FTRUNCATE, [fd, 4, 0], b"", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(&mut context, w, call::FSYNC, [fd, 0, 0], b"", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(&mut context, w, call::CLOSE, [fd, 0, 0], b"", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(&mut context, w, call::CLOSE, [fd, 0, 0], b"", 0).0,
            Err(Errno::EBADF)
        );
        assert_eq!(
            std::fs::read(fixture.base.join("root/sub/new.bin")).unwrap(),
            b"0123"
        );
    }

    #[test]
    fn the_agents_own_descriptors_are_unreachable() {
        let fixture = Fixture::new("own-fds");
        let lines = lines();
        let w = window(&lines);
        let mut context = Context::new(&fixture.root, Limits::default());
        for fd in [0, 1, 2, 3, 1000, u64::MAX] {
            let (result, _) = run(&mut context, w, call::WRITE, [fd, 0, 0], b"x", 0);
            assert_eq!(result, Err(Errno::EBADF), "fd {fd}");
        }
    }

    #[test]
    fn escapes_fail_inside_linux_and_touch_nothing() {
        let fixture = Fixture::new("escapes");
        let lines = lines();
        let w = window(&lines);
        let mut context = Context::new(&fixture.root, Limits::default());
        let create = open_flags::WRITE_ONLY | open_flags::CREATE | open_flags::TRUNCATE;
        for path in [
            &b"../secret"[..],
            b"sub/../../secret",
            b"/etc/passwd",
            b"to-root/etc/passwd",
            b"to-proc/etc/passwd",
            b"up",
            b"/proc/self/root/etc/passwd",
        ] {
            for flags in [open_flags::READ_ONLY, create] {
                let (result, _) = run(&mut context, w, call::OPENAT, [flags, 0o644, 0], path, 0);
                let errno = result.expect_err(&String::from_utf8_lossy(path));
                assert!(
                    matches!(
                        errno,
                        Errno::EXDEV | Errno::ELOOP | Errno::ENOENT | Errno::EACCES
                    ),
                    "{}: {errno}",
                    String::from_utf8_lossy(path)
                );
            }
        }
        for (number, input) in [
            (call::UNLINK, &b"../secret"[..]),
            (call::MKDIR, b"../made"),
            (call::RMDIR, b"to-root/tmp"),
            (call::RENAME, b"hello.txt\0../stolen"),
            (call::CHDIR, b".."),
            (call::STAT, b"up"),
        ] {
            let (result, _) = run(&mut context, w, number, [0o755, 0, 0], input, 48);
            assert!(
                result.is_err(),
                "{number} {}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            std::fs::read_to_string(fixture.base.join("secret")).unwrap(),
            "outside"
        );
        assert!(!fixture.base.join("made").exists());
        assert!(!fixture.base.join("stolen").exists());
        assert!(fixture.base.join("root/hello.txt").exists());
        // A symlink that stays inside is followed.
        let (result, _) = run(&mut context, w, call::OPENAT, [0, 0, 0], b"inside", 0);
        assert!(result.is_ok());
    }

    #[test]
    fn directories_and_the_working_directory() {
        let fixture = Fixture::new("directories");
        let lines = lines();
        let w = window(&lines);
        let mut context = Context::new(&fixture.root, Limits::default());
        assert_eq!(
            run(&mut context, w, call::MKDIR, [0o755, 0, 0], b"made", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(&mut context, w, call::CHDIR, [0; 3], b"made", 0).0,
            Ok(0)
        );
        let (_, cwd) = run(&mut context, w, call::GETCWD, [0; 3], b"", 64);
        assert_eq!(cwd, b"made");
        let flags = open_flags::WRITE_ONLY | open_flags::CREATE;
        let (fd, _) = run(&mut context, w, call::OPENAT, [flags, 0o644, 0], b"f", 0);
        assert_eq!(
            run(&mut context, w, call::CLOSE, [fd.unwrap(), 0, 0], b"", 0).0,
            Ok(0)
        );
        assert!(fixture.base.join("root/made/f").exists());
        assert_eq!(
            run(&mut context, w, call::RENAME, [0; 3], b"f\0../g", 0).0,
            Ok(0)
        );
        assert!(fixture.base.join("root/g").exists());
        // `..` from the working directory is fine while it stays under the root.
        assert_eq!(run(&mut context, w, call::CHDIR, [0; 3], b"..", 0).0, Ok(0));
        let (_, cwd) = run(&mut context, w, call::GETCWD, [0; 3], b"", 64);
        assert_eq!(cwd, b".");
        let (dir, _) = run(
            &mut context,
            w,
            call::OPENAT,
            [open_flags::DIRECTORY, 0, 0],
            b".",
            0,
        );
        let dir = dir.unwrap();
        let mut names = Vec::new();
        loop {
            let (got, bytes) = run(&mut context, w, call::GETDENTS, [dir, 0, 0], b"", 1024);
            if got.unwrap() == 0 {
                break;
            }
            for entry in dir_entries(&bytes) {
                let entry = entry.unwrap();
                names.push((String::from_utf8(entry.name.to_vec()).unwrap(), entry.kind));
            }
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(names.contains(&("g".into(), FileKind::File)), "{names:?}");
        assert!(
            names.contains(&("made".into(), FileKind::Directory)),
            "{names:?}"
        );
        assert!(
            names.contains(&("to-root".into(), FileKind::Symlink)),
            "{names:?}"
        );
        assert_eq!(run(&mut context, w, call::UNLINK, [0; 3], b"g", 0).0, Ok(0));
        assert_eq!(
            run(&mut context, w, call::RMDIR, [0; 3], b"made", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(&mut context, w, call::RMDIR, [0; 3], b"sub/..", 0).0,
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn limits_and_bad_arguments_are_clear_errors() {
        let fixture = Fixture::new("limits");
        let lines = lines();
        let w = window(&lines);
        let mut context = Context::new(&fixture.root, Limits { open_files: 2 });
        for _ in 0..2 {
            assert!(run(&mut context, w, call::OPENAT, [0; 3], b"hello.txt", 0)
                .0
                .is_ok());
        }
        assert_eq!(
            run(&mut context, w, call::OPENAT, [0; 3], b"hello.txt", 0).0,
            Err(Errno::EMFILE)
        );
        assert_eq!(context.open_files(), 2);
        assert_eq!(
            run(&mut context, w, call::CLOSE, [FIRST_FD, 0, 0], b"", 0).0,
            Ok(0)
        );
        assert_eq!(
            run(
                &mut context,
                w,
                call::OPENAT,
                [0o4000000, 0, 0],
                b"hello.txt",
                0
            )
            .0,
            Err(Errno::EINVAL),
            "O_PATH and other flags outside the allowed set"
        );
        assert_eq!(
            run(&mut context, w, call::OPENAT, [0; 3], b"", 0).0,
            Err(Errno::ENOENT)
        );
        assert_eq!(
            run(&mut context, w, call::OPENAT, [0; 3], b"a\0b", 0).0,
            Err(Errno::EINVAL)
        );
        assert_eq!(
            run(&mut context, w, 9999, [0; 3], b"", 0).0,
            Err(Errno::ENOSYS)
        );
        let (stat, _) = run(&mut context, w, call::STAT, [0; 3], b"hello.txt", 8);
        assert_eq!(stat, Err(Errno::ERANGE), "a stat record needs 48 bytes");
    }
}
