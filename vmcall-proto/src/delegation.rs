//! System-call delegation over the region Lavender and Linux share: which rings and which part
//! of the data window belong to which connection, the calls a [`SyscallRequest`] may name and
//! the records the server writes back.
//!
//! **Connections.** Connection 0 is the control connection (process commands from Linux,
//! process-state notifications from Lavender); connections `1..=PROCESS_CONNECTIONS` are each
//! lent to one Lavender process at a time, from its first delegated call until it exits.
//! Connection `c` owns ring `2c` (Lavender → Linux: requests, notifications) and ring `2c + 1`
//! (Linux → Lavender: replies, commands), and [`CALLS_IN_FLIGHT`] equal slices of the data
//! window ([`WindowPlan`]), one per call it may have in flight; in a large enough window, a
//! process connection also owns a page-aligned bulk extent, which its process maps and does
//! large I/O in without copies.
//!
//! **Calls.** A request's `number` is the Linux x86-64 system-call number of the operation;
//! pointers never cross: paths and data to write are in `buffers[0]` (read by Linux), and what
//! Linux returns (read data, a [`FileStat`], directory entries, the working directory) goes
//! to `buffers[1]`, whose length is the most Linux may write. A call that fills `buffers[1]`
//! returns the number of bytes it wrote. Each buffer of a request lies in one slice of the
//! caller's connection or in its bulk extent; the server refuses anything else with `EFAULT`.
//!
//! **Liveness.** The data window's first [`SERVICE_BYTES`] hold [`ServiceLiveness`]: the
//! server's *epoch* (which server generation serves the region) and its *heartbeat*, both
//! written by the server alone. A request's id carries the low byte of the epoch the caller
//! saw ([`request_id`]); a server of another epoch answers it `EIO` without running it, so a
//! call sent to a server that died is never run by its successor.
//!
//! [`SyscallRequest`]: crate::message::SyscallRequest

use crate::region::{BufferRef, RegionView, RingSpec, DATA_ALIGN};
use crate::ring::SlotFormat;
use crate::sync::{AtomicU64, Ordering};

/// Connections lent to Lavender processes (besides the control connection 0).
pub const PROCESS_CONNECTIONS: u32 = 8;
/// Every connection, the control one included.
pub const CONNECTIONS: u32 = 1 + PROCESS_CONNECTIONS;
/// Calls one connection may have in flight at once (threads of one process).
pub const CALLS_IN_FLIGHT: u32 = 4;
/// Every ring of the region: a pair per connection.
pub const RING_COUNT: u32 = 2 * CONNECTIONS;
/// Each ring: 16 slots of 128 bytes, framed (a 92-byte request fits in one slot).
pub const RING: RingSpec = RingSpec {
    slot_count: 16,
    slot_size: 128,
    format: SlotFormat::Framed,
};
/// The ring layout the region's creator asks for.
pub const RINGS: [RingSpec; RING_COUNT as usize] = [RING; RING_COUNT as usize];

/// Ring carrying Lavender → Linux messages of `connection`.
pub const fn to_linux_ring(connection: u32) -> u32 {
    2 * connection
}

/// Ring carrying Linux → Lavender messages of `connection`.
pub const fn to_lavender_ring(connection: u32) -> u32 {
    2 * connection + 1
}

/// Bytes at the data window's start that hold [`ServiceLiveness`] (one cache line); the
/// slices follow.
pub const SERVICE_BYTES: u32 = 64;

/// Longest interval between two heartbeats of a live server.
pub const HEARTBEAT_PERIOD_MS: u64 = 50;
/// A heartbeat unchanged for this long means the server is dead (20 periods: a live server
/// delayed by its scheduler is not mistaken for a dead one).
pub const SILENCE_MS: u64 = 1000;

/// The server's liveness words, in the data window's first cache line: word 0 the epoch
/// (0: no server has attached yet; each server that attaches adds one), word 1 the heartbeat
/// (a counter the server advances at least every [`HEARTBEAT_PERIOD_MS`]). Only the server
/// writes them; the client only compares what it reads with what it read before, so any
/// value is harmless.
#[derive(Clone, Copy)]
pub struct ServiceLiveness<'a> {
    words: &'a [AtomicU64; 2],
}

impl<'a> ServiceLiveness<'a> {
    /// The liveness words of a data window given as words; `None` if it is too short.
    pub fn new(window_words: &'a [AtomicU64]) -> Option<Self> {
        let words = window_words.get(..2)?.try_into().ok()?;
        Some(Self { words })
    }

    pub fn epoch(&self) -> u64 {
        self.words[0].load(Ordering::Acquire)
    }

    pub fn heartbeat(&self) -> u64 {
        self.words[1].load(Ordering::Acquire)
    }

    /// A server attaches: the next epoch (never 0), published before it serves anything.
    pub fn begin_epoch(&self) -> u64 {
        let epoch = self.epoch().wrapping_add(1).max(1);
        self.words[0].store(epoch, Ordering::Release);
        self.beat();
        epoch
    }

    /// The server is alive.
    pub fn beat(&self) {
        self.words[1].fetch_add(1, Ordering::AcqRel);
    }
}

/// The request id of call `sequence` in call slot `slot`, sent while `epoch` was published:
/// `sequence << 16 | epoch's low byte << 8 | slot`.
pub const fn request_id(sequence: u64, epoch: u64, slot: u8) -> u64 {
    sequence << 16 | (epoch & 0xff) << 8 | slot as u64
}

/// The call slot a request id names.
pub const fn request_slot(request_id: u64) -> u8 {
    request_id as u8
}

/// Whether a request id was sent to the server of `epoch` (its low byte).
pub const fn addressed_to(request_id: u64, epoch: u64) -> bool {
    (request_id >> 8) & 0xff == epoch & 0xff
}

/// Most bytes one call slice holds: what a window has beyond the slices' needs goes to the
/// bulk extents.
pub const MAX_SLICE_BYTES: u32 = 64 * 1024;
/// The smallest bulk extent a plan gives; below it a window has none.
pub const MIN_BULK_BYTES: u32 = 64 * 1024;
/// Bulk extents start and end on page boundaries of the region, so a guest can map one into
/// a process as it is.
pub const PAGE_BYTES: u32 = 4096;

/// How the data window is cut: after [`SERVICE_BYTES`], `CONNECTIONS × CALLS_IN_FLIGHT`
/// equal slices, 8-byte aligned, in connection order, each at most [`MAX_SLICE_BYTES`]; then,
/// in a window large enough, one **bulk extent** per process connection, page-aligned in the
/// region. A Lavender process maps its connection's bulk extent into its address space and
/// does large I/O straight in it: its calls name the extent's bytes, and neither guest copies
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPlan {
    slice_len: u32,
    /// Offset of the first bulk extent in the window (0 when there are none).
    bulk_start: u32,
    /// Bytes of each bulk extent, a multiple of [`PAGE_BYTES`] (0: the window has none).
    bulk_len: u32,
}

impl WindowPlan {
    /// The plan for a window of `window_len` bytes that starts `window_start` bytes into its
    /// (page-aligned) region; `None` if a slice would be smaller than one page (too small a
    /// region to be useful).
    pub fn new(window_start: u64, window_len: u64) -> Option<Self> {
        let slices = u64::from(CONNECTIONS * CALLS_IN_FLIGHT);
        let slice_len = (window_len.saturating_sub(u64::from(SERVICE_BYTES)) / slices)
            .min(u64::from(MAX_SLICE_BYTES))
            & !(u64::from(DATA_ALIGN) - 1);
        if slice_len < 4096 {
            return None;
        }
        let page = u64::from(PAGE_BYTES);
        let slices_end = u64::from(SERVICE_BYTES) + slices * slice_len;
        // The first offset at or after the slices that is a page boundary of the region.
        let bulk_start =
            (window_start % page + slices_end).next_multiple_of(page) - window_start % page;
        let per_connection =
            (window_len.saturating_sub(bulk_start) / u64::from(PROCESS_CONNECTIONS)) & !(page - 1);
        let fits =
            bulk_start + per_connection * u64::from(PROCESS_CONNECTIONS) <= u64::from(u32::MAX);
        let (bulk_start, bulk_len) = if per_connection >= u64::from(MIN_BULK_BYTES) && fits {
            (bulk_start as u32, per_connection as u32)
        } else {
            (0, 0)
        };
        Some(Self {
            slice_len: slice_len as u32,
            bulk_start,
            bulk_len,
        })
    }

    /// The plan for the data window of an attached region.
    pub fn for_region(view: &RegionView<'_>) -> Option<Self> {
        let header = view.header();
        Self::new(header.data_window_offset, header.data_window_size)
    }

    /// Bytes of one slice: the most one call can move through a slice.
    pub fn slice_len(&self) -> u32 {
        self.slice_len
    }

    /// Slice `slot` (`< CALLS_IN_FLIGHT`) of `connection` (`< CONNECTIONS`), or `None`.
    pub fn slice(&self, connection: u32, slot: u32) -> Option<BufferRef> {
        if connection >= CONNECTIONS || slot >= CALLS_IN_FLIGHT {
            return None;
        }
        let index = connection * CALLS_IN_FLIGHT + slot;
        Some(BufferRef {
            offset: SERVICE_BYTES + index * self.slice_len,
            len: self.slice_len,
        })
    }

    /// The bulk extent of process connection `connection` (`1..CONNECTIONS`), or `None`
    /// (the control connection has none, nor has any connection of a small window).
    pub fn bulk(&self, connection: u32) -> Option<BufferRef> {
        if self.bulk_len == 0 || connection == 0 || connection >= CONNECTIONS {
            return None;
        }
        Some(BufferRef {
            offset: self.bulk_start + (connection - 1) * self.bulk_len,
            len: self.bulk_len,
        })
    }

    /// Whether `buffer` is [`BufferRef::EMPTY`] or starts 8-aligned inside one slice of
    /// `connection` or inside its bulk extent, and ends in it.
    pub fn belongs_to(&self, connection: u32, buffer: BufferRef) -> bool {
        if buffer.len == 0 {
            return buffer == BufferRef::EMPTY;
        }
        if buffer.offset % DATA_ALIGN != 0 || buffer.offset < SERVICE_BYTES {
            return false;
        }
        let end = u64::from(buffer.offset) + u64::from(buffer.len);
        if let Some(bulk) = self.bulk(connection) {
            if buffer.offset >= bulk.offset && end <= u64::from(bulk.offset) + u64::from(bulk.len) {
                return true;
            }
        }
        let index = (buffer.offset - SERVICE_BYTES) / self.slice_len;
        let slice_start = u64::from(SERVICE_BYTES) + u64::from(index) * u64::from(self.slice_len);
        index / CALLS_IN_FLIGHT == connection
            && connection < CONNECTIONS
            && end <= slice_start + u64::from(self.slice_len)
    }
}

/// The operations a delegated call may name: Linux x86-64 system-call numbers, with the
/// argument conventions above (`args` in order, then the two buffers).
pub mod call {
    /// `args[0]` = fd, `buffers[1]` = destination. Returns the bytes read.
    pub const READ: u32 = 0;
    /// `args[0]` = fd, `buffers[0]` = data. Returns the bytes written.
    pub const WRITE: u32 = 1;
    /// `args[0]` = fd.
    pub const CLOSE: u32 = 3;
    /// `args[0]` = fd, `buffers[1]` = a [`super::FileStat`] record.
    pub const FSTAT: u32 = 5;
    /// `args[0]` = fd, `args[1]` = offset (i64), `args[2]` = whence (0 set, 1 cur, 2 end).
    pub const LSEEK: u32 = 8;
    /// `args[0]` = fd, `args[1]` = file offset, `buffers[1]` = destination.
    pub const PREAD: u32 = 17;
    /// `args[0]` = fd, `args[1]` = file offset, `buffers[0]` = data.
    pub const PWRITE: u32 = 18;
    /// The null call: nothing but the round trip. Returns the Linux-side context's thread id.
    pub const GETPID: u32 = 39;
    /// `args[0]` = fd.
    pub const FSYNC: u32 = 74;
    /// `args[0]` = fd, `args[1]` = length.
    pub const FTRUNCATE: u32 = 77;
    /// `buffers[1]` = the working directory, relative to the root (`.` at the root).
    pub const GETCWD: u32 = 79;
    /// `buffers[0]` = path.
    pub const CHDIR: u32 = 80;
    /// `buffers[0]` = `old NUL new`.
    pub const RENAME: u32 = 82;
    /// `buffers[0]` = path, `args[0]` = mode.
    pub const MKDIR: u32 = 83;
    /// `buffers[0]` = path.
    pub const RMDIR: u32 = 84;
    /// `buffers[0]` = path.
    pub const UNLINK: u32 = 87;
    /// `args[0]` = fd of a directory, `buffers[1]` = [`super::DirEntry`] records. Returns the
    /// bytes written; 0 at the end of the directory.
    pub const GETDENTS: u32 = 217;
    /// `buffers[0]` = path, `args[0]` = Linux `O_*` flags, `args[1]` = mode. Returns an fd.
    pub const OPENAT: u32 = 257;
    /// `buffers[0]` = path, `buffers[1]` = a [`super::FileStat`] record (symlinks followed).
    pub const STAT: u32 = 262;
}

/// Linux `open` flags a delegated `OPENAT` may carry; anything else is `EINVAL`.
pub mod open_flags {
    pub const READ_ONLY: u64 = 0;
    pub const WRITE_ONLY: u64 = 0o1;
    pub const READ_WRITE: u64 = 0o2;
    pub const CREATE: u64 = 0o100;
    pub const EXCLUSIVE: u64 = 0o200;
    pub const TRUNCATE: u64 = 0o1000;
    pub const APPEND: u64 = 0o2000;
    pub const DIRECTORY: u64 = 0o200000;
    /// Every flag accepted.
    pub const ALLOWED: u64 =
        WRITE_ONLY | READ_WRITE | CREATE | EXCLUSIVE | TRUNCATE | APPEND | DIRECTORY;
}

/// Linux errno values the delegation path itself produces (the server passes Linux's own
/// through unchanged).
pub mod errno {
    pub const EPERM: u16 = 1;
    pub const ENOENT: u16 = 2;
    pub const EIO: u16 = 5;
    pub const E2BIG: u16 = 7;
    pub const EBADF: u16 = 9;
    pub const EAGAIN: u16 = 11;
    pub const ENOMEM: u16 = 12;
    pub const EACCES: u16 = 13;
    pub const EFAULT: u16 = 14;
    pub const EEXIST: u16 = 17;
    pub const EXDEV: u16 = 18;
    pub const ENOTDIR: u16 = 20;
    pub const EISDIR: u16 = 21;
    pub const EINVAL: u16 = 22;
    pub const EMFILE: u16 = 24;
    pub const ENOSPC: u16 = 28;
    pub const ENAMETOOLONG: u16 = 36;
    pub const ENOSYS: u16 = 38;
    pub const ENOTEMPTY: u16 = 39;
    pub const ELOOP: u16 = 40;
}

/// What `FSTAT` and `STAT` write: 48 bytes, little-endian: `size u64`, `mode u32` (Linux
/// `st_mode`: type and permission bits), `nlink u32`, `ino u64`, `mtime_sec i64`,
/// `mtime_nsec u32`, `uid u32`, `gid u32`, reserved `u32` (zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub ino: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
}

/// `st_mode` type bits (Linux `S_IFMT` and its values).
const MODE_TYPE: u32 = 0o170000;
const MODE_DIRECTORY: u32 = 0o040000;
const MODE_REGULAR: u32 = 0o100000;
const MODE_SYMLINK: u32 = 0o120000;

impl FileStat {
    pub const ENCODED_LEN: usize = 48;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..12].copy_from_slice(&self.mode.to_le_bytes());
        out[12..16].copy_from_slice(&self.nlink.to_le_bytes());
        out[16..24].copy_from_slice(&self.ino.to_le_bytes());
        out[24..32].copy_from_slice(&self.mtime_sec.to_le_bytes());
        out[32..36].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        out[36..40].copy_from_slice(&self.uid.to_le_bytes());
        out[40..44].copy_from_slice(&self.gid.to_le_bytes());
        out
    }

    /// `None` unless `bytes` is exactly one record with its reserved word zero.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        if u32_at(44) != 0 {
            return None;
        }
        Some(Self {
            size: u64_at(0),
            mode: u32_at(8),
            nlink: u32_at(12),
            ino: u64_at(16),
            mtime_sec: u64_at(24) as i64,
            mtime_nsec: u32_at(32),
            uid: u32_at(36),
            gid: u32_at(40),
        })
    }

    pub fn kind(&self) -> FileKind {
        FileKind::from_mode(self.mode)
    }
}

/// A directory entry's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File = 1,
    Directory = 2,
    Symlink = 3,
    Other = 4,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> Self {
        match mode & MODE_TYPE {
            MODE_REGULAR => Self::File,
            MODE_DIRECTORY => Self::Directory,
            MODE_SYMLINK => Self::Symlink,
            _ => Self::Other,
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        [Self::File, Self::Directory, Self::Symlink, Self::Other]
            .into_iter()
            .find(|kind| *kind as u8 == value)
    }
}

/// One record of what `GETDENTS` writes: `kind u8`, `name_len u8` (1..=255), the name's bytes
/// (no NUL, no `/`). Records follow each other with no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub kind: FileKind,
    pub name: &'a [u8],
}

impl DirEntry<'_> {
    /// Bytes the record takes.
    pub fn encoded_len(&self) -> usize {
        2 + self.name.len()
    }

    /// Writes the record at the front of `out`; `None` if it does not fit or the name is not
    /// a valid entry name.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let len = u8::try_from(self.name.len()).ok().filter(|len| *len > 0)?;
        if self.name.iter().any(|byte| matches!(byte, 0 | b'/')) {
            return None;
        }
        let record = out.get_mut(..self.encoded_len())?;
        record[0] = self.kind as u8;
        record[1] = len;
        record[2..].copy_from_slice(self.name);
        Some(self.encoded_len())
    }
}

/// The records in `bytes`, in order; stops at the first malformed one (returned as `Err`).
pub fn dir_entries(bytes: &[u8]) -> impl Iterator<Item = Result<DirEntry<'_>, ()>> {
    let mut rest = bytes;
    core::iter::from_fn(move || {
        let (&kind, after) = rest.split_first()?;
        let parsed = (|| {
            let (&len, after) = after.split_first()?;
            let kind = FileKind::from_u8(kind)?;
            let name = after
                .get(..usize::from(len))
                .filter(|name| !name.is_empty())?;
            if name.iter().any(|byte| matches!(byte, 0 | b'/')) {
                return None;
            }
            Some((DirEntry { kind, name }, &after[usize::from(len)..]))
        })();
        match parsed {
            Some((entry, after)) => {
                rest = after;
                Some(Ok(entry))
            }
            None => {
                rest = &[];
                Some(Err(()))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rings_pair_up_per_connection() {
        assert_eq!(to_linux_ring(0), 0);
        assert_eq!(to_lavender_ring(0), 1);
        assert_eq!(to_lavender_ring(CONNECTIONS - 1), RING_COUNT - 1);
        assert!(crate::message::SyscallRequest::ENCODED_LEN + 8 <= RING.slot_size as usize);
    }

    #[test]
    fn window_plan_slices_are_disjoint_and_inside() {
        assert_eq!(WindowPlan::new(0, 4096 * 35), None);
        let window = 1_000_000;
        let plan = WindowPlan::new(0, window).unwrap();
        let mut previous_end = SERVICE_BYTES;
        for connection in 0..CONNECTIONS {
            for slot in 0..CALLS_IN_FLIGHT {
                let slice = plan.slice(connection, slot).unwrap();
                assert_eq!(slice.offset % DATA_ALIGN, 0);
                assert_eq!(slice.offset, previous_end);
                previous_end = slice.offset + slice.len;
                assert!(slice.validate(window).is_ok());
                assert!(plan.belongs_to(connection, slice));
                assert!(!plan.belongs_to((connection + 1) % CONNECTIONS, slice));
            }
        }
        assert_eq!(plan.slice(CONNECTIONS, 0), None);
        assert_eq!(plan.slice(0, CALLS_IN_FLIGHT), None);
        // Straddling two slices of one connection is refused too.
        let first = plan.slice(1, 0).unwrap();
        let straddling = BufferRef {
            offset: first.offset + 8,
            len: first.len,
        };
        assert!(!plan.belongs_to(1, straddling));
        assert!(plan.belongs_to(3, BufferRef::EMPTY));
        assert!(!plan.belongs_to(3, BufferRef { offset: 8, len: 0 }));
        let misaligned = BufferRef {
            offset: first.offset + 4,
            len: 8,
        };
        assert!(!plan.belongs_to(1, misaligned));
    }

    #[test]
    fn a_large_window_gives_each_process_connection_a_page_aligned_bulk_extent() {
        // A 12 MiB region's window, 64 bytes into it (after the rings, in practice more).
        let (start, window) = (0x9040, 12 << 20);
        let plan = WindowPlan::new(start, window).unwrap();
        assert_eq!(plan.slice_len(), MAX_SLICE_BYTES);
        assert_eq!(
            plan.bulk(0),
            None,
            "the control connection has no bulk extent"
        );
        assert_eq!(plan.bulk(CONNECTIONS), None);
        let mut previous_end = 0;
        for connection in 1..CONNECTIONS {
            let bulk = plan.bulk(connection).unwrap();
            assert!(bulk.len >= 1 << 20, "{bulk:?}");
            assert_eq!((start + u64::from(bulk.offset)) % u64::from(PAGE_BYTES), 0);
            assert!(bulk.offset >= previous_end);
            previous_end = bulk.offset + bulk.len;
            assert!(bulk.validate(window).is_ok());
            assert!(plan.belongs_to(connection, bulk));
            let inside = BufferRef {
                offset: bulk.offset + 4096,
                len: 8192,
            };
            assert!(plan.belongs_to(connection, inside));
            assert!(
                !plan.belongs_to(connection % (CONNECTIONS - 1) + 1, inside),
                "another connection's"
            );
            let past_the_end = BufferRef {
                offset: bulk.offset + 8,
                len: bulk.len,
            };
            assert!(!plan.belongs_to(connection, past_the_end));
        }
        // A 1 MiB region's window has slices only, as before bulk extents existed.
        let small = WindowPlan::new(64, 1_000_000).unwrap();
        assert_eq!(small.bulk(1), None);
        assert!(small.slice_len() < MAX_SLICE_BYTES);
    }

    #[test]
    fn stat_round_trips_and_rejects_reserved_bits() {
        let stat = FileStat {
            size: 5 << 20,
            mode: 0o100644,
            nlink: 1,
            ino: 77,
            mtime_sec: -3,
            mtime_nsec: 999,
            uid: 1000,
            gid: 100,
        };
        let bytes = stat.encode();
        assert_eq!(FileStat::decode(&bytes), Some(stat));
        assert_eq!(stat.kind(), FileKind::File);
        let mut bad = bytes;
        bad[45] = 1;
        assert_eq!(FileStat::decode(&bad), None);
        assert_eq!(FileStat::decode(&bytes[..47]), None);
    }

    #[test]
    fn dir_entries_round_trip_and_stop_at_garbage() {
        let mut out = [0u8; 64];
        let a = DirEntry {
            kind: FileKind::Directory,
            name: b"sub",
        };
        let b = DirEntry {
            kind: FileKind::File,
            name: b"data.bin",
        };
        let n = a.encode(&mut out).unwrap();
        let m = b.encode(&mut out[n..]).unwrap();
        let parsed: std::vec::Vec<_> = dir_entries(&out[..n + m]).collect();
        assert_eq!(parsed, [Ok(a), Ok(b)]);
        assert_eq!(
            DirEntry {
                kind: FileKind::File,
                name: b"a/b"
            }
            .encode(&mut out),
            None
        );
        let garbage = [9u8, 1, b'x'];
        assert_eq!(
            dir_entries(&garbage).collect::<std::vec::Vec<_>>(),
            [Err(())]
        );
    }

    #[test]
    fn liveness_epochs_count_up_from_one_and_beats_advance() {
        let words: [AtomicU64; 8] = Default::default();
        let liveness = ServiceLiveness::new(&words).unwrap();
        assert_eq!((liveness.epoch(), liveness.heartbeat()), (0, 0));
        assert_eq!(liveness.begin_epoch(), 1);
        let beat = liveness.heartbeat();
        liveness.beat();
        assert_eq!(liveness.heartbeat(), beat + 1);
        assert_eq!(liveness.begin_epoch(), 2);
        words[0].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(liveness.begin_epoch(), 1, "never 0 after a wrap");
        assert!(ServiceLiveness::new(&words[..1]).is_none());
    }

    #[test]
    fn the_liveness_line_belongs_to_no_connection() {
        let plan = WindowPlan::new(0, 1_000_000).unwrap();
        for connection in 0..CONNECTIONS {
            assert!(!plan.belongs_to(connection, BufferRef { offset: 0, len: 16 }));
            assert!(!plan.belongs_to(connection, BufferRef { offset: 8, len: 64 }));
        }
        assert_eq!(plan.slice(0, 0).unwrap().offset, SERVICE_BYTES);
    }

    proptest! {
        #[test]
        fn request_ids_carry_slot_and_epoch(sequence in 0u64..(1 << 48), epoch in any::<u64>(), other in any::<u64>(), slot in any::<u8>()) {
            let id = request_id(sequence, epoch, slot);
            prop_assert_eq!(request_slot(id), slot);
            prop_assert!(addressed_to(id, epoch));
            prop_assert_eq!(addressed_to(id, other), other & 0xff == epoch & 0xff);
            prop_assert_eq!(id >> 16, sequence);
        }

        #[test]
        fn belongs_to_means_inside_one_slice_or_the_bulk(window in 0u64..(64 << 20), start in 0u64..8192, connection in 0u32..12, offset in any::<u32>(), len in any::<u32>()) {
            let start = start & !7;
            if let Some(plan) = WindowPlan::new(start, window) {
                let buffer = BufferRef { offset, len };
                if plan.belongs_to(connection, buffer) {
                    prop_assert!(buffer.validate(window).is_ok());
                }
                let in_bulk = plan.bulk(connection).is_some_and(|bulk| {
                    offset >= bulk.offset && u64::from(offset) + u64::from(len) <= u64::from(bulk.offset) + u64::from(bulk.len)
                });
                if plan.belongs_to(connection, buffer) && len > 0 && !in_bulk {
                    prop_assert!(offset >= SERVICE_BYTES, "the liveness words belong to no call");
                    let slot = ((offset - SERVICE_BYTES) / plan.slice_len()) % CALLS_IN_FLIGHT;
                    let slice = plan.slice(connection, slot).unwrap();
                    prop_assert!(offset >= slice.offset);
                    prop_assert!(u64::from(offset) + u64::from(len) <= u64::from(slice.offset) + u64::from(slice.len));
                    prop_assert!(u64::from(slice.offset + slice.len) <= window);
                }
                if let Some(bulk) = plan.bulk(connection) {
                    prop_assert!(bulk.validate(window).is_ok());
                    prop_assert_eq!((start + u64::from(bulk.offset)) % u64::from(PAGE_BYTES), 0);
                    prop_assert_eq!(bulk.len % PAGE_BYTES, 0);
                    let last = plan.slice(CONNECTIONS - 1, CALLS_IN_FLIGHT - 1).unwrap();
                    prop_assert!(bulk.offset >= last.offset + last.len, "bulk extents follow the slices");
                }
            }
        }

        #[test]
        fn stat_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(stat) = FileStat::decode(&bytes) {
                prop_assert_eq!(&stat.encode()[..], &bytes[..]);
            }
        }

        #[test]
        fn dir_entries_reencode_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut out = std::vec![0u8; bytes.len()];
            let mut used = 0;
            for entry in dir_entries(&bytes) {
                let Ok(entry) = entry else { break };
                used += entry.encode(&mut out[used..]).unwrap();
            }
            prop_assert_eq!(&out[..used], &bytes[..used]);
        }
    }
}
