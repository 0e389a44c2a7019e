//! Files, through Linux: a std-like API over the `delegate` system call. Every operation runs
//! on Linux in this process's own context (its fd table and working directory), confined to
//! the directory the PV agent serves; errors are Linux errno values ([`Errno`]).
//!
//! Paths are relative to the working directory (initially the served root); absolute paths
//! and paths leaving the root fail (`EXDEV`, `ENOENT` or `EACCES`, as Linux decides).
//! One call moves at most the kernel's slice of the shared window; [`File::read`] and
//! [`File::write`] may do less than asked, [`File::read_exact`] and [`File::write_all`] loop.
//! Large I/O goes faster in a [`WindowBuffer`]: memory in the shared window itself, which
//! Linux reads and writes in place, and which one call may fill whole.

use core::fmt;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

use lavender_abi::{Delegation, WINDOW_BUFFER_BASE};
use vmcall_proto::delegation::{call, dir_entries, errno, open_flags};
pub use vmcall_proto::delegation::{FileKind, FileStat};

/// A Linux errno value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u16);

impl Errno {
    pub const ENOENT: Errno = Errno(errno::ENOENT);
    pub const EIO: Errno = Errno(errno::EIO);
    pub const EBADF: Errno = Errno(errno::EBADF);
    pub const EAGAIN: Errno = Errno(errno::EAGAIN);
    pub const EACCES: Errno = Errno(errno::EACCES);
    pub const EFAULT: Errno = Errno(errno::EFAULT);
    pub const EEXIST: Errno = Errno(errno::EEXIST);
    pub const EXDEV: Errno = Errno(errno::EXDEV);
    pub const ENOTDIR: Errno = Errno(errno::ENOTDIR);
    pub const EISDIR: Errno = Errno(errno::EISDIR);
    pub const EINVAL: Errno = Errno(errno::EINVAL);
    pub const EMFILE: Errno = Errno(errno::EMFILE);
    pub const ENAMETOOLONG: Errno = Errno(errno::ENAMETOOLONG);
    pub const ENOSYS: Errno = Errno(errno::ENOSYS);
    pub const ENOTEMPTY: Errno = Errno(errno::ENOTEMPTY);
    pub const ELOOP: Errno = Errno(errno::ELOOP);

    /// The symbolic name (`ENOENT`), or `E?` for one this library does not name.
    pub fn name(self) -> &'static str {
        match self.0 {
            errno::EPERM => "EPERM",
            errno::ENOENT => "ENOENT",
            errno::EIO => "EIO",
            errno::E2BIG => "E2BIG",
            errno::EBADF => "EBADF",
            errno::EAGAIN => "EAGAIN",
            errno::ENOMEM => "ENOMEM",
            errno::EACCES => "EACCES",
            errno::EFAULT => "EFAULT",
            errno::EEXIST => "EEXIST",
            errno::EXDEV => "EXDEV",
            errno::ENOTDIR => "ENOTDIR",
            errno::EISDIR => "EISDIR",
            errno::EINVAL => "EINVAL",
            errno::EMFILE => "EMFILE",
            errno::ENOSPC => "ENOSPC",
            errno::ENAMETOOLONG => "ENAMETOOLONG",
            errno::ENOSYS => "ENOSYS",
            errno::ENOTEMPTY => "ENOTEMPTY",
            errno::ELOOP => "ELOOP",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

pub type Result<T> = core::result::Result<T, Errno>;

/// One delegated call: `number` with `args`, `input` sent, `output` filled.
fn delegate(number: u32, args: [u64; 3], input: &[u8], output: &mut [u8]) -> Result<u64> {
    #[cfg(target_os = "none")]
    {
        let request = Delegation {
            number,
            flags: Delegation::CONTINUATION,
            args,
            input: input.as_ptr() as u64,
            input_length: input.len() as u64,
            output: output.as_mut_ptr() as u64,
            output_length: output.len() as u64,
        };
        crate::sys::delegate(&request).map_err(Errno)
    }
    #[cfg(not(target_os = "none"))]
    {
        let _ = (number, args, input, output, Delegation::SIZE);
        Err(Errno::ENOSYS)
    }
}

/// Path bytes, refused with `EINVAL` if they hold a NUL (Linux would cut the path there).
fn path_bytes(path: &str) -> Result<&[u8]> {
    if path.as_bytes().contains(&0) || path.is_empty() {
        return Err(Errno(if path.is_empty() {
            errno::ENOENT
        } else {
            errno::EINVAL
        }));
    }
    Ok(path.as_bytes())
}

/// How to open a file, as `std::fs::OpenOptions`.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    append: bool,
    truncate: bool,
    create: bool,
    create_new: bool,
    mode: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    pub fn new() -> Self {
        Self {
            read: false,
            write: false,
            append: false,
            truncate: false,
            create: false,
            create_new: false,
            mode: 0o644,
        }
    }
    pub fn read(&mut self, on: bool) -> &mut Self {
        self.read = on;
        self
    }
    pub fn write(&mut self, on: bool) -> &mut Self {
        self.write = on;
        self
    }
    pub fn append(&mut self, on: bool) -> &mut Self {
        self.append = on;
        self
    }
    pub fn truncate(&mut self, on: bool) -> &mut Self {
        self.truncate = on;
        self
    }
    pub fn create(&mut self, on: bool) -> &mut Self {
        self.create = on;
        self
    }
    pub fn create_new(&mut self, on: bool) -> &mut Self {
        self.create_new = on;
        self
    }
    /// Permission bits of a file this creates (before the context's umask).
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    /// The Linux `O_*` flags these options mean.
    pub fn flags(&self) -> u64 {
        let writing = self.write || self.append;
        let mut flags = match (self.read, writing) {
            (true, true) => open_flags::READ_WRITE,
            (false, true) => open_flags::WRITE_ONLY,
            _ => open_flags::READ_ONLY,
        };
        if self.append {
            flags |= open_flags::APPEND;
        }
        if self.truncate {
            flags |= open_flags::TRUNCATE;
        }
        if self.create_new {
            flags |= open_flags::CREATE | open_flags::EXCLUSIVE;
        } else if self.create {
            flags |= open_flags::CREATE;
        }
        flags
    }

    pub fn open(&self, path: &str) -> Result<File> {
        open_raw(path, self.flags(), self.mode)
    }
}

fn open_raw(path: &str, flags: u64, mode: u32) -> Result<File> {
    let fd = delegate(
        call::OPENAT,
        [flags, u64::from(mode), 0],
        path_bytes(path)?,
        &mut [],
    )?;
    Ok(File { fd })
}

/// Where [`File::seek`] counts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekFrom {
    Start(u64),
    Current(i64),
    End(i64),
}

/// An open file of this process's Linux-side context; closed on drop.
#[derive(Debug)]
pub struct File {
    fd: u64,
}

impl File {
    /// Opens `path` for reading.
    pub fn open(path: &str) -> Result<File> {
        OpenOptions::new().read(true).open(path)
    }

    /// Creates `path` (or truncates it) for writing.
    pub fn create(path: &str) -> Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }

    /// Standard input: fd 0 of the context, which Linux fills with the launcher's own when
    /// the process was started by `vmctl exec` (otherwise reads fail with `EBADF`).
    pub fn standard_input() -> File {
        File { fd: 0 }
    }

    /// The context's descriptor number.
    pub fn fd(&self) -> u64 {
        self.fd
    }

    /// Reads up to `buffer.len()` bytes; 0 at the end of the file.
    pub fn read(&mut self, buffer: &mut [u8]) -> Result<usize> {
        delegate(call::READ, [self.fd, 0, 0], &[], buffer).map(|n| n as usize)
    }

    /// Fills `buffer` completely, or fails (`EIO` if the file ends first).
    pub fn read_exact(&mut self, mut buffer: &mut [u8]) -> Result<()> {
        while !buffer.is_empty() {
            match self.read(buffer)? {
                0 => return Err(Errno::EIO),
                n => buffer = &mut buffer[n..],
            }
        }
        Ok(())
    }

    /// Writes some of `data`; the count written.
    pub fn write(&mut self, data: &[u8]) -> Result<usize> {
        delegate(call::WRITE, [self.fd, 0, 0], data, &mut []).map(|n| n as usize)
    }

    /// Writes all of `data`.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            match self.write(data)? {
                0 => return Err(Errno::EIO),
                n => data = &data[n..],
            }
        }
        Ok(())
    }

    /// Reads at file offset `offset` without moving the file position.
    pub fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<usize> {
        delegate(call::PREAD, [self.fd, offset, 0], &[], buffer).map(|n| n as usize)
    }

    /// Writes at file offset `offset` without moving the file position.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<usize> {
        delegate(call::PWRITE, [self.fd, offset, 0], data, &mut []).map(|n| n as usize)
    }

    /// Moves the file position; the new position.
    pub fn seek(&mut self, to: SeekFrom) -> Result<u64> {
        let (offset, whence) = match to {
            SeekFrom::Start(offset) => (offset, 0),
            SeekFrom::Current(delta) => (delta as u64, 1),
            SeekFrom::End(delta) => (delta as u64, 2),
        };
        delegate(call::LSEEK, [self.fd, offset, whence], &[], &mut [])
    }

    pub fn metadata(&self) -> Result<FileStat> {
        let mut record = [0u8; FileStat::ENCODED_LEN];
        let len = delegate(call::FSTAT, [self.fd, 0, 0], &[], &mut record)? as usize;
        record
            .get(..len)
            .and_then(FileStat::decode)
            .ok_or(Errno::EIO)
    }

    pub fn sync_all(&self) -> Result<()> {
        delegate(call::FSYNC, [self.fd, 0, 0], &[], &mut []).map(drop)
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        delegate(call::FTRUNCATE, [self.fd, len, 0], &[], &mut []).map(drop)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // As with std: a failed close has nowhere to be reported.
        let _ = delegate(call::CLOSE, [self.fd, 0, 0], &[], &mut []);
    }
}

/// The status of `path` (symlinks followed).
pub fn metadata(path: &str) -> Result<FileStat> {
    let mut record = [0u8; FileStat::ENCODED_LEN];
    let len = delegate(call::STAT, [0; 3], path_bytes(path)?, &mut record)? as usize;
    record
        .get(..len)
        .and_then(FileStat::decode)
        .ok_or(Errno::EIO)
}

pub fn remove_file(path: &str) -> Result<()> {
    delegate(call::UNLINK, [0; 3], path_bytes(path)?, &mut []).map(drop)
}

pub fn create_dir(path: &str) -> Result<()> {
    delegate(call::MKDIR, [0o755, 0, 0], path_bytes(path)?, &mut []).map(drop)
}

pub fn remove_dir(path: &str) -> Result<()> {
    delegate(call::RMDIR, [0; 3], path_bytes(path)?, &mut []).map(drop)
}

/// Renames `from` to `to` (both paths at most 1 KiB together).
pub fn rename(from: &str, to: &str) -> Result<()> {
    let (from, to) = (path_bytes(from)?, path_bytes(to)?);
    let mut both = [0u8; 1024];
    let len = from.len() + 1 + to.len();
    let buffer = both.get_mut(..len).ok_or(Errno::ENAMETOOLONG)?;
    buffer[..from.len()].copy_from_slice(from);
    buffer[from.len() + 1..].copy_from_slice(to);
    delegate(call::RENAME, [0; 3], buffer, &mut []).map(drop)
}

/// The working directory, relative to the served root (`.` there), written into `buffer`.
pub fn current_dir(buffer: &mut [u8]) -> Result<&str> {
    let len = delegate(call::GETCWD, [0; 3], &[], buffer)? as usize;
    buffer
        .get(..len)
        .and_then(|bytes| core::str::from_utf8(bytes).ok())
        .ok_or(Errno::EIO)
}

pub fn set_current_dir(path: &str) -> Result<()> {
    delegate(call::CHDIR, [0; 3], path_bytes(path)?, &mut []).map(drop)
}

/// Calls `visit(kind, name)` for each entry of directory `path` (`.` and `..` left out), in
/// Linux's order; the number of entries.
pub fn read_dir(path: &str, mut visit: impl FnMut(FileKind, &str)) -> Result<usize> {
    let directory = open_raw(path, open_flags::DIRECTORY, 0)?;
    let mut buffer = [0u8; 2048];
    let mut count = 0;
    loop {
        let len = delegate(call::GETDENTS, [directory.fd, 0, 0], &[], &mut buffer)? as usize;
        if len == 0 {
            return Ok(count);
        }
        for entry in dir_entries(buffer.get(..len).ok_or(Errno::EIO)?) {
            let entry = entry.map_err(|()| Errno::EIO)?;
            let name = core::str::from_utf8(entry.name).unwrap_or("?");
            if name != "." && name != ".." {
                visit(entry.kind, name);
                count += 1;
            }
        }
    }
}

/// Memory in the data window Lavender shares with Linux, for large I/O without copies: a
/// read into it or a write from it (at an 8-byte aligned position) names its bytes to Linux
/// as they are, where any other buffer is copied through the kernel's slice of the window.
/// One per process.
pub struct WindowBuffer {
    bytes: &'static mut [u8],
}

/// Whether this process took its window buffer.
static WINDOW_BUFFER_TAKEN: AtomicBool = AtomicBool::new(false);

impl WindowBuffer {
    /// The process's window buffer (zeroed), the first time it is asked for; `None` after
    /// that, or when there is none (no window shared with Linux, or one too small for bulk
    /// extents): use an ordinary buffer then.
    pub fn take() -> Option<WindowBuffer> {
        if WINDOW_BUFFER_TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        let len = usize::try_from(window_buffer_len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: the kernel mapped `len` bytes at WINDOW_BUFFER_BASE, readable and writable,
        // for this process alone, and they stay mapped while it lives; the flag above makes
        // this the only reference to them. Linux writes them only during a call that names
        // them, which borrows this buffer mutably for its duration.
        let bytes = unsafe { core::slice::from_raw_parts_mut(WINDOW_BUFFER_BASE as *mut u8, len) };
        Some(WindowBuffer { bytes })
    }
}

/// The `window_buffer` system call: the length mapped, 0 for none (always none on the host).
fn window_buffer_len() -> u64 {
    #[cfg(target_os = "none")]
    {
        crate::sys::window_buffer()
    }
    #[cfg(not(target_os = "none"))]
    {
        0
    }
}

/// A buffer for large I/O: the process's window buffer when it can take it (Linux reads and
/// writes it in place), else `own`; and whether it is the window buffer.
pub fn large_io_buffer(own: &mut [u8]) -> (&mut [u8], bool) {
    match WindowBuffer::take() {
        Some(window) => (window.bytes, true),
        None => (own, false),
    }
}

impl Deref for WindowBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl DerefMut for WindowBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

/// The null delegated call (a round trip and nothing else): the Linux-side context's thread
/// id. It carries the TSC at its sending (`sys::tsc`), so Linux's service can tell
/// how long it waited for a worker.
pub fn null_call() -> Result<u64> {
    #[cfg(target_os = "none")]
    let sent = crate::sys::tsc();
    #[cfg(not(target_os = "none"))]
    let sent = 0;
    delegate(call::GETPID, [sent, 0, 0], &[], &mut [])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_options_map_to_linux_flags() {
        assert_eq!(OpenOptions::new().read(true).flags(), 0);
        assert_eq!(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .flags(),
            0o1101
        );
        assert_eq!(OpenOptions::new().read(true).append(true).flags(), 0o2002);
        assert_eq!(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .create(true)
                .flags(),
            0o301
        );
    }

    #[test]
    fn errno_names() {
        assert_eq!(Errno::EXDEV.name(), "EXDEV");
        assert_eq!(format!("{}", Errno(2)), "ENOENT (2)");
        assert_eq!(Errno(999).name(), "E?");
        assert_eq!(path_bytes(""), Err(Errno::ENOENT));
        assert_eq!(path_bytes("a\0b"), Err(Errno::EINVAL));
    }
}
