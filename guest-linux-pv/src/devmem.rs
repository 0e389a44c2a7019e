//! Mapping guest-physical memory through `/dev/mem`.
//!
//! The stock Debian kernel is built with `STRICT_DEVMEM` and `IO_STRICT_DEVMEM`: `/dev/mem`
//! refuses RAM and ranges a driver claimed, and allows ranges the e820 map marks reserved.
//! The hypervisor reports shared regions as reserved for exactly this reason, so a refused
//! mapping almost always means the range is not reserved (see [`MapError`]'s text).

use std::fmt;
use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::libc;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vmcall_proto::region::{LayoutError, SharedRegion};

pub const DEV_MEM: &str = "/dev/mem";

/// Physical memory mapped into this process, unmapped on drop.
pub struct Mapping {
    base: NonNull<libc::c_void>,
    len: NonZeroUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// The range does not fit this process's address or offset types.
    TooLarge,
    Open(Errno),
    Map(Errno),
}

impl MapError {
    /// Stable identifier for markers.
    pub fn code(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Open(_) => "devmem_open",
            Self::Map(_) => "devmem_map",
        }
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("range does not fit this process's address space"),
            Self::Open(Errno::ENOENT) => write!(f, "{DEV_MEM} does not exist (no devtmpfs?)"),
            Self::Open(errno) => write!(f, "cannot open {DEV_MEM}: {}", errno.desc()),
            Self::Map(errno @ (Errno::EPERM | Errno::EACCES)) => write!(
                f,
                "{DEV_MEM} refused the range ({}): it is not marked reserved in the e820 map \
                 (STRICT_DEVMEM allows only reserved, non-RAM ranges)",
                errno.desc()
            ),
            Self::Map(errno) => write!(f, "mmap of {DEV_MEM} failed: {}", errno.desc()),
        }
    }
}

impl std::error::Error for MapError {}

impl Mapping {
    /// Maps `size` bytes at physical address `phys`, read-write, shared and uncached.
    ///
    /// `O_SYNC` makes the kernel map the pages uncached: the other side of a shared region is
    /// another guest or the hypervisor, whose EPT memory type we do not know, so the agent
    /// takes the type that is correct whatever the peer uses.
    pub fn new(phys: u64, size: u64) -> Result<Mapping, MapError> {
        let len = usize::try_from(size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or(MapError::TooLarge)?;
        let offset = libc::off_t::try_from(phys).map_err(|_| MapError::TooLarge)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(DEV_MEM)
            .map_err(|e| MapError::Open(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        // SAFETY: a fresh shared mapping at an address the kernel picks: it cannot alias or
        // overlap any memory Rust already uses. The mapping outlives `file` (closing the fd
        // keeps it) and is unmapped only in `Drop`, after every borrow of it has ended.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                offset,
            )
        }
        .map_err(MapError::Map)?;
        Ok(Mapping { base, len })
    }

    /// The mapping as a shared region (not yet validated: call `attach` on it).
    pub fn region(&self) -> Result<SharedRegion<'_>, LayoutError> {
        // SAFETY: `base..base + len` stays mapped read-write while `self` is borrowed, and the
        // agent reaches it only through `SharedRegion`, whose accesses are all atomic. The peer
        // writing concurrently is what the atomics are for.
        unsafe { SharedRegion::from_raw_parts(self.base.as_ptr().cast(), self.len.get()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, and `&mut self` means no
        // `SharedRegion` borrowed from this mapping is still alive.
        // An error here would leave the pages mapped, which is harmless.
        let _ = unsafe { munmap(self.base, self.len.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_mapping_explains_reservation() {
        let text = MapError::Map(Errno::EPERM).to_string();
        assert!(text.contains("reserved in the e820 map"), "{text}");
        assert_eq!(MapError::Map(Errno::EPERM).code(), "devmem_map");
        assert!(MapError::Open(Errno::ENOENT)
            .to_string()
            .contains("devtmpfs"));
    }

    #[test]
    fn impossible_ranges_fail_before_any_system_call() {
        assert_eq!(Mapping::new(0, 0).err(), Some(MapError::TooLarge));
        assert_eq!(
            Mapping::new(0xffff_ffff_ffff_f000, 0x1000).err(),
            Some(MapError::TooLarge)
        );
    }
}
