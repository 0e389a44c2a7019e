//! The zero page: `struct boot_params` (arch/x86/include/uapi/asm/bootparam.h), laid
//! out in `Documentation/arch/x86/zero-page.rst`, filled as boot.rst ("Details of
//! Header Fields", "64-bit Boot Protocol") asks of a boot loader.

use core::fmt;

use super::bzimage::{offset as hdr, BzImage, CAN_USE_HEAP, KASLR_FLAG, KEEP_SEGMENTS, QUIET_FLAG};
use super::e820::{E820Entry, ENTRY_SIZE, MAX_ENTRIES};

pub const ZERO_PAGE_SIZE: usize = 4096;

/// zero-page.rst offsets outside the setup header.
pub mod offset {
    /// `acpi_rsdp_addr` (u64, protocol 2.14+).
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// `ext_ramdisk_image`, `ext_ramdisk_size`, `ext_cmd_line_ptr` (u32 each): the high
    /// 32 bits of the header's fields.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: usize = 0x1e8;
    /// `sentinel` (u8): must stay 0, or the kernel assumes a loader that copied the
    /// whole first sector and clears fields it did not mean to (boot.rst, "sentinel").
    pub const SENTINEL: usize = 0x1ef;
    /// `e820_table[E820_MAX_ENTRIES_ZEROPAGE]` of 20-byte entries.
    pub const E820_TABLE: usize = 0x2d0;
}

/// What goes into the zero page besides the kernel's own header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootParamsInput<'a> {
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline: u64,
    /// Guest-physical address and size of the initrd (size 0: none).
    pub initrd: (u64, u64),
    /// Guest-physical address of the RSDP (0: none).
    pub acpi_rsdp: u64,
    /// Where the protected-mode kernel was loaded.
    pub load_address: u64,
    pub e820: &'a [E820Entry],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootParamsError {
    TooManyE820Entries(usize),
    /// The kernel's header (protocol < 2.14) has no `acpi_rsdp_addr`: it would look for
    /// the RSDP in the BIOS areas, where there is none.
    NoRsdpField {
        version: u16,
    },
    /// The image's header is longer than the zero page allows (already refused by
    /// `BzImage::parse`; kept so this module never indexes out of bounds).
    HeaderTooLong,
}

impl fmt::Display for BootParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyE820Entries(n) => {
                write!(f, "boot_params: {n} e820 entries, at most {MAX_ENTRIES} fit")
            }
            Self::NoRsdpField { version } => write!(
                f,
                "boot_params: boot protocol {}.{:02} has no acpi_rsdp_addr (2.14+ needed to pass the ACPI tables)",
                version >> 8,
                version & 0xff
            ),
            Self::HeaderTooLong => f.write_str("boot_params: the setup header does not fit"),
        }
    }
}

fn put(page: &mut [u8; ZERO_PAGE_SIZE], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Builds the zero page for `image`.
pub fn build(
    image: &BzImage,
    input: &BootParamsInput,
) -> Result<[u8; ZERO_PAGE_SIZE], BootParamsError> {
    let mut page = [0u8; ZERO_PAGE_SIZE];
    // boot.rst "Loading the Rest of the Kernel": zero the page, then copy the setup
    // header from the image (0x1f1 .. 0x202 + byte at 0x201) to the same offsets.
    let header = image.setup_header();
    if hdr::SETUP_SECTS + header.len() > super::bzimage::HEADER_LIMIT
        || header.len() < hdr::INIT_SIZE + 4 - hdr::SETUP_SECTS
    {
        return Err(BootParamsError::HeaderTooLong);
    }
    put(&mut page, hdr::SETUP_SECTS, header);

    // vid_mode (write, obligatory): 0xffff = "normal".
    put(&mut page, hdr::VID_MODE, &0xffffu16.to_le_bytes());
    // type_of_loader (write, obligatory): 0xff = undefined boot loader ID.
    page[hdr::TYPE_OF_LOADER] = 0xff;
    // loadflags (modify, obligatory): keep LOADED_HIGH (and any bit we do not know);
    // clear QUIET_FLAG (we want the decompressor's messages), KEEP_SEGMENTS (obsolete
    // since 2.02 and meaningless for the 64-bit entry), CAN_USE_HEAP (heap_end_ptr is
    // for the real-mode setup code we skip) and KASLR_FLAG (set by the kernel itself).
    page[hdr::LOADFLAGS] &= !(QUIET_FLAG | KEEP_SEGMENTS | CAN_USE_HEAP | KASLR_FLAG);
    put(&mut page, hdr::HEAP_END_PTR, &0u16.to_le_bytes());
    // code32_start (modify, optional): the 32-bit entry = load address; unused by
    // the 64-bit entry but consistent for anything that reads it.
    put(
        &mut page,
        hdr::CODE32_START,
        &(input.load_address as u32).to_le_bytes(),
    );
    // cmd_line_ptr (write, obligatory) + ext_cmd_line_ptr (high 32 bits).
    put(
        &mut page,
        hdr::CMD_LINE_PTR,
        &(input.cmdline as u32).to_le_bytes(),
    );
    put(
        &mut page,
        offset::EXT_CMD_LINE_PTR,
        &((input.cmdline >> 32) as u32).to_le_bytes(),
    );
    // ramdisk_image / ramdisk_size (write, obligatory) + ext_ fields.
    let (rd, rd_size) = if input.initrd.1 == 0 {
        (0, 0)
    } else {
        input.initrd
    };
    put(&mut page, hdr::RAMDISK_IMAGE, &(rd as u32).to_le_bytes());
    put(
        &mut page,
        hdr::RAMDISK_SIZE,
        &(rd_size as u32).to_le_bytes(),
    );
    put(
        &mut page,
        offset::EXT_RAMDISK_IMAGE,
        &((rd >> 32) as u32).to_le_bytes(),
    );
    put(
        &mut page,
        offset::EXT_RAMDISK_SIZE,
        &((rd_size >> 32) as u32).to_le_bytes(),
    );
    // hardware_subarch (2.07+): 0 = default x86 PC. setup_data (2.09+): 0 = none.
    put(&mut page, hdr::HARDWARE_SUBARCH, &0u32.to_le_bytes());
    put(&mut page, hdr::SETUP_DATA, &0u64.to_le_bytes());
    // acpi_rsdp_addr (2.14+).
    if input.acpi_rsdp != 0 {
        if !image.has_acpi_rsdp_field() {
            return Err(BootParamsError::NoRsdpField {
                version: image.version,
            });
        }
        put(
            &mut page,
            offset::ACPI_RSDP_ADDR,
            &input.acpi_rsdp.to_le_bytes(),
        );
    }
    // e820_entries + e820_table.
    if input.e820.len() > MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(input.e820.len()));
    }
    page[offset::E820_ENTRIES] = input.e820.len() as u8;
    for (i, entry) in input.e820.iter().enumerate() {
        put(
            &mut page,
            offset::E820_TABLE + i * ENTRY_SIZE,
            &entry.to_bytes(),
        );
    }
    page[offset::SENTINEL] = 0;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::bzimage::tests::synthetic;
    use crate::linux::bzimage::LOADED_HIGH;
    use crate::linux::e820::E820Type;

    fn u32_at(p: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(p[at..at + 4].try_into().unwrap())
    }

    fn e820() -> [E820Entry; 2] {
        [
            E820Entry {
                addr: 0,
                size: 0xa_0000,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: 0x10_0000,
                size: 0x7f0_0000,
                kind: E820Type::Ram,
            },
        ]
    }

    #[test]
    fn fields_land_at_their_zero_page_offsets() {
        let mut file = synthetic(0x2000);
        // Bits the loader must clear.
        file[0x211] = LOADED_HIGH | QUIET_FLAG | KEEP_SEGMENTS | CAN_USE_HEAP;
        let image = BzImage::parse(&file).unwrap();
        let map = e820();
        let page = build(
            &image,
            &BootParamsInput {
                cmdline: 0x1_2345_6000,
                initrd: (0x2_7000_0000, 0x1_0000_1000),
                acpi_rsdp: 0x7ff_0000,
                load_address: 0x100_0000,
                e820: &map,
            },
        )
        .unwrap();
        // Header copied (0x1f1 .. 0x26c), then the loader's fields.
        assert_eq!(&page[0x202..0x206], b"HdrS");
        assert_eq!(page[0x1f1], 3);
        assert_eq!(&page[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(page[0x210], 0xff);
        assert_eq!(page[0x211], LOADED_HIGH);
        assert_eq!(u32_at(&page, 0x228), 0x2345_6000);
        assert_eq!(u32_at(&page, 0x0c8), 1);
        assert_eq!(u32_at(&page, 0x218), 0x7000_0000);
        assert_eq!(u32_at(&page, 0x0c0), 2);
        assert_eq!(u32_at(&page, 0x21c), 0x1000);
        assert_eq!(u32_at(&page, 0x0c4), 1);
        assert_eq!(u32_at(&page, 0x214), 0x100_0000);
        assert_eq!(&page[0x070..0x078], &0x7ff_0000u64.to_le_bytes());
        assert_eq!(page[0x1e8], 2);
        assert_eq!(page[0x1ef], 0);
        assert_eq!(&page[0x2d0 + 20..0x2d0 + 40], &map[1].to_bytes());
        assert_eq!(&page[0x2d0 + 40..0x2d0 + 60], &[0; 20]);
        // Untouched areas stay zero (screen_info, EFI info).
        assert!(page[..0x70].iter().all(|b| *b == 0));
        assert!(page[0x1c0..0x1e0].iter().all(|b| *b == 0));
    }

    #[test]
    fn limits_are_typed_errors() {
        let file = synthetic(0x2000);
        let image = BzImage::parse(&file).unwrap();
        let many = [e820()[0]; 129];
        let input = BootParamsInput {
            cmdline: 0x9000,
            initrd: (0, 0),
            acpi_rsdp: 0,
            load_address: 0x100_0000,
            e820: &many,
        };
        assert_eq!(
            build(&image, &input),
            Err(BootParamsError::TooManyE820Entries(129))
        );
        let mut old = file.clone();
        old[0x206] = 0x0d; // 2.13
        let image = BzImage::parse(&old).unwrap();
        let input = BootParamsInput {
            acpi_rsdp: 0xe_0000,
            e820: &many[..1],
            ..input
        };
        assert_eq!(
            build(&image, &input),
            Err(BootParamsError::NoRsdpField { version: 0x020d })
        );
    }
}
