//! The Lavender boot-info page: what the hypervisor tells Lavender about its partition.
//!
//! The hypervisor fills a [`BootInfo`] and writes it with [`BootInfo::write`] into a page of the
//! guest's memory before entering it, passing the page's guest-physical address in RDI. Lavender
//! reads it back with [`BootInfo::read`], which validates every field; nothing in the page is
//! used unvalidated. The page is written once, before the guest runs, so it is plain bytes.

use core::fmt;
use core::mem::{offset_of, size_of};

use crate::cores::{CoreId, CoreSet};
use crate::message::{DecodeError, EncodeError};
use crate::version::{AbiVersion, VersionMismatch, ABI_VERSION};
use crate::wire::{Reader, Writer};

/// `"TNDMBOOT"` read as a little-endian `u64`.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"TNDMBOOT");
/// The page is exactly one 4 KiB page.
pub const BOOT_INFO_SIZE: usize = 4096;
pub const MAX_MEMORY_REGIONS: usize = 16;
pub const MAX_SHARED_REGIONS: usize = 16;
pub const CMDLINE_CAPACITY: usize = 1024;
/// Regions are mapped by EPT, so they are page-granular.
pub const PAGE_SIZE: u64 = 4096;
/// `SharedRegionInfo::peer` of a region shared with the hypervisor itself.
pub const PEER_HYPERVISOR: u32 = u32::MAX;

/// What a memory region of the guest holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryKind {
    /// Free for the guest to allocate.
    Usable = 1,
    /// In use at entry: the loaded kernel image and this page. The guest may reclaim it later.
    Loaded = 2,
}

/// A range of the guest's private memory (guest-physical). 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub base: u64,
    pub size: u64,
    pub kind: MemoryKind,
    pub reserved: u32,
}
const _: () = assert!(size_of::<MemoryRegion>() == 24);

/// A shared region mapped into this guest, with the doorbells that go with it. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedRegionInfo {
    /// Guest-physical address of the region (its [`crate::region::RegionHeader`]).
    pub guest_physical: u64,
    pub size: u64,
    /// Guest id of the other side, or [`PEER_HYPERVISOR`].
    pub peer: u32,
    /// Reserved for doorbell numbers (written as 0: `DOORBELL` names the region by its base).
    pub notify_doorbell: u16,
    /// Reserved likewise (0).
    pub wait_doorbell: u16,
    /// Interrupt vector the hypervisor sends after posting to the region (a control region)
    /// or when the peer rings `DOORBELL` (a region shared with another guest); 0: none.
    pub vector: u8,
    pub reserved: [u8; 7],
}
const _: () = assert!(size_of::<SharedRegionInfo>() == 32);

/// Unused table entries are all zero.
const UNUSED_MEMORY_REGION: MemoryRegion = MemoryRegion {
    base: 0,
    size: 0,
    kind: MemoryKind::Usable,
    reserved: 0,
};
const UNUSED_SHARED_REGION: SharedRegionInfo = SharedRegionInfo {
    guest_physical: 0,
    size: 0,
    peer: 0,
    notify_doorbell: 0,
    wait_doorbell: 0,
    vector: 0,
    reserved: [0; 7],
};

/// The boot-info page, exactly as laid out in guest memory (little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    magic: u64,
    abi_version: u32,
    size: u32,
    guest_id: u32,
    boot_core: u16,
    memory_region_count: u16,
    cores_allowed: u64,
    cores_initial: u64,
    shared_region_count: u16,
    cmdline_len: u16,
    reserved0: u32,
    memory_regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    shared_regions: [SharedRegionInfo; MAX_SHARED_REGIONS],
    cmdline: [u8; CMDLINE_CAPACITY],
    reserved_tail: [u8; BOOT_INFO_TAIL],
}
const BOOT_INFO_TAIL: usize = 2128;
const _: () = assert!(size_of::<BootInfo>() == BOOT_INFO_SIZE);
// `read` and `write` walk the fields in declaration order; these pin that order to the offsets.
const _: () = assert!(offset_of!(BootInfo, guest_id) == 16);
const _: () = assert!(offset_of!(BootInfo, cores_allowed) == 24);
const _: () = assert!(offset_of!(BootInfo, shared_region_count) == 40);
const _: () = assert!(offset_of!(BootInfo, memory_regions) == 48);
const _: () = assert!(offset_of!(BootInfo, shared_regions) == 432);
const _: () = assert!(offset_of!(BootInfo, cmdline) == 944);
const _: () = assert!(offset_of!(BootInfo, reserved_tail) == 1968);

/// Why a boot-info page was refused (or could not be built).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    PageTooSmall { len: usize },
    BadMagic(u64),
    Version(VersionMismatch),
    BadSize(u32),
    TooManyEntries { what: &'static str, count: usize },
    BadCore { what: &'static str },
    BadRegion { what: &'static str, index: usize },
    Overlap { what: &'static str },
    CmdlineNotUtf8,
    ReservedNotZero { what: &'static str },
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageTooSmall { len } => write!(f, "boot-info page of {len} bytes is too small"),
            Self::BadMagic(magic) => write!(f, "bad boot-info magic {magic:#018x}"),
            Self::Version(mismatch) => write!(f, "boot info: {mismatch}"),
            Self::BadSize(size) => write!(f, "boot-info size {size} is not {BOOT_INFO_SIZE}"),
            Self::TooManyEntries { what, count } => {
                write!(f, "{count} {what} exceed the page's capacity")
            }
            Self::BadCore { what } => write!(f, "boot info: bad {what}"),
            Self::BadRegion { what, index } => write!(f, "boot info: bad {what} {index}"),
            Self::Overlap { what } => write!(f, "boot info: {what} overlap"),
            Self::CmdlineNotUtf8 => f.write_str("boot-info command line is not UTF-8"),
            Self::ReservedNotZero { what } => write!(f, "boot info: reserved bytes of {what} set"),
        }
    }
}

impl core::error::Error for BootInfoError {}

fn truncated(_: DecodeError) -> BootInfoError {
    BootInfoError::PageTooSmall { len: 0 }
}

fn too_small(_: EncodeError) -> BootInfoError {
    BootInfoError::PageTooSmall { len: 0 }
}

/// A page-aligned, non-empty, non-wrapping range; returns its end.
fn page_range(base: u64, size: u64) -> Option<u64> {
    let aligned = base % PAGE_SIZE == 0 && size % PAGE_SIZE == 0 && size != 0;
    aligned.then(|| base.checked_add(size)).flatten()
}

fn overlaps((a_start, a_end): (u64, u64), (b_start, b_end): (u64, u64)) -> bool {
    a_start < b_end && b_start < a_end
}

impl BootInfo {
    /// An empty page for a guest whose boot core is `boot_core`, starting with `initial` cores
    /// and allowed to hold `allowed` ones.
    pub fn new(guest_id: u32, boot_core: CoreId, initial: CoreSet, allowed: CoreSet) -> Self {
        Self {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION.to_u32(),
            size: BOOT_INFO_SIZE as u32,
            guest_id,
            boot_core: boot_core.index() as u16,
            memory_region_count: 0,
            cores_allowed: allowed.0,
            cores_initial: initial.0,
            shared_region_count: 0,
            cmdline_len: 0,
            reserved0: 0,
            memory_regions: [UNUSED_MEMORY_REGION; MAX_MEMORY_REGIONS],
            shared_regions: [UNUSED_SHARED_REGION; MAX_SHARED_REGIONS],
            cmdline: [0; CMDLINE_CAPACITY],
            reserved_tail: [0; BOOT_INFO_TAIL],
        }
    }

    pub fn add_memory_region(&mut self, region: MemoryRegion) -> Result<(), BootInfoError> {
        let count = usize::from(self.memory_region_count);
        let slot = self
            .memory_regions
            .get_mut(count)
            .ok_or(BootInfoError::TooManyEntries {
                what: "memory regions",
                count: count + 1,
            })?;
        *slot = region;
        self.memory_region_count += 1;
        Ok(())
    }

    pub fn add_shared_region(&mut self, region: SharedRegionInfo) -> Result<(), BootInfoError> {
        let count = usize::from(self.shared_region_count);
        let slot = self
            .shared_regions
            .get_mut(count)
            .ok_or(BootInfoError::TooManyEntries {
                what: "shared regions",
                count: count + 1,
            })?;
        *slot = region;
        self.shared_region_count += 1;
        Ok(())
    }

    pub fn set_cmdline(&mut self, cmdline: &str) -> Result<(), BootInfoError> {
        let bytes = cmdline.as_bytes();
        if bytes.len() > CMDLINE_CAPACITY {
            return Err(BootInfoError::TooManyEntries {
                what: "command-line bytes",
                count: bytes.len(),
            });
        }
        self.cmdline = [0; CMDLINE_CAPACITY];
        self.cmdline[..bytes.len()].copy_from_slice(bytes);
        self.cmdline_len = bytes.len() as u16;
        Ok(())
    }

    pub fn guest_id(&self) -> u32 {
        self.guest_id
    }

    pub fn boot_core(&self) -> CoreId {
        // Built from a `CoreId` or validated by `read`, so the fallback is never taken.
        CoreId::new(self.boot_core.into()).unwrap_or(CoreId::ZERO)
    }

    pub fn cores_initial(&self) -> CoreSet {
        CoreSet(self.cores_initial)
    }

    pub fn cores_allowed(&self) -> CoreSet {
        CoreSet(self.cores_allowed)
    }

    pub fn memory_regions(&self) -> &[MemoryRegion] {
        self.memory_regions
            .get(..usize::from(self.memory_region_count))
            .unwrap_or(&[])
    }

    pub fn shared_regions(&self) -> &[SharedRegionInfo] {
        self.shared_regions
            .get(..usize::from(self.shared_region_count))
            .unwrap_or(&[])
    }

    pub fn cmdline(&self) -> &str {
        let bytes = self
            .cmdline
            .get(..usize::from(self.cmdline_len))
            .unwrap_or(&[]);
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Writes the page after validating it, so the hypervisor cannot hand out a page Lavender
    /// would refuse.
    pub fn write(&self, page: &mut [u8]) -> Result<(), BootInfoError> {
        self.validate()?;
        let len = page.len();
        let page = page
            .get_mut(..BOOT_INFO_SIZE)
            .ok_or(BootInfoError::PageTooSmall { len })?;
        let mut writer = Writer::new(page);
        let w = &mut writer;
        w.u64(self.magic).map_err(too_small)?;
        w.u32(self.abi_version).map_err(too_small)?;
        w.u32(self.size).map_err(too_small)?;
        w.u32(self.guest_id).map_err(too_small)?;
        w.u16(self.boot_core).map_err(too_small)?;
        w.u16(self.memory_region_count).map_err(too_small)?;
        w.u64(self.cores_allowed).map_err(too_small)?;
        w.u64(self.cores_initial).map_err(too_small)?;
        w.u16(self.shared_region_count).map_err(too_small)?;
        w.u16(self.cmdline_len).map_err(too_small)?;
        w.u32(self.reserved0).map_err(too_small)?;
        for region in &self.memory_regions {
            w.u64(region.base).map_err(too_small)?;
            w.u64(region.size).map_err(too_small)?;
            w.u32(region.kind as u32).map_err(too_small)?;
            w.u32(region.reserved).map_err(too_small)?;
        }
        for region in &self.shared_regions {
            w.u64(region.guest_physical).map_err(too_small)?;
            w.u64(region.size).map_err(too_small)?;
            w.u32(region.peer).map_err(too_small)?;
            w.u16(region.notify_doorbell).map_err(too_small)?;
            w.u16(region.wait_doorbell).map_err(too_small)?;
            w.u8(region.vector).map_err(too_small)?;
            for byte in region.reserved {
                w.u8(byte).map_err(too_small)?;
            }
        }
        for byte in self.cmdline.iter().chain(&self.reserved_tail) {
            w.u8(*byte).map_err(too_small)?;
        }
        Ok(())
    }

    /// Reads and validates a boot-info page.
    pub fn read(page: &[u8]) -> Result<Self, BootInfoError> {
        let page = page
            .get(..BOOT_INFO_SIZE)
            .ok_or(BootInfoError::PageTooSmall { len: page.len() })?;
        let mut reader = Reader::new(page);
        let r = &mut reader;
        let magic = r.u64().map_err(truncated)?;
        if magic != BOOT_INFO_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let abi_version = r.u32().map_err(truncated)?;
        AbiVersion::require_same(AbiVersion::from_u32(abi_version))
            .map_err(BootInfoError::Version)?;
        let size = r.u32().map_err(truncated)?;
        let guest_id = r.u32().map_err(truncated)?;
        let boot_core = CoreId::new(r.u16().map_err(truncated)?.into())
            .ok_or(BootInfoError::BadCore { what: "boot core" })?;
        let memory_region_count = r.u16().map_err(truncated)?;
        let allowed = CoreSet(r.u64().map_err(truncated)?);
        let initial = CoreSet(r.u64().map_err(truncated)?);
        let mut info = Self::new(guest_id, boot_core, initial, allowed);
        info.size = size;
        info.memory_region_count = memory_region_count;
        info.shared_region_count = r.u16().map_err(truncated)?;
        info.cmdline_len = r.u16().map_err(truncated)?;
        info.reserved0 = r.u32().map_err(truncated)?;
        for (index, region) in info.memory_regions.iter_mut().enumerate() {
            region.base = r.u64().map_err(truncated)?;
            region.size = r.u64().map_err(truncated)?;
            let kind = r.u32().map_err(truncated)?;
            region.reserved = r.u32().map_err(truncated)?;
            region.kind = match kind {
                1 => MemoryKind::Usable,
                2 => MemoryKind::Loaded,
                // An unused entry must be all zero; `validate` checks its size.
                0 if region.base == 0 && region.size == 0 => MemoryKind::Usable,
                _ => {
                    return Err(BootInfoError::BadRegion {
                        what: "memory region kind",
                        index,
                    })
                }
            };
        }
        for region in &mut info.shared_regions {
            region.guest_physical = r.u64().map_err(truncated)?;
            region.size = r.u64().map_err(truncated)?;
            region.peer = r.u32().map_err(truncated)?;
            region.notify_doorbell = r.u16().map_err(truncated)?;
            region.wait_doorbell = r.u16().map_err(truncated)?;
            region.vector = r.u8().map_err(truncated)?;
            for byte in &mut region.reserved {
                *byte = r.u8().map_err(truncated)?;
            }
        }
        for byte in info.cmdline.iter_mut().chain(info.reserved_tail.iter_mut()) {
            *byte = r.u8().map_err(truncated)?;
        }
        info.validate()?;
        Ok(info)
    }

    fn validate(&self) -> Result<(), BootInfoError> {
        if self.size as usize != BOOT_INFO_SIZE {
            return Err(BootInfoError::BadSize(self.size));
        }
        let boot_core = CoreId::new(self.boot_core.into())
            .ok_or(BootInfoError::BadCore { what: "boot core" })?;
        if !self.cores_initial().contains(boot_core) {
            return Err(BootInfoError::BadCore {
                what: "boot core outside the initial cores",
            });
        }
        if !self.cores_initial().is_subset_of(self.cores_allowed()) {
            return Err(BootInfoError::BadCore {
                what: "initial cores outside the allowed cores",
            });
        }
        let memory_count = usize::from(self.memory_region_count);
        if memory_count > MAX_MEMORY_REGIONS {
            return Err(BootInfoError::TooManyEntries {
                what: "memory regions",
                count: memory_count,
            });
        }
        let shared_count = usize::from(self.shared_region_count);
        if shared_count > MAX_SHARED_REGIONS {
            return Err(BootInfoError::TooManyEntries {
                what: "shared regions",
                count: shared_count,
            });
        }
        if usize::from(self.cmdline_len) > CMDLINE_CAPACITY {
            return Err(BootInfoError::TooManyEntries {
                what: "command-line bytes",
                count: self.cmdline_len.into(),
            });
        }
        if self.reserved0 != 0 || self.reserved_tail.iter().any(|byte| *byte != 0) {
            return Err(BootInfoError::ReservedNotZero { what: "the page" });
        }
        let (used_memory, unused_memory) = self.memory_regions.split_at(memory_count);
        let (used_shared, unused_shared) = self.shared_regions.split_at(shared_count);
        if unused_memory
            .iter()
            .any(|region| *region != UNUSED_MEMORY_REGION)
        {
            return Err(BootInfoError::ReservedNotZero {
                what: "unused memory regions",
            });
        }
        if unused_shared
            .iter()
            .any(|region| *region != UNUSED_SHARED_REGION)
        {
            return Err(BootInfoError::ReservedNotZero {
                what: "unused shared regions",
            });
        }
        let mut ranges = [(0u64, 0u64); MAX_MEMORY_REGIONS + MAX_SHARED_REGIONS];
        for (index, region) in used_memory.iter().enumerate() {
            let end = page_range(region.base, region.size)
                .filter(|_| region.reserved == 0)
                .ok_or(BootInfoError::BadRegion {
                    what: "memory region",
                    index,
                })?;
            ranges[index] = (region.base, end);
        }
        for (index, region) in used_shared.iter().enumerate() {
            let end = page_range(region.guest_physical, region.size)
                .filter(|_| region.reserved == [0; 7])
                .ok_or(BootInfoError::BadRegion {
                    what: "shared region",
                    index,
                })?;
            ranges[memory_count + index] = (region.guest_physical, end);
        }
        let ranges = &ranges[..memory_count + shared_count];
        for (index, range) in ranges.iter().enumerate() {
            if ranges[index + 1..]
                .iter()
                .any(|other| overlaps(*range, *other))
            {
                return Err(BootInfoError::Overlap { what: "regions" });
            }
        }
        let cmdline = self.cmdline.split_at(usize::from(self.cmdline_len));
        core::str::from_utf8(cmdline.0).map_err(|_| BootInfoError::CmdlineNotUtf8)?;
        if cmdline.1.iter().any(|byte| *byte != 0) {
            return Err(BootInfoError::ReservedNotZero {
                what: "the command line",
            });
        }
        Ok(())
    }
}
