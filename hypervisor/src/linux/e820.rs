//! The Linux guest's e820 memory map (`struct boot_e820_entry`, zero-page.rst offset
//! 0x2d0; types from ACPI 6.5 §15 "System Address Map Interfaces", Table 15.1).
//!
//! Built from the guest-physical RAM ranges of the partition, minus:
//! - the legacy hole 0xa0000..0x100000 (VGA window, option and system ROMs), always
//!   reported *reserved* like PC firmware does (SeaBIOS under QEMU reports
//!   `0x0-0x9fbff usable`, `0xf0000-0xfffff reserved`, `0x100000-... usable`). Page 0
//!   stays *usable* as on every PC BIOS: Linux reserves it itself
//!   (`trim_bios_range()`: "e820: update [mem 0x00000000-0x00000fff] usable ==> reserved").
//! - the ACPI tables area, reported *ACPI reclaimable* (type 3) as firmware does;
//! - shared regions, reported *reserved* so Linux neither allocates nor scans them,
//!   but may still map them (`/dev/mem`, `memremap`) since they are not System RAM.
//!
//! The result is sorted, adjacent entries of one type are merged, and no two entries
//! overlap. Reserved and ACPI entries outside RAM are reported as well.

use core::fmt;

use heapless::Vec;

use crate::partition::MemoryRange;

/// `E820_MAX_ENTRIES_ZEROPAGE` (arch/x86/include/uapi/asm/setup_data.h / bootparam.h).
pub const MAX_ENTRIES: usize = 128;
/// Size of `struct boot_e820_entry`: addr u64, size u64, type u32 (packed).
pub const ENTRY_SIZE: usize = 20;
pub const LEGACY_HOLE: (u64, u64) = (0xa_0000, 0x10_0000);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
    Nvs = 4,
    Unusable = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }

    /// The 20 bytes of `struct boot_e820_entry`.
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Error {
    NoRam,
    /// A range wraps around the 64-bit address space or is empty.
    BadRange {
        addr: u64,
        size: u64,
    },
    /// More than 128 entries (the zero page holds no more).
    TooManyEntries,
    /// A reserved or ACPI range (e.g. a shared region) overlaps another non-RAM range.
    Conflict {
        a: (u64, u64),
        b: (u64, u64),
    },
}

impl fmt::Display for E820Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRam => f.write_str("the Linux guest has no RAM range"),
            Self::BadRange { addr, size } => {
                write!(
                    f,
                    "memory range {addr:#x}+{size:#x} is empty or wraps around"
                )
            }
            Self::TooManyEntries => write!(f, "the e820 map needs more than {MAX_ENTRIES} entries"),
            Self::Conflict { a, b } => write!(
                f,
                "e820: {:#x}..{:#x} overlaps {:#x}..{:#x}",
                a.0, a.1, b.0, b.1
            ),
        }
    }
}

pub type E820Map = Vec<E820Entry, MAX_ENTRIES>;

fn checked(addr: u64, size: u64) -> Result<(u64, u64), E820Error> {
    match addr.checked_add(size) {
        Some(end) if size > 0 => Ok((addr, end)),
        _ => Err(E820Error::BadRange { addr, size }),
    }
}

/// Builds the map. `reserved` are guest-physical [start, end) ranges (shared regions);
/// `acpi` is the ACPI tables area. Non-RAM ranges win over RAM where they overlap.
pub fn build(
    ram: &[MemoryRange],
    reserved: &[(u64, u64)],
    acpi: Option<(u64, u64)>,
) -> Result<E820Map, E820Error> {
    if ram.is_empty() {
        return Err(E820Error::NoRam);
    }
    // Non-RAM "holes" with their type (legacy hole, ACPI area, shared regions); they
    // must not overlap each other.
    let mut holes: Vec<(u64, u64, E820Type), { 2 + crate::partition::MAX_SHARED_REGIONS * 2 }> =
        Vec::new();
    let push = |holes: &mut Vec<_, _>, h: (u64, u64, E820Type)| {
        holes.push(h).map_err(|_| E820Error::TooManyEntries)
    };
    push(
        &mut holes,
        (LEGACY_HOLE.0, LEGACY_HOLE.1, E820Type::Reserved),
    )?;
    if let Some((s, e)) = acpi {
        let (s, e) = checked(s, e.wrapping_sub(s))?;
        push(&mut holes, (s, e, E820Type::Acpi))?;
    }
    for &(s, e) in reserved {
        let (s, e) = checked(s, e.wrapping_sub(s))?;
        push(&mut holes, (s, e, E820Type::Reserved))?;
    }
    for (i, a) in holes.iter().enumerate() {
        for b in &holes[..i] {
            if a.0 < b.1 && b.0 < a.1 {
                return Err(E820Error::Conflict {
                    a: (a.0, a.1),
                    b: (b.0, b.1),
                });
            }
        }
    }
    holes.sort_unstable_by_key(|h| h.0);

    let mut ram_sorted: Vec<(u64, u64), { crate::partition::MAX_RANGES_PER_GUEST }> = Vec::new();
    for r in ram {
        ram_sorted
            .push(checked(r.guest, r.size)?)
            .map_err(|_| E820Error::TooManyEntries)?;
    }
    ram_sorted.sort_unstable();

    let mut map = E820Map::new();
    // RAM pieces not covered by holes.
    for &(s, e) in &ram_sorted {
        let mut cursor = s;
        for h in holes.iter().filter(|h| h.0 < e && s < h.1) {
            if h.0 > cursor {
                add(&mut map, cursor, h.0, E820Type::Ram)?;
            }
            cursor = cursor.max(h.1);
        }
        if cursor < e {
            add(&mut map, cursor, e, E820Type::Ram)?;
        }
    }
    for h in &holes {
        add(&mut map, h.0, h.1, h.2)?;
    }
    map.sort_unstable_by_key(|e| e.addr);
    // Merge adjacent or overlapping entries of the same type (overlapping RAM can only
    // come from overlapping configured ranges, which validation refuses; merging keeps
    // the map well-formed anyway).
    let mut merged = E820Map::new();
    for entry in map {
        match merged.last_mut() {
            Some(last) if last.kind == entry.kind && entry.addr <= last.end() => {
                last.size = last.end().max(entry.end()) - last.addr;
            }
            _ => merged.push(entry).map_err(|_| E820Error::TooManyEntries)?,
        }
    }
    Ok(merged)
}

fn add(map: &mut E820Map, start: u64, end: u64, kind: E820Type) -> Result<(), E820Error> {
    map.push(E820Entry {
        addr: start,
        size: end - start,
        kind,
    })
    .map_err(|_| E820Error::TooManyEntries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec as StdVec;

    fn ram(list: &[(u64, u64)]) -> StdVec<MemoryRange> {
        list.iter()
            .map(|&(guest, size)| MemoryRange {
                guest,
                host: guest.wrapping_add(0x1000_0000),
                size,
            })
            .collect()
    }

    fn entries(map: &E820Map) -> StdVec<(u64, u64, E820Type)> {
        map.iter().map(|e| (e.addr, e.end(), e.kind)).collect()
    }

    use E820Type::*;

    #[test]
    fn one_range_from_zero_gets_the_pc_shape() {
        let map = build(
            &ram(&[(0, 0x800_0000)]),
            &[],
            Some((0x7ff_0000, 0x7ff_2000)),
        )
        .unwrap();
        assert_eq!(
            entries(&map),
            [
                (0, 0xa_0000, Ram),
                (0xa_0000, 0x10_0000, Reserved),
                (0x10_0000, 0x7ff_0000, Ram),
                (0x7ff_0000, 0x7ff_2000, Acpi),
                (0x7ff_2000, 0x800_0000, Ram),
            ]
        );
        assert_eq!(
            map[2].to_bytes(),
            [0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0xef, 0x07, 0, 0, 0, 0, 1, 0, 0, 0]
        );
    }

    #[test]
    fn unsorted_ranges_shared_regions_and_merging() {
        let map = build(
            &ram(&[
                (0x10_0000, 0x100_0000),
                (0, 0xa_0000),
                (0x110_0000, 0x100_0000),
            ]),
            &[(0x300_0000, 0x310_0000)],
            None,
        )
        .unwrap();
        assert_eq!(
            entries(&map),
            [
                (0, 0xa_0000, Ram),
                (0xa_0000, 0x10_0000, Reserved),
                (0x10_0000, 0x210_0000, Ram),
                (0x300_0000, 0x310_0000, Reserved),
            ]
        );
        for w in map.windows(2) {
            assert!(w[0].end() <= w[1].addr);
        }
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(build(&[], &[], None), Err(E820Error::NoRam));
        assert_eq!(
            build(&ram(&[(u64::MAX - 0xfff, 0x2000)]), &[], None),
            Err(E820Error::BadRange {
                addr: u64::MAX - 0xfff,
                size: 0x2000
            })
        );
        assert_eq!(
            build(
                &ram(&[(0, 0x100_0000)]),
                &[(0x80_0000, 0x90_0000)],
                Some((0x8f_0000, 0x8f_1000))
            ),
            Err(E820Error::Conflict {
                a: (0x80_0000, 0x90_0000),
                b: (0x8f_0000, 0x8f_1000)
            })
        );
    }
}
