//! Extended page tables: guest-physical -> host-physical translation per guest
//! (Intel SDM Vol. 3C §29.3). Pure logic over a [`TableMemory`] so the same code builds
//! tables in the hypervisor's page pool and, in unit tests, in a `Vec`.

use core::fmt;

/// Entries per table, bytes per table.
pub const ENTRIES: usize = 512;
pub const PAGE_4K: u64 = 1 << 12;
pub const PAGE_2M: u64 = 1 << 21;

/// EPT entry bits (SDM Vol. 3C §29.3.2, Tables 29-1..29-6).
const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXECUTE: u64 = 1 << 2;
const MEMORY_TYPE_SHIFT: u64 = 3;
/// Leaf at the PD level maps 2 MiB.
const LARGE_PAGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-walk length 4, encoded as length - 1 in EPTP bits 5:3 (SDM Vol. 3C §25.6.11).
const EPTP_WALK_LENGTH_4: u64 = 3 << 3;

/// EPT memory types (SDM Vol. 3C §29.3.7; values as in the PAT/MTRR encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// RAM.
    WriteBack = 6,
    /// Device memory (MMIO): no caching, no speculation.
    Uncacheable = 0,
}

/// Access a guest has to a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl Access {
    pub const ALL: Self = Self {
        read: true,
        write: true,
        execute: true,
    };
    pub const READ_WRITE: Self = Self {
        read: true,
        write: true,
        execute: false,
    };

    fn bits(self) -> u64 {
        (if self.read { READ } else { 0 })
            | (if self.write { WRITE } else { 0 })
            | (if self.execute { EXECUTE } else { 0 })
    }

    fn from_bits(bits: u64) -> Self {
        Self {
            read: bits & READ != 0,
            write: bits & WRITE != 0,
            execute: bits & EXECUTE != 0,
        }
    }
}

/// Where EPT tables live: allocates zeroed 4 KiB tables and gives access to them by
/// their host-physical address.
pub trait TableMemory {
    /// A fresh, zeroed table; its host-physical address.
    fn allocate_table(&mut self) -> Option<u64>;
    fn table(&mut self, host_physical: u64) -> &mut [u64; ENTRIES];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// Addresses or size not 4 KiB aligned, or an empty range.
    Misaligned { guest: u64, host: u64, size: u64 },
    /// Guest-physical range beyond the 48-bit space a 4-level walk covers.
    OutOfRange { guest: u64, size: u64 },
    /// The range overlaps a page that is already mapped.
    AlreadyMapped { guest: u64 },
    /// The table pool is exhausted.
    OutOfTables,
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { guest, host, size } => {
                write!(f, "EPT mapping guest {guest:#x} -> host {host:#x} size {size:#x} is not 4 KiB aligned")
            }
            Self::OutOfRange { guest, size } => {
                write!(f, "EPT mapping at guest {guest:#x} size {size:#x} exceeds the 48-bit guest-physical space")
            }
            Self::AlreadyMapped { guest } => {
                write!(f, "guest-physical {guest:#x} is already mapped")
            }
            Self::OutOfTables => f.write_str("out of memory for EPT tables"),
        }
    }
}

/// One guest's EPT hierarchy, rooted at a PML4 table.
pub struct Ept {
    root: u64,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub host_physical: u64,
    pub access: Access,
    pub memory_type: MemoryType,
    pub page_size: u64,
}

fn index(guest: u64, level: u32) -> usize {
    ((guest >> (12 + 9 * level)) & 0x1ff) as usize
}

impl Ept {
    pub fn new(memory: &mut impl TableMemory) -> Result<Self, EptError> {
        Ok(Self {
            root: memory.allocate_table().ok_or(EptError::OutOfTables)?,
        })
    }

    /// The EPT pointer for the VMCS: write-back paging structures, 4-level walk.
    pub fn pointer(&self) -> u64 {
        self.root | EPTP_WALK_LENGTH_4 | MemoryType::WriteBack as u64
    }

    /// Maps `size` bytes of guest-physical `guest` to host-physical `host`, with 2 MiB
    /// pages where both addresses and the remaining size allow it and 4 KiB pages
    /// elsewhere. Fails without partial effect on misalignment; on overlap, pages mapped
    /// before the overlapping one stay mapped (callers validate overlaps up front).
    pub fn map(
        &mut self,
        memory: &mut impl TableMemory,
        guest: u64,
        host: u64,
        size: u64,
        access: Access,
        memory_type: MemoryType,
    ) -> Result<(), EptError> {
        if size == 0 || !(guest | host | size).is_multiple_of(PAGE_4K) {
            return Err(EptError::Misaligned { guest, host, size });
        }
        if guest.checked_add(size).is_none_or(|end| end > 1 << 48)
            || host.checked_add(size).is_none()
        {
            return Err(EptError::OutOfRange { guest, size });
        }
        let leaf_bits = access.bits() | ((memory_type as u64) << MEMORY_TYPE_SHIFT);
        let mut offset = 0;
        while offset < size {
            let (g, h, left) = (guest + offset, host + offset, size - offset);
            let large = (g | h) % PAGE_2M == 0 && left >= PAGE_2M;
            let leaf_level = if large { 1 } else { 0 };
            let table = self.walk_to(memory, g, leaf_level)?;
            let entry = &mut memory.table(table)[index(g, leaf_level)];
            if *entry != 0 {
                return Err(EptError::AlreadyMapped { guest: g });
            }
            *entry = h | leaf_bits | if large { LARGE_PAGE } else { 0 };
            offset += if large { PAGE_2M } else { PAGE_4K };
        }
        Ok(())
    }

    /// The table at `leaf_level` (0 = PT, 1 = PD) covering `guest`, creating the
    /// intermediate tables on the way.
    fn walk_to(
        &mut self,
        memory: &mut impl TableMemory,
        guest: u64,
        leaf_level: u32,
    ) -> Result<u64, EptError> {
        let mut table = self.root;
        for level in (leaf_level + 1..=3).rev() {
            let slot = index(guest, level);
            let entry = memory.table(table)[slot];
            table = if entry == 0 {
                let next = memory.allocate_table().ok_or(EptError::OutOfTables)?;
                // Non-leaf entries grant everything; the leaf decides (SDM §29.3.3).
                memory.table(table)[slot] = next | READ | WRITE | EXECUTE;
                next
            } else if entry & LARGE_PAGE != 0 {
                return Err(EptError::AlreadyMapped { guest });
            } else {
                entry & ADDRESS_MASK
            };
        }
        Ok(table)
    }

    /// Translates a guest-physical address the way the processor would.
    pub fn translate(&self, memory: &mut impl TableMemory, guest: u64) -> Option<Translation> {
        let mut table = self.root;
        for level in (0..=3).rev() {
            let entry = memory.table(table)[index(guest, level)];
            if entry & (READ | WRITE | EXECUTE) == 0 {
                return None;
            }
            let leaf = level == 0 || (level == 1 && entry & LARGE_PAGE != 0);
            if leaf {
                let page_size = if level == 0 { PAGE_4K } else { PAGE_2M };
                let memory_type = match (entry >> MEMORY_TYPE_SHIFT) & 7 {
                    6 => MemoryType::WriteBack,
                    _ => MemoryType::Uncacheable,
                };
                return Some(Translation {
                    host_physical: (entry & ADDRESS_MASK & !(page_size - 1)) + guest % page_size,
                    access: Access::from_bits(entry),
                    memory_type,
                    page_size,
                });
            }
            table = entry & ADDRESS_MASK;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Tables in a Vec; "host-physical" addresses are 4 KiB-spaced fake addresses.
    struct VecMemory {
        tables: Vec<[u64; ENTRIES]>,
        limit: usize,
    }

    const FAKE_BASE: u64 = 0x4000_0000;

    impl TableMemory for VecMemory {
        fn allocate_table(&mut self) -> Option<u64> {
            if self.tables.len() == self.limit {
                return None;
            }
            self.tables.push([0; ENTRIES]);
            Some(FAKE_BASE + (self.tables.len() as u64 - 1) * PAGE_4K)
        }
        fn table(&mut self, host_physical: u64) -> &mut [u64; ENTRIES] {
            &mut self.tables[((host_physical - FAKE_BASE) / PAGE_4K) as usize]
        }
    }

    fn memory() -> VecMemory {
        VecMemory {
            tables: Vec::new(),
            limit: 64,
        }
    }

    #[test]
    fn offset_mapping_uses_2mib_pages_and_translates() {
        let mut mem = memory();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(
            &mut mem,
            0,
            0x0800_0000,
            0x0800_0000,
            Access::ALL,
            MemoryType::WriteBack,
        )
        .unwrap();
        // PML4 + PDPT + one PD: 64 x 2 MiB pages need no page table.
        assert_eq!(mem.tables.len(), 3);
        let t = ept.translate(&mut mem, 0x0012_3456).unwrap();
        assert_eq!(t.host_physical, 0x0812_3456);
        assert_eq!(t.page_size, PAGE_2M);
        assert_eq!(t.memory_type, MemoryType::WriteBack);
        assert_eq!(
            ept.translate(&mut mem, 0x0800_0000),
            None,
            "one past the end is unmapped"
        );
    }

    #[test]
    fn unaligned_edges_use_4kib_pages() {
        let mut mem = memory();
        let mut ept = Ept::new(&mut mem).unwrap();
        // 0x1000..0x40_1000 cannot use 2 MiB pages at either end.
        ept.map(
            &mut mem,
            0x1000,
            0x1000,
            0x40_0000,
            Access::ALL,
            MemoryType::WriteBack,
        )
        .unwrap();
        let first = ept.translate(&mut mem, 0x1000).unwrap();
        let middle = ept.translate(&mut mem, 0x20_0000).unwrap();
        let last = ept.translate(&mut mem, 0x40_0fff).unwrap();
        assert_eq!(
            (first.page_size, middle.page_size, last.page_size),
            (PAGE_4K, PAGE_2M, PAGE_4K)
        );
        assert_eq!(last.host_physical, 0x40_0fff);
        assert_eq!(ept.translate(&mut mem, 0), None);
        assert_eq!(ept.translate(&mut mem, 0x40_1000), None);
    }

    #[test]
    fn mmio_is_uncacheable_with_the_given_access() {
        let mut mem = memory();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(
            &mut mem,
            0xfec0_0000,
            0xfec0_0000,
            0x1000,
            Access::READ_WRITE,
            MemoryType::Uncacheable,
        )
        .unwrap();
        let t = ept.translate(&mut mem, 0xfec0_0010).unwrap();
        assert_eq!(t.memory_type, MemoryType::Uncacheable);
        assert!(t.access.read && t.access.write && !t.access.execute);
    }

    #[test]
    fn overlap_misalignment_and_exhaustion_are_errors() {
        let mut mem = memory();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(
            &mut mem,
            0,
            0x10_0000,
            0x20_0000,
            Access::ALL,
            MemoryType::WriteBack,
        )
        .unwrap();
        assert_eq!(
            ept.map(
                &mut mem,
                0x1000,
                0x1000,
                0x1000,
                Access::ALL,
                MemoryType::WriteBack
            ),
            Err(EptError::AlreadyMapped { guest: 0x1000 })
        );
        assert!(matches!(
            ept.map(
                &mut mem,
                0x123,
                0,
                0x1000,
                Access::ALL,
                MemoryType::WriteBack
            ),
            Err(EptError::Misaligned { .. })
        ));
        assert!(matches!(
            ept.map(
                &mut mem,
                1 << 48,
                0,
                0x1000,
                Access::ALL,
                MemoryType::WriteBack
            ),
            Err(EptError::OutOfRange { .. })
        ));
        let mut tiny = VecMemory {
            tables: Vec::new(),
            limit: 2,
        };
        let mut ept = Ept::new(&mut tiny).unwrap();
        assert_eq!(
            ept.map(&mut tiny, 0, 0, 0x1000, Access::ALL, MemoryType::WriteBack),
            Err(EptError::OutOfTables)
        );
    }

    #[test]
    fn pointer_encodes_write_back_and_walk_length() {
        let mut mem = memory();
        let ept = Ept::new(&mut mem).unwrap();
        assert_eq!(ept.pointer(), FAKE_BASE | (3 << 3) | 6);
    }
}
