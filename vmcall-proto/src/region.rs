//! Shared-memory regions: the header at offset 0, the ring table, the rings and the data window.
//!
//! A region is memory mapped into two guests (or a guest and the hypervisor). Everything in it is
//! reached through [`SharedRegion`], which sees the memory as little-endian 64-bit words and only
//! ever touches them with atomic loads and stores: the peer may write any word at any moment, and
//! atomics make that a value we validate rather than a data race. The one exception is the copy
//! of whole one-cache-line ring slots (`ring::copy_line`, and its batch form for records,
//! `ring::copy_records`): four volatile 16-byte moves per slot, whose `SAFETY` comments explain
//! why a racing peer cannot make them undefined behaviour.
//!
//! No pointer is ever stored in a region; every location is a byte offset from the region base,
//! checked against the region's length before use.

use core::fmt;
use core::mem::{offset_of, size_of};

use crate::ring::{RingControl, SlotFormat, RING_CONTROL_SIZE};
use crate::sync::{AtomicU64, Ordering};
use crate::version::{AbiVersion, VersionMismatch, ABI_VERSION};

/// Cache-line size the layouts are built around: head and tail never share one.
pub const CACHE_LINE: usize = 64;

/// `"TNDMSHRD"` read as a little-endian `u64`.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"TNDMSHRD");

/// Most rings one region may describe: bounds the validation work a hostile header can cause.
pub const MAX_RINGS: u32 = 64;

/// Smallest slot: an 8-byte slot header plus one 8-byte payload word.
pub const MIN_SLOT_SIZE: u32 = 16;
/// Largest slot: one page.
pub const MAX_SLOT_SIZE: u32 = 4096;
/// Fewest slots in a ring. One slot would serialise the peers on every message.
pub const MIN_SLOT_COUNT: u32 = 2;
/// Most slots in a ring.
pub const MAX_SLOT_COUNT: u32 = 1 << 20;

/// Buffers in the data window start on 8-byte boundaries, so writing one never has to touch a
/// word that holds part of another buffer.
pub const DATA_ALIGN: u32 = 8;

/// Region header, at offset 0 of every shared region. 64 bytes, one cache line.
///
/// The peer that creates the region (the hypervisor) writes it once with
/// [`SharedRegion::initialize`]; every user validates it with [`SharedRegion::attach`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHeader {
    /// [`REGION_MAGIC`].
    pub magic: u64,
    /// [`AbiVersion::to_u32`] of the creator.
    pub abi_version: u32,
    /// `size_of::<RegionHeader>()`.
    pub header_size: u32,
    /// Bytes of the whole region, header included.
    pub region_size: u64,
    /// Offset of the [`RingDescriptor`] table.
    pub ring_table_offset: u32,
    /// Entries in the ring table.
    pub ring_count: u32,
    /// Offset of the data window (bulk data referenced by messages).
    pub data_window_offset: u64,
    /// Bytes of the data window.
    pub data_window_size: u64,
    /// Reserved: the capability a CPL-3 caller would pass in R9 to use privileged hypercalls
    /// (see [`crate::hypercall`]), meant to be non-zero only in a region shared between one guest
    /// and the hypervisor. The hypervisor issues no token yet: zero in every region today.
    pub holder_token: u64,
    /// Must be zero.
    pub reserved: u64,
}
const _: () = assert!(size_of::<RegionHeader>() == CACHE_LINE);
// The header is moved as words; these pin the repr(C) layout to that word mapping.
const _: () = assert!(offset_of!(RegionHeader, abi_version) == 8);
const _: () = assert!(offset_of!(RegionHeader, header_size) == 12);
const _: () = assert!(offset_of!(RegionHeader, region_size) == 16);
const _: () = assert!(offset_of!(RegionHeader, ring_table_offset) == 24);
const _: () = assert!(offset_of!(RegionHeader, ring_count) == 28);
const _: () = assert!(offset_of!(RegionHeader, data_window_offset) == 32);
const _: () = assert!(offset_of!(RegionHeader, data_window_size) == 40);
const _: () = assert!(offset_of!(RegionHeader, holder_token) == 48);
const _: () = assert!(offset_of!(RegionHeader, reserved) == 56);

/// One entry of the ring table: where a ring lives, its geometry and its slot format. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingDescriptor {
    /// Offset of the ring's [`RingControl`] block; the slots follow it.
    pub offset: u32,
    /// [`SlotFormat::to_u32`] of the ring's slots: 0 framed, 1 record; any other value is
    /// refused ([`LayoutError::BadSlotFormat`]).
    pub format: u32,
    /// Number of slots, a power of two.
    pub slot_count: u32,
    /// Bytes per slot, a power of two.
    pub slot_size: u32,
}
const _: () = assert!(size_of::<RingDescriptor>() == 16);
// The descriptor is moved as two words; these pin the repr(C) layout to that word mapping.
const _: () = assert!(offset_of!(RingDescriptor, offset) == 0);
const _: () = assert!(offset_of!(RingDescriptor, format) == 4);
const _: () = assert!(offset_of!(RingDescriptor, slot_count) == 8);
const _: () = assert!(offset_of!(RingDescriptor, slot_size) == 12);

/// Geometry and slot format of one ring, as asked of [`SharedRegion::initialize`] and recorded in
/// the ring's [`RingDescriptor`], where the peer reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSpec {
    pub slot_count: u32,
    pub slot_size: u32,
    pub format: SlotFormat,
}

impl RingSpec {
    fn validate(self) -> Result<Self, LayoutError> {
        let count_ok = self.slot_count.is_power_of_two()
            && (MIN_SLOT_COUNT..=MAX_SLOT_COUNT).contains(&self.slot_count);
        if !count_ok {
            return Err(LayoutError::BadSlotCount(self.slot_count));
        }
        let size_ok = self.slot_size.is_power_of_two()
            && (MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&self.slot_size);
        if !size_ok {
            return Err(LayoutError::BadSlotSize(self.slot_size));
        }
        Ok(self)
    }

    /// Bytes the ring occupies: control block plus slots.
    fn footprint(self) -> u64 {
        RING_CONTROL_SIZE as u64 + u64::from(self.slot_count) * u64::from(self.slot_size)
    }
}

/// A ring's place in a region, validated against that region's bounds.
///
/// Only [`RegionView::ring`] and [`RingLayout::new`] build one, so holding one means the ring fits.
/// It also carries the ring's [`SlotFormat`], read from the ring's descriptor by
/// [`RegionView::ring`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    offset: usize,
    spec: RingSpec,
}

impl RingLayout {
    /// Checks that a ring of `spec` at byte `offset` lies inside `region` on a cache-line boundary.
    pub fn new(
        region: &SharedRegion<'_>,
        offset: u64,
        spec: RingSpec,
    ) -> Result<Self, LayoutError> {
        let spec = spec.validate()?;
        if offset % CACHE_LINE as u64 != 0 {
            return Err(LayoutError::Misaligned { offset });
        }
        let end = offset
            .checked_add(spec.footprint())
            .ok_or(LayoutError::OutOfBounds {
                offset,
                len: spec.footprint(),
            })?;
        if end > region.len_bytes() as u64 {
            return Err(LayoutError::OutOfBounds {
                offset,
                len: spec.footprint(),
            });
        }
        Ok(Self {
            offset: offset as usize,
            spec,
        })
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn slot_count(&self) -> u32 {
        self.spec.slot_count
    }

    pub fn slot_size(&self) -> u32 {
        self.spec.slot_size
    }

    pub fn slot_format(&self) -> SlotFormat {
        self.spec.format
    }

    fn byte_range(&self) -> (u64, u64) {
        let start = self.offset as u64;
        (start, start + self.spec.footprint())
    }
}

/// Where a buffer lies in the data window. Offsets are from the window start, never pointers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BufferRef {
    pub offset: u32,
    pub len: u32,
}

impl BufferRef {
    pub const EMPTY: BufferRef = BufferRef { offset: 0, len: 0 };

    /// Checks the reference against a window of `window_len` bytes: aligned start, no overflow,
    /// entirely inside. The empty reference must be exactly [`BufferRef::EMPTY`].
    pub fn validate(self, window_len: u64) -> Result<Self, WindowError> {
        if self.len == 0 && self.offset != 0 {
            return Err(WindowError::Misaligned {
                offset: self.offset,
            });
        }
        if self.offset % DATA_ALIGN != 0 {
            return Err(WindowError::Misaligned {
                offset: self.offset,
            });
        }
        if u64::from(self.offset) + u64::from(self.len) > window_len {
            return Err(WindowError::OutOfBounds {
                buffer: self,
                window_len,
            });
        }
        Ok(self)
    }
}

/// A buffer reference does not fit the data window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowError {
    Misaligned {
        offset: u32,
    },
    OutOfBounds {
        buffer: BufferRef,
        window_len: u64,
    },
    /// The caller's buffer is shorter than the referenced data.
    DestinationTooSmall {
        needed: u32,
        available: usize,
    },
}

impl fmt::Display for WindowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { offset } => {
                write!(
                    f,
                    "data-window offset {offset:#x} is not {DATA_ALIGN}-byte aligned"
                )
            }
            Self::OutOfBounds { buffer, window_len } => write!(
                f,
                "buffer {:#x}+{:#x} overruns the {window_len:#x}-byte data window",
                buffer.offset, buffer.len
            ),
            Self::DestinationTooSmall { needed, available } => {
                write!(f, "buffer of {available} bytes cannot hold {needed} bytes")
            }
        }
    }
}

impl core::error::Error for WindowError {}

/// Why a region (or a ring inside it) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The mapping's base or an offset is not on the required boundary.
    Misaligned {
        offset: u64,
    },
    /// The mapping's length is not a whole number of 64-bit words.
    LengthNotWords {
        len: usize,
    },
    BadMagic(u64),
    Version(VersionMismatch),
    BadHeaderSize(u32),
    /// The header says the region is larger than the memory actually mapped.
    RegionSizeMismatch {
        header: u64,
        mapped: u64,
    },
    ReservedNotZero,
    TooManyRings(u32),
    NoSuchRing {
        index: u32,
        ring_count: u32,
    },
    BadSlotCount(u32),
    BadSlotSize(u32),
    /// A ring descriptor's format field holds no known [`SlotFormat`].
    BadSlotFormat(u32),
    /// A structure at `offset` of `len` bytes does not fit in the region.
    OutOfBounds {
        offset: u64,
        len: u64,
    },
    /// Two structures (header, ring table, rings, data window) overlap.
    Overlap {
        first: u64,
        second: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { offset } => write!(f, "offset {offset:#x} is misaligned"),
            Self::LengthNotWords { len } => write!(f, "region length {len} is not a multiple of 8"),
            Self::BadMagic(magic) => write!(f, "bad region magic {magic:#018x}"),
            Self::Version(mismatch) => write!(f, "{mismatch}"),
            Self::BadHeaderSize(size) => write!(f, "bad region header size {size}"),
            Self::RegionSizeMismatch { header, mapped } => write!(
                f,
                "region header claims {header:#x} bytes but {mapped:#x} are mapped"
            ),
            Self::ReservedNotZero => f.write_str("reserved region header field is not zero"),
            Self::TooManyRings(count) => write!(f, "{count} rings exceed the limit of {MAX_RINGS}"),
            Self::NoSuchRing { index, ring_count } => {
                write!(f, "ring {index} requested but the region has {ring_count}")
            }
            Self::BadSlotCount(count) => write!(f, "bad ring slot count {count}"),
            Self::BadSlotSize(size) => write!(f, "bad ring slot size {size}"),
            Self::BadSlotFormat(format) => write!(
                f,
                "bad ring slot format {format:#x} (0 framed and 1 record are defined)"
            ),
            Self::OutOfBounds { offset, len } => {
                write!(f, "{len:#x} bytes at {offset:#x} lie outside the region")
            }
            Self::Overlap { first, second } => {
                write!(f, "structures at {first:#x} and {second:#x} overlap")
            }
        }
    }
}

impl core::error::Error for LayoutError {}

impl From<VersionMismatch> for LayoutError {
    fn from(mismatch: VersionMismatch) -> Self {
        Self::Version(mismatch)
    }
}

/// One cache line of shared memory, for callers that allocate a region themselves (tests,
/// benchmarks, the hypervisor's static buffers) and want it cache-line aligned.
#[cfg(not(loom))]
#[repr(C, align(64))]
#[derive(Default)]
pub struct CacheLine(pub [AtomicU64; 8]);
#[cfg(not(loom))]
const _: () = assert!(size_of::<CacheLine>() == CACHE_LINE);

/// A view of shared memory as 64-bit words that only atomic operations touch.
///
/// The view does not own the memory; it is `Copy` and cheap to pass around.
#[derive(Clone, Copy)]
pub struct SharedRegion<'a> {
    words: &'a [AtomicU64],
}

impl<'a> SharedRegion<'a> {
    /// Views `words` as a region. Cache-line alignment is not required for correctness, only for
    /// speed; [`SharedRegion::from_cache_lines`] guarantees it.
    pub fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }

    /// Views cache-line-aligned memory as a region.
    #[cfg(not(loom))]
    pub fn from_cache_lines(lines: &'a [CacheLine]) -> Self {
        // SAFETY: `CacheLine` is `repr(C)` around `[AtomicU64; 8]` and exactly 64 bytes (asserted
        // above), so `lines` is `lines.len() * 8` contiguous, initialised `AtomicU64`s with no
        // padding between them, borrowed for `'a` like the returned slice.
        let words = unsafe {
            core::slice::from_raw_parts(lines.as_ptr().cast::<AtomicU64>(), lines.len() * 8)
        };
        Self { words }
    }

    /// Views a mapping of shared memory (a guest-physical range mapped into this address space)
    /// as a region. This is the only place raw shared memory becomes a Rust reference.
    ///
    /// # Safety
    /// `base..base + len` must stay mapped, readable and writable for `'a`, and within this
    /// address space be accessed only atomically (through this or another `SharedRegion`) for
    /// that long. The peer on the other side of the mapping may write anything at any time; that
    /// is allowed, it is what the atomic accesses are for.
    #[cfg(not(loom))]
    pub unsafe fn from_raw_parts(base: *mut u8, len: usize) -> Result<Self, LayoutError> {
        if base as usize % CACHE_LINE != 0 {
            return Err(LayoutError::Misaligned {
                offset: base as u64,
            });
        }
        if len % size_of::<u64>() != 0 {
            return Err(LayoutError::LengthNotWords { len });
        }
        // SAFETY: `base` is 64-byte (so 8-byte) aligned and `len` a multiple of 8, both checked
        // above; the caller guarantees the memory is live, mapped and only atomically accessed for
        // `'a`. `AtomicU64` has the size and alignment of `u64` and every bit pattern is valid.
        let words = unsafe { core::slice::from_raw_parts(base.cast::<AtomicU64>(), len / 8) };
        Ok(Self { words })
    }

    pub fn len_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The words from byte `offset` (8-aligned) for `len` bytes, or `None` if out of bounds.
    pub(crate) fn words_at(&self, offset: usize, len: usize) -> Option<&'a [AtomicU64]> {
        if offset % 8 != 0 || len % 8 != 0 {
            return None;
        }
        let start = offset / 8;
        self.words.get(start..start.checked_add(len / 8)?)
    }

    fn load(&self, offset: usize) -> Option<u64> {
        Some(self.words_at(offset, 8)?[0].load(Ordering::Acquire))
    }

    /// Writes a fresh layout: header, ring table, zeroed ring control blocks, with the rings and
    /// then the data window packed after the table on cache-line boundaries. The data window takes
    /// whatever is left. Done once, by the creator, before the peer is told the region exists.
    pub fn initialize(
        &self,
        rings: &[RingSpec],
        holder_token: u64,
    ) -> Result<RegionHeader, LayoutError> {
        let ring_count =
            u32::try_from(rings.len()).map_err(|_| LayoutError::TooManyRings(u32::MAX))?;
        if ring_count > MAX_RINGS {
            return Err(LayoutError::TooManyRings(ring_count));
        }
        let region_size = self.len_bytes() as u64;
        let table_offset = CACHE_LINE as u64;
        let table_len = u64::from(ring_count) * size_of::<RingDescriptor>() as u64;
        let mut next = align_up(table_offset + table_len);
        for (index, spec) in rings.iter().enumerate() {
            let layout = RingLayout::new(self, next, *spec)?;
            // A descriptor records a ring's offset as a `u32`.
            let offset = u32::try_from(next).map_err(|_| LayoutError::OutOfBounds {
                offset: next,
                len: spec.footprint(),
            })?;
            let descriptor_offset = table_offset as usize + index * size_of::<RingDescriptor>();
            self.store_descriptor(descriptor_offset, offset, *spec)?;
            RingControl::reset(self, &layout).map_err(|_| LayoutError::OutOfBounds {
                offset: next,
                len: 0,
            })?;
            next = align_up(layout.byte_range().1);
        }
        if next > region_size {
            return Err(LayoutError::OutOfBounds {
                offset: next,
                len: 0,
            });
        }
        let header = RegionHeader {
            magic: REGION_MAGIC,
            abi_version: ABI_VERSION.to_u32(),
            header_size: size_of::<RegionHeader>() as u32,
            region_size,
            ring_table_offset: table_offset as u32,
            ring_count,
            data_window_offset: next,
            data_window_size: region_size - next,
            holder_token,
            reserved: 0,
        };
        self.store_header(&header)?;
        Ok(header)
    }

    fn store_descriptor(
        &self,
        at: usize,
        ring_offset: u32,
        spec: RingSpec,
    ) -> Result<(), LayoutError> {
        let words =
            self.words_at(at, size_of::<RingDescriptor>())
                .ok_or(LayoutError::OutOfBounds {
                    offset: at as u64,
                    len: 16,
                })?;
        words[0].store(pack(ring_offset, spec.format.to_u32()), Ordering::Relaxed);
        words[1].store(pack(spec.slot_count, spec.slot_size), Ordering::Relaxed);
        Ok(())
    }

    fn store_header(&self, header: &RegionHeader) -> Result<(), LayoutError> {
        let words = self
            .words_at(0, CACHE_LINE)
            .ok_or(LayoutError::OutOfBounds {
                offset: 0,
                len: CACHE_LINE as u64,
            })?;
        let values = [
            0, // the magic goes last, with release ordering: it marks the region as ready
            pack(header.abi_version, header.header_size),
            header.region_size,
            pack(header.ring_table_offset, header.ring_count),
            header.data_window_offset,
            header.data_window_size,
            header.holder_token,
            header.reserved,
        ];
        for (word, value) in words.iter().zip(values).skip(1) {
            word.store(value, Ordering::Relaxed);
        }
        words[0].store(header.magic, Ordering::Release);
        Ok(())
    }

    /// Reads and validates the header; the returned view hands out validated rings and the
    /// data window. The header is copied: later writes by the peer do not change the view.
    pub fn attach(&self) -> Result<RegionView<'a>, LayoutError> {
        let words = self
            .words_at(0, CACHE_LINE)
            .ok_or(LayoutError::OutOfBounds {
                offset: 0,
                len: CACHE_LINE as u64,
            })?;
        let magic = words[0].load(Ordering::Acquire);
        if magic != REGION_MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let w = |i: usize| words[i].load(Ordering::Relaxed);
        let (abi_version, header_size) = unpack(w(1));
        let (ring_table_offset, ring_count) = unpack(w(3));
        let header = RegionHeader {
            magic,
            abi_version,
            header_size,
            region_size: w(2),
            ring_table_offset,
            ring_count,
            data_window_offset: w(4),
            data_window_size: w(5),
            holder_token: w(6),
            reserved: w(7),
        };
        AbiVersion::require_same(AbiVersion::from_u32(header.abi_version))?;
        self.validate_header(&header)?;
        let view = RegionView {
            region: *self,
            header,
        };
        view.check_rings_disjoint()?;
        Ok(view)
    }

    fn validate_header(&self, header: &RegionHeader) -> Result<(), LayoutError> {
        if header.header_size as usize != size_of::<RegionHeader>() {
            return Err(LayoutError::BadHeaderSize(header.header_size));
        }
        if header.reserved != 0 {
            return Err(LayoutError::ReservedNotZero);
        }
        let mapped = self.len_bytes() as u64;
        if header.region_size != mapped {
            return Err(LayoutError::RegionSizeMismatch {
                header: header.region_size,
                mapped,
            });
        }
        if header.ring_count > MAX_RINGS {
            return Err(LayoutError::TooManyRings(header.ring_count));
        }
        let table = Span::new(
            u64::from(header.ring_table_offset),
            u64::from(header.ring_count) * size_of::<RingDescriptor>() as u64,
        );
        let window = Span::new(header.data_window_offset, header.data_window_size);
        let header_span = Span::new(0, CACHE_LINE as u64);
        for span in [table, window] {
            span.require_inside(mapped)?;
            if span.start % 8 != 0 || span.len % 8 != 0 {
                return Err(LayoutError::Misaligned { offset: span.start });
            }
            header_span.require_disjoint(span)?;
        }
        table.require_disjoint(window)
    }
}

/// A validated region: its header and accessors for what the header describes.
#[derive(Clone, Copy)]
pub struct RegionView<'a> {
    region: SharedRegion<'a>,
    header: RegionHeader,
}

impl<'a> RegionView<'a> {
    pub fn header(&self) -> &RegionHeader {
        &self.header
    }

    pub fn region(&self) -> SharedRegion<'a> {
        self.region
    }

    /// Reads ring `index` from the table and validates it: slot format, geometry, bounds, and that
    /// it does not overlap the header, the ring table or the data window.
    pub fn ring(&self, index: u32) -> Result<RingLayout, LayoutError> {
        if index >= self.header.ring_count {
            return Err(LayoutError::NoSuchRing {
                index,
                ring_count: self.header.ring_count,
            });
        }
        let at =
            self.header.ring_table_offset as usize + index as usize * size_of::<RingDescriptor>();
        let placement = self.region.load(at).ok_or(LayoutError::OutOfBounds {
            offset: at as u64,
            len: 16,
        })?;
        let geometry = self.region.load(at + 8).ok_or(LayoutError::OutOfBounds {
            offset: at as u64,
            len: 16,
        })?;
        let (offset, format) = unpack(placement);
        let format = SlotFormat::from_u32(format).ok_or(LayoutError::BadSlotFormat(format))?;
        let (slot_count, slot_size) = unpack(geometry);
        let layout = RingLayout::new(
            &self.region,
            offset.into(),
            RingSpec {
                slot_count,
                slot_size,
                format,
            },
        )?;
        let (start, end) = layout.byte_range();
        let ring = Span::new(start, end - start);
        let header = &self.header;
        ring.require_disjoint(Span::new(0, CACHE_LINE as u64))?;
        ring.require_disjoint(Span::new(
            u64::from(header.ring_table_offset),
            u64::from(header.ring_count) * size_of::<RingDescriptor>() as u64,
        ))?;
        ring.require_disjoint(Span::new(
            header.data_window_offset,
            header.data_window_size,
        ))?;
        Ok(layout)
    }

    /// Fails unless every ring is valid and no two rings overlap (at most 64 rings, so the
    /// quadratic check is cheap).
    fn check_rings_disjoint(&self) -> Result<(), LayoutError> {
        for first in 0..self.header.ring_count {
            let (start, end) = self.ring(first)?.byte_range();
            for second in first + 1..self.header.ring_count {
                let (other_start, other_end) = self.ring(second)?.byte_range();
                Span::new(start, end - start)
                    .require_disjoint(Span::new(other_start, other_end - other_start))?;
            }
        }
        Ok(())
    }

    pub fn data_window(&self) -> DataWindow<'a> {
        DataWindow {
            words: self.data_window_words(),
        }
    }

    /// The data window as words, for a window that holds one structure of its own (a control
    /// region's status page, `crate::status_page`).
    pub fn data_window_words(&self) -> &'a [AtomicU64] {
        // Bounds and alignment were validated in `attach`, so the slice exists; an empty window
        // stands in rather than a panic if that ever stopped being true.
        self.region
            .words_at(
                self.header.data_window_offset as usize,
                self.header.data_window_size as usize,
            )
            .unwrap_or(&[])
    }
}

/// The bulk-data part of a region: byte buffers at 8-aligned offsets, named by [`BufferRef`]s.
#[derive(Clone, Copy)]
pub struct DataWindow<'a> {
    words: &'a [AtomicU64],
}

impl<'a> DataWindow<'a> {
    /// A window over `words` on its own, for peers that agree on a window outside a region.
    pub fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }

    pub fn len_bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Where `buffer`'s bytes are in this address space and how many there are, after the
    /// same bounds checks as [`DataWindow::read`]: for a system call that reads or writes them
    /// in place (the PV agent's `read(2)` straight into the window). Not a slice: the peer may
    /// change the bytes at any time, so Rust code must not hold a reference to them.
    #[cfg(not(loom))]
    pub fn raw_parts(&self, buffer: BufferRef) -> Result<(*mut u8, usize), WindowError> {
        let buffer = buffer.validate(self.len_bytes())?;
        // The words are `AtomicU64`s (interior mutability), so writing through a pointer
        // derived from them is allowed; `validate` kept the range inside `words`.
        let base = self.words.as_ptr().cast::<u8>().cast_mut();
        Ok((
            base.wrapping_add(buffer.offset as usize),
            buffer.len as usize,
        ))
    }

    /// Copies the referenced bytes into the front of `out`.
    pub fn read(&self, buffer: BufferRef, out: &mut [u8]) -> Result<(), WindowError> {
        let buffer = buffer.validate(self.len_bytes())?;
        let available = out.len();
        let destination =
            out.get_mut(..buffer.len as usize)
                .ok_or(WindowError::DestinationTooSmall {
                    needed: buffer.len,
                    available,
                })?;
        let words = self.words.get(buffer.offset as usize / 8..).unwrap_or(&[]);
        // Whole words first, each one load and one 8-byte store (a copy of a program image
        // or a read's data is thousands of words), then the tail's bytes.
        let mut chunks = destination.chunks_exact_mut(8);
        let mut words = words.iter();
        for (chunk, word) in (&mut chunks).zip(&mut words) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if let (false, Some(word)) = (tail.is_empty(), words.next()) {
            let bytes = word.load(Ordering::Relaxed).to_le_bytes();
            tail.copy_from_slice(&bytes[..tail.len()]);
        }
        Ok(())
    }

    /// Copies `data` into the window at `offset` (8-aligned) and returns its reference. The bytes
    /// after `data` up to the next 8-byte boundary are zeroed, never another buffer's.
    pub fn write(&self, offset: u32, data: &[u8]) -> Result<BufferRef, WindowError> {
        let len = u32::try_from(data.len()).map_err(|_| WindowError::OutOfBounds {
            buffer: BufferRef {
                offset,
                len: u32::MAX,
            },
            window_len: self.len_bytes(),
        })?;
        let buffer = BufferRef { offset, len };
        if len == 0 {
            return Ok(BufferRef::EMPTY);
        }
        let buffer = buffer.validate(self.len_bytes())?;
        let words = self.words.get(buffer.offset as usize / 8..).unwrap_or(&[]);
        // Whole words first (one 8-byte load and one store each), then the tail, zero-padded.
        let mut chunks = data.chunks_exact(8);
        let mut words = words.iter();
        for (chunk, word) in (&mut chunks).zip(&mut words) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        let tail = chunks.remainder();
        if let (false, Some(word)) = (tail.is_empty(), words.next()) {
            let mut bytes = [0u8; 8];
            bytes[..tail.len()].copy_from_slice(tail);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        Ok(buffer)
    }
}

/// A byte range inside a region, for bounds and overlap checks without overflow.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    len: u64,
}

impl Span {
    fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }

    fn require_inside(self, region_len: u64) -> Result<(), LayoutError> {
        match self.start.checked_add(self.len) {
            Some(end) if end <= region_len => Ok(()),
            _ => Err(LayoutError::OutOfBounds {
                offset: self.start,
                len: self.len,
            }),
        }
    }

    /// Empty spans overlap nothing. Both spans are already known to lie inside the region.
    fn require_disjoint(self, other: Span) -> Result<(), LayoutError> {
        let overlapping = self.len != 0
            && other.len != 0
            && self.start < other.start.saturating_add(other.len)
            && other.start < self.start.saturating_add(self.len);
        if overlapping {
            Err(LayoutError::Overlap {
                first: self.start,
                second: other.start,
            })
        } else {
            Ok(())
        }
    }
}

fn align_up(offset: u64) -> u64 {
    offset.next_multiple_of(CACHE_LINE as u64)
}

/// Two `u32` fields sharing one little-endian word: `low` at the lower address.
fn pack(low: u32, high: u32) -> u64 {
    u64::from(low) | u64::from(high) << 32
}

fn unpack(word: u64) -> (u32, u32) {
    (word as u32, (word >> 32) as u32)
}
