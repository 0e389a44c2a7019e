//! Guest-linear to guest-physical translation through the guest's own page tables, for
//! reading the instruction at a guest's RIP. 4-level IA-32e paging only (SDM Vol. 3A §4.5):
//! the mode Linux and Lavender run in; paging off is the identity.

/// Physical-address bits of a paging-structure entry, 51:12 (SDM Vol. 3A Table 4-15).
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
const PAGE_SIZE: u64 = 1 << 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at this level (4 = PML4 .. 1 = page table) is not present.
    NotPresent { level: u8 },
    /// A paging structure lies outside the guest's RAM.
    TableOutsideGuest { address: u64 },
}

/// Translates `linear` through the 4-level tables at `cr3`; `read` reads an 8-byte entry
/// at a guest-physical address (`None` outside the guest's RAM).
pub fn translate(
    cr3: u64,
    linear: u64,
    read: impl Fn(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    let mut table = cr3 & ADDRESS_MASK;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (linear >> shift) & 0x1ff;
        let address = table + index * 8;
        let entry = read(address).ok_or(WalkError::TableOutsideGuest { address })?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { level });
        }
        // A 1 GiB (level 3) or 2 MiB (level 2) page ends the walk.
        if level == 1 || (level <= 3 && entry & PAGE_SIZE != 0) {
            let offset_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDRESS_MASK & !offset_mask) | (linear & offset_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    unreachable!("level 1 always ends the walk")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn memory(entries: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
        let map: HashMap<u64, u64> = entries.iter().copied().collect();
        move |address| (address < 0x100_0000).then(|| map.get(&address).copied().unwrap_or(0))
    }

    #[test]
    fn four_kib_two_mib_and_one_gib_pages() {
        // linear 0xffff_ffff_8100_1234: PML4 511, PDPT 510, PD 8, PT 1.
        let linear = 0xffff_ffff_8100_1234;
        let tables = [
            (0x1000 + 511 * 8, 0x2000 | 3),
            (0x2000 + 510 * 8, 0x3000 | 3),
            (0x3000 + 8 * 8, 0x4000 | 3),
            (0x4000 + 8, 0x0123_4000 | 3),
        ];
        assert_eq!(translate(0x1000, linear, memory(&tables)), Ok(0x0123_4234));
        let two_mib = [
            (0x1000 + 511 * 8, 0x2000 | 3),
            (0x2000 + 510 * 8, 0x3000 | 3),
            (0x3000 + 8 * 8, 0x0120_0000 | PAGE_SIZE | 3),
        ];
        assert_eq!(translate(0x1000, linear, memory(&two_mib)), Ok(0x0120_1234));
        let one_gib = [
            (0x1000 + 511 * 8, 0x2000 | 3),
            (0x2000 + 510 * 8, 0x4000_0000 | PAGE_SIZE | 3),
        ];
        assert_eq!(translate(0x1000, linear, memory(&one_gib)), Ok(0x4100_1234));
    }

    #[test]
    fn missing_entries_and_tables_outside_the_guest() {
        assert_eq!(
            translate(0x1000, 0x1234, memory(&[])),
            Err(WalkError::NotPresent { level: 4 })
        );
        let outside = [(0x1000, 0x7000_0000 | 3)];
        assert_eq!(
            translate(0x1000, 0x1234, memory(&outside)),
            Err(WalkError::TableOutsideGuest {
                address: 0x7000_0000
            })
        );
        // A PS bit in a PML4 entry is reserved, not a 512 GiB page: the walk goes on.
        let pml4_ps = [(0x1000, 0x2000 | PAGE_SIZE | 3)];
        assert_eq!(
            translate(0x1000, 0x1234, memory(&pml4_ps)),
            Err(WalkError::NotPresent { level: 3 })
        );
    }
}
