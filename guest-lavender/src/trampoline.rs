//! The AP start-up trampoline's placement and parameters.
//!
//! A core started with a STARTUP IPI begins in real mode at `CS:IP = (vector << 8):0`, i.e.
//! at physical `vector << 12`, with paging off (Intel SDM Vol. 3A §9.4.4, "MP Initialization
//! Example"; §11.6.1 on the STARTUP IPI's vector field). The trampoline (code in
//! `kernel::arch::trampoline`) is copied to such a page of Lavender's own memory below 1 MiB,
//! once, with the fields that depend on where it lies (its GDT base, the far-jump targets) and
//! the Rust entry patched in; before each start only the page-table root, the stack and the
//! entry's argument are written into the page. This module decides the page and computes the
//! patched bytes.

/// Real-mode code runs below 1 MiB: the STARTUP vector names a page in `0..0x100000`.
pub const REAL_MODE_LIMIT: u64 = 0x10_0000;
pub const PAGE: u64 = 4096;
/// STARTUP vectors 0xA0..=0xBF are reserved (SDM Vol. 3A §9.4.4.1, Table 9-1 notes):
/// they point at the legacy video and option-ROM area.
const RESERVED_VECTORS: core::ops::RangeInclusive<u8> = 0xa0..=0xbf;

/// Selectors of the trampoline's own GDT, used until the core loads Lavender's: 32-bit code,
/// flat data, 64-bit code.
pub const CODE32_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const CODE64_SELECTOR: u16 = 0x18;

/// The STARTUP vector that starts a core at `page`, if a core can start there.
pub fn startup_vector(page: u64) -> Option<u8> {
    if page % PAGE != 0 || page == 0 || page >= REAL_MODE_LIMIT {
        return None;
    }
    let vector = (page / PAGE) as u8;
    (!RESERVED_VECTORS.contains(&vector)).then_some(vector)
}

/// The lowest page that lies wholly inside one of `usable` (`start..end` ranges) and can be a
/// trampoline page.
pub fn choose_page(usable: impl IntoIterator<Item = (u64, u64)>) -> Option<u64> {
    usable
        .into_iter()
        .filter_map(|(start, end)| {
            let mut page = start.div_ceil(PAGE) * PAGE;
            while page + PAGE <= end.min(REAL_MODE_LIMIT) {
                if startup_vector(page).is_some() {
                    return Some(page);
                }
                page += PAGE;
            }
            None
        })
        .min()
}

/// Byte offsets, inside the trampoline image, of the fields to patch (from the assembly's
/// labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// The trampoline's GDT.
    pub gdt: usize,
    /// The `LGDT` operand: limit `u16`, base `u32`.
    pub gdtr: usize,
    /// The 32-bit code the far jump out of real mode lands on.
    pub protected: usize,
    /// That far jump's `m16:32` operand.
    pub far32: usize,
    /// The 64-bit code the far jump out of protected mode lands on.
    pub long: usize,
    pub far64: usize,
    /// Parameters: CR3 `u32`, initial RSP `u64`, entry `u64`, entry argument `u64`.
    pub cr3: usize,
    pub stack: usize,
    pub entry: usize,
    pub argument: usize,
    /// Length of the whole image.
    pub len: usize,
}

/// What the started core needs: its page tables, stack and entry argument. These change
/// with every start and are written into the installed page ([`start_fields`]); the rest of
/// the image ([`patch`]) depends only on where the page lies and on the Rust entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Lavender's PML4. Loaded into CR3 in 32-bit mode, so it must lie below 4 GiB.
    pub cr3: u64,
    /// Top of the core's first stack (exclusive).
    pub stack_top: u64,
    pub argument: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The page cannot be a trampoline page.
    BadPage(u64),
    /// CR3 above 4 GiB: the trampoline loads it with a 32-bit move.
    PageTablesTooHigh(u64),
    /// An offset (or the image) does not fit the image (or a page).
    BadOffsets,
}

/// The initial RSP for a stack ending at `top`: the entry is reached by `JMP`, not `CALL`, so
/// RSP must look as if a return address had just been pushed onto a 16-byte aligned stack
/// (System V ABI: RSP + 8 is 16-byte aligned at function entry).
pub fn entry_rsp(top: u64) -> u64 {
    (top & !15).wrapping_sub(8)
}

/// Patches `image` (a copy of the trampoline) to run from `page` and to jump to `entry`, the
/// 64-bit Rust entry (`extern "sysv64" fn(argument) -> !`). Done once, when the page is set up.
pub fn patch(image: &mut [u8], page: u64, offsets: &Offsets, entry: u64) -> Result<(), PatchError> {
    startup_vector(page).ok_or(PatchError::BadPage(page))?;
    if offsets.len > image.len() || offsets.len as u64 > PAGE {
        return Err(PatchError::BadOffsets);
    }
    let image = &mut image[..offsets.len];
    // The page lies below 1 MiB, so every linear address inside it fits 32 bits.
    let linear = |offset: usize| page as u32 + offset as u32;
    let mut put = |at: usize, bytes: &[u8]| -> Result<(), PatchError> {
        image
            .get_mut(at..at + bytes.len())
            .ok_or(PatchError::BadOffsets)?
            .copy_from_slice(bytes);
        Ok(())
    };
    put(offsets.gdtr + 2, &linear(offsets.gdt).to_le_bytes())?;
    put(offsets.far32, &linear(offsets.protected).to_le_bytes())?;
    put(offsets.far32 + 4, &CODE32_SELECTOR.to_le_bytes())?;
    put(offsets.far64, &linear(offsets.long).to_le_bytes())?;
    put(offsets.far64 + 4, &CODE64_SELECTOR.to_le_bytes())?;
    put(offsets.entry, &entry.to_le_bytes())
}

/// The fields of an installed trampoline to write before each start, as (byte offset, 64-bit
/// little-endian value): CR3 (its upper half zero), the initial RSP and the entry's argument.
pub fn start_fields(offsets: &Offsets, params: &Params) -> Result<[(usize, u64); 3], PatchError> {
    if params.cr3 > u64::from(u32::MAX) {
        return Err(PatchError::PageTablesTooHigh(params.cr3));
    }
    let fields = [
        (offsets.cr3, params.cr3),
        (offsets.stack, entry_rsp(params.stack_top)),
        (offsets.argument, params.argument),
    ];
    if fields.iter().any(|(at, _)| at + 8 > offsets.len) || offsets.len as u64 > PAGE {
        return Err(PatchError::BadOffsets);
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFSETS: Offsets = Offsets {
        gdt: 0x40,
        gdtr: 0x60,
        protected: 0x10,
        far32: 0x68,
        long: 0x30,
        far64: 0x70,
        cr3: 0x78,
        stack: 0x80,
        entry: 0x88,
        argument: 0x90,
        len: 0x98,
    };
    const PARAMS: Params = Params {
        cr3: 0x1234_5000,
        stack_top: 0x40_0000,
        argument: 3,
    };
    const ENTRY: u64 = 0x20_1230;

    fn word(image: &[u8], at: usize, len: usize) -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&image[at..at + len]);
        u64::from_le_bytes(bytes)
    }

    #[test]
    fn vectors_are_page_numbers_below_one_mib() {
        assert_eq!(startup_vector(0x8000), Some(0x08));
        assert_eq!(startup_vector(0x9f000), Some(0x9f));
        assert_eq!(startup_vector(0xa0000), None, "reserved vector");
        assert_eq!(startup_vector(0xc0000), Some(0xc0));
        assert_eq!(startup_vector(0x100000), None);
        assert_eq!(startup_vector(0x8800), None, "not page aligned");
        assert_eq!(startup_vector(0), None, "page 0 is the null page");
    }

    #[test]
    fn the_page_is_whole_inside_usable_memory() {
        assert_eq!(choose_page([(0x0, 0x8000_0000)]), Some(0x1000));
        assert_eq!(choose_page([(0x1800, 0x3000)]), Some(0x2000));
        assert_eq!(choose_page([(0x1800, 0x2fff)]), None);
        assert_eq!(choose_page([(0x200000, 0x400000)]), None, "above 1 MiB");
        assert_eq!(choose_page([(0xa0000, 0xc1000)]), Some(0xc0000));
        assert_eq!(
            choose_page([(0x50000, 0x60000), (0x3000, 0x5000)]),
            Some(0x3000)
        );
    }

    #[test]
    fn patched_fields() {
        let mut image = vec![0u8; OFFSETS.len];
        patch(&mut image, 0x8000, &OFFSETS, ENTRY).unwrap();
        assert_eq!(word(&image, OFFSETS.gdtr + 2, 4), 0x8040);
        assert_eq!(word(&image, OFFSETS.far32, 4), 0x8010);
        assert_eq!(word(&image, OFFSETS.far32 + 4, 2), 0x08);
        assert_eq!(word(&image, OFFSETS.far64, 4), 0x8030);
        assert_eq!(word(&image, OFFSETS.far64 + 4, 2), 0x18);
        assert_eq!(word(&image, OFFSETS.entry, 8), 0x20_1230);
        // The GDT limit (the first two bytes of the GDTR) is the assembly's, untouched.
        assert_eq!(word(&image, OFFSETS.gdtr, 2), 0);
        // The per-start fields are left to `start_fields`.
        assert_eq!(word(&image, OFFSETS.cr3, 8), 0);
    }

    #[test]
    fn start_fields_per_core() {
        assert_eq!(
            start_fields(&OFFSETS, &PARAMS),
            Ok([
                (OFFSETS.cr3, 0x1234_5000),
                (OFFSETS.stack, 0x40_0000 - 8),
                (OFFSETS.argument, 3)
            ])
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut image = vec![0u8; OFFSETS.len];
        assert_eq!(
            patch(&mut image, 0xa0000, &OFFSETS, ENTRY),
            Err(PatchError::BadPage(0xa0000))
        );
        let high = Params {
            cr3: 1 << 32,
            ..PARAMS
        };
        assert_eq!(
            start_fields(&OFFSETS, &high),
            Err(PatchError::PageTablesTooHigh(1 << 32))
        );
        let mut short = vec![0u8; 0x20];
        assert_eq!(
            patch(&mut short, 0x8000, &OFFSETS, ENTRY),
            Err(PatchError::BadOffsets)
        );
        let truncated = Offsets {
            len: OFFSETS.argument + 4,
            ..OFFSETS
        };
        assert_eq!(
            start_fields(&truncated, &PARAMS),
            Err(PatchError::BadOffsets)
        );
    }

    #[test]
    fn entry_stack_alignment() {
        assert_eq!(entry_rsp(0x1000), 0xff8);
        assert_eq!(entry_rsp(0x1008), 0xff8);
        assert_eq!((entry_rsp(0x12345) + 8) % 16, 0);
    }
}
