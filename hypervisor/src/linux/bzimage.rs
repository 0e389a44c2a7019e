//! Parsing and validating a `bzImage` per the x86 Linux boot protocol
//! (`Documentation/arch/x86/boot.rst`, "The Real-Mode Kernel Header").
//!
//! A bzImage is `(setup_sects + 1) * 512` bytes of real-mode setup code (the first
//! sector holds the setup header at 0x1f1), followed by the protected-mode kernel (the
//! compressed payload plus its decompressor). We only use the 64-bit entry point, so we
//! require protocol 2.12 or later (`xloadflags`, boot.rst "Details of Header Fields")
//! and `XLF_KERNEL_64`. The image is untrusted input: every read is bounds-checked and
//! every failure is a typed [`ImageError`].

use core::fmt;

/// Offsets in the image (and in `struct boot_params`, where the header is copied to the
/// same place), boot.rst "The Real-Mode Kernel Header".
pub mod offset {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const VID_MODE: usize = 0x1fa;
    pub const BOOT_FLAG: usize = 0x1fe;
    /// The 2-byte `jump` instruction; its second byte is the length of the header
    /// beyond 0x202 (boot.rst: "the end of the setup header can be calculated as
    /// 0x0202 + byte value at offset 0x0201").
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const MIN_ALIGNMENT: usize = 0x235;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const HARDWARE_SUBARCH: usize = 0x23c;
    pub const SETUP_DATA: usize = 0x250;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
}

/// "HdrS" at 0x202 (boot.rst, field `header`).
pub const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// 2.12 introduced `xloadflags` (and with it `XLF_KERNEL_64`).
pub const MIN_PROTOCOL: u16 = 0x020c;
/// The setup header ends before `edd_mbr_sig_buffer` at 0x290 in `struct boot_params`
/// (`Documentation/arch/x86/zero-page.rst`).
pub const HEADER_LIMIT: usize = 0x290;

/// `loadflags` bits (boot.rst, field `loadflags`).
pub const LOADED_HIGH: u8 = 1 << 0;
pub const KASLR_FLAG: u8 = 1 << 1;
pub const QUIET_FLAG: u8 = 1 << 5;
pub const KEEP_SEGMENTS: u8 = 1 << 6;
pub const CAN_USE_HEAP: u8 = 1 << 7;

/// `xloadflags` bits (boot.rst, field `xloadflags`).
pub const XLF_KERNEL_64: u16 = 1 << 0;
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel (boot.rst,
/// "64-bit Boot Protocol").
pub const ENTRY_64_OFFSET: u64 = 0x200;

const SECTOR: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The file is too short to hold even the part of the header named.
    Truncated {
        needed: usize,
        len: usize,
    },
    /// No "HdrS" at 0x202: not a bzImage (or a pre-2.00 zImage).
    NoHdrS,
    BadBootFlag(u16),
    ProtocolTooOld {
        version: u16,
    },
    /// The header length byte at 0x201 puts the header end past 0x290.
    HeaderTooLong {
        end: usize,
    },
    NotLoadedHigh,
    No64BitEntry,
    /// `setup_sects` says the setup code ends at or after the end of the file.
    NoProtectedModeKernel {
        setup_end: usize,
        len: usize,
    },
    BadAlignment {
        kernel_alignment: u32,
    },
    /// `init_size` smaller than the protected-mode kernel itself.
    InitSizeTooSmall {
        init_size: u32,
        kernel_len: usize,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, len } => write!(
                f,
                "the kernel image is {len} bytes, too short for its setup header (needs {needed})"
            ),
            Self::NoHdrS => f.write_str("the kernel image has no \"HdrS\" magic at 0x202: not a bzImage"),
            Self::BadBootFlag(v) => write!(f, "the kernel image's boot_flag is {v:#06x}, not 0xaa55"),
            Self::ProtocolTooOld { version } => write!(
                f,
                "the kernel uses boot protocol {}.{:02}; 2.12 or later is needed for the 64-bit entry",
                version >> 8,
                version & 0xff
            ),
            Self::HeaderTooLong { end } => write!(f, "the kernel's setup header claims to end at {end:#x}, past 0x290"),
            Self::NotLoadedHigh => f.write_str("the kernel is not a bzImage (LOADED_HIGH is clear in loadflags)"),
            Self::No64BitEntry => f.write_str("the kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)"),
            Self::NoProtectedModeKernel { setup_end, len } => write!(
                f,
                "the kernel's setup code ends at {setup_end:#x} but the file is only {len:#x} bytes"
            ),
            Self::BadAlignment { kernel_alignment } => write!(
                f,
                "the kernel's kernel_alignment {kernel_alignment:#x} is not a power of two of at least 4 KiB"
            ),
            Self::InitSizeTooSmall { init_size, kernel_len } => write!(
                f,
                "the kernel's init_size {init_size:#x} is smaller than its protected-mode part ({kernel_len:#x} bytes)"
            ),
        }
    }
}

/// A validated view of a bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    image: &'a [u8],
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    /// Setup sectors after the boot sector (0 in the file means 4).
    pub setup_sects: usize,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub relocatable: bool,
    pub kernel_alignment: u64,
    /// Where the kernel wants to be loaded (LOAD_PHYSICAL_ADDR); also the lowest
    /// address a relocatable kernel decompresses to (see `layout`).
    pub pref_address: u64,
    /// Bytes the kernel needs from its load address to run its decompressor and
    /// unpacked image.
    pub init_size: u64,
    /// Longest command line, without the terminating NUL.
    pub cmdline_size: u32,
    /// Highest address the initrd may end at (inclusive), per `initrd_addr_max`.
    pub initrd_addr_max: u64,
}

fn u8_at(b: &[u8], at: usize) -> Option<u8> {
    b.get(at).copied()
}
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> BzImage<'a> {
    /// Validates `image`; see [`ImageError`] for what is refused.
    pub fn parse(image: &'a [u8]) -> Result<Self, ImageError> {
        let len = image.len();
        let need = |needed: usize| ImageError::Truncated { needed, len };
        // Fixed part up to and including `version`.
        let magic = u32_at(image, offset::HEADER).ok_or(need(offset::HEADER + 4))?;
        if magic != HDRS_MAGIC {
            return Err(ImageError::NoHdrS);
        }
        let boot_flag = u16_at(image, offset::BOOT_FLAG).ok_or(need(offset::BOOT_FLAG + 2))?;
        if boot_flag != BOOT_FLAG_MAGIC {
            return Err(ImageError::BadBootFlag(boot_flag));
        }
        let version = u16_at(image, offset::VERSION).ok_or(need(offset::VERSION + 2))?;
        if version < MIN_PROTOCOL {
            return Err(ImageError::ProtocolTooOld { version });
        }
        let header_end = Self::header_end_in(image).ok_or(need(offset::JUMP + 2))?;
        if header_end > HEADER_LIMIT {
            return Err(ImageError::HeaderTooLong { end: header_end });
        }
        // 2.12 headers extend at least to `cmdline_size` .. `init_size` (0x264).
        let fixed_end = offset::INIT_SIZE + 4;
        if header_end < fixed_end || len < fixed_end {
            return Err(need(fixed_end.max(header_end)));
        }
        if len < header_end {
            return Err(need(header_end));
        }
        // All fields below are inside the header, which is inside the image.
        let field8 = |at| u8_at(image, at).unwrap_or(0);
        let field16 = |at| u16_at(image, at).unwrap_or(0);
        let field32 = |at| u32_at(image, at).unwrap_or(0);
        let setup_sects = match field8(offset::SETUP_SECTS) {
            0 => 4,
            n => n as usize,
        };
        let loadflags = field8(offset::LOADFLAGS);
        if loadflags & LOADED_HIGH == 0 {
            return Err(ImageError::NotLoadedHigh);
        }
        let xloadflags = field16(offset::XLOADFLAGS);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(ImageError::No64BitEntry);
        }
        let setup_end = (setup_sects + 1) * SECTOR;
        if setup_end >= len {
            return Err(ImageError::NoProtectedModeKernel { setup_end, len });
        }
        let kernel_alignment = field32(offset::KERNEL_ALIGNMENT);
        if !kernel_alignment.is_power_of_two() || kernel_alignment < 4096 {
            return Err(ImageError::BadAlignment { kernel_alignment });
        }
        let init_size = field32(offset::INIT_SIZE);
        let kernel_len = len - setup_end;
        if (init_size as usize) < kernel_len {
            return Err(ImageError::InitSizeTooSmall {
                init_size,
                kernel_len,
            });
        }
        Ok(Self {
            image,
            version,
            setup_sects,
            loadflags,
            xloadflags,
            relocatable: field8(offset::RELOCATABLE_KERNEL) != 0,
            kernel_alignment: kernel_alignment as u64,
            pref_address: u64_at(image, offset::PREF_ADDRESS).unwrap_or(0),
            init_size: init_size as u64,
            cmdline_size: field32(offset::CMDLINE_SIZE),
            initrd_addr_max: field32(offset::INITRD_ADDR_MAX) as u64,
        })
    }

    fn header_end_in(image: &[u8]) -> Option<usize> {
        Some(offset::HEADER + u8_at(image, offset::JUMP + 1)? as usize)
    }

    /// The setup header bytes (0x1f1 up to 0x202 + the byte at 0x201), to be copied to
    /// the same offsets of `struct boot_params` (boot.rst, "Loading the Rest of the
    /// Kernel" / zero-page.rst).
    pub fn setup_header(&self) -> &'a [u8] {
        let end = Self::header_end_in(self.image).unwrap_or(offset::HEADER);
        // `parse` checked offset::SETUP_SECTS < end <= len.
        self.image.get(offset::SETUP_SECTS..end).unwrap_or(&[])
    }

    /// Offset of the protected-mode kernel in the file: `(setup_sects + 1) * 512`.
    pub fn kernel_offset(&self) -> usize {
        (self.setup_sects + 1) * SECTOR
    }

    /// The protected-mode kernel, loaded at the load address.
    pub fn kernel(&self) -> &'a [u8] {
        self.image.get(self.kernel_offset()..).unwrap_or(&[])
    }

    /// Entry offset from the load address for the 64-bit boot protocol.
    pub fn entry_offset(&self) -> u64 {
        ENTRY_64_OFFSET
    }

    pub fn can_be_loaded_above_4g(&self) -> bool {
        self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0
    }

    /// Protocol 2.14 added `acpi_rsdp_addr` to `struct boot_params` (boot.rst,
    /// "Details of Header Fields", protocol history).
    pub fn has_acpi_rsdp_field(&self) -> bool {
        self.version >= 0x020e
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec::Vec;

    /// A synthetic bzImage header close to Debian 6.1's: protocol 2.15, 39 setup
    /// sectors, relocatable, 2 MiB alignment, pref 16 MiB, followed by `kernel_len`
    /// bytes of "protected-mode kernel".
    pub(crate) fn synthetic(kernel_len: usize) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut f = std::vec![0u8; (setup_sects as usize + 1) * 512 + kernel_len];
        let mut put = |at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
        put(offset::SETUP_SECTS, &[setup_sects]);
        put(offset::BOOT_FLAG, &0xaa55u16.to_le_bytes());
        put(offset::JUMP, &[0xeb, 0x6a]);
        put(offset::HEADER, b"HdrS");
        put(offset::VERSION, &0x020fu16.to_le_bytes());
        put(offset::LOADFLAGS, &[LOADED_HIGH]);
        put(offset::INITRD_ADDR_MAX, &0x7fff_ffffu32.to_le_bytes());
        put(offset::KERNEL_ALIGNMENT, &0x20_0000u32.to_le_bytes());
        put(offset::RELOCATABLE_KERNEL, &[1]);
        put(offset::XLOADFLAGS, &0x7fu16.to_le_bytes());
        put(offset::CMDLINE_SIZE, &0x7ffu32.to_le_bytes());
        put(offset::PREF_ADDRESS, &0x100_0000u64.to_le_bytes());
        put(offset::INIT_SIZE, &0x80_0000u32.to_le_bytes());
        let n = f.len();
        for (i, b) in f[(setup_sects as usize + 1) * 512..n]
            .iter_mut()
            .enumerate()
        {
            *b = (i % 251) as u8;
        }
        f
    }

    fn set(image: &mut [u8], at: usize, bytes: &[u8]) {
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn synthetic_image_parses() {
        let f = synthetic(0x3000);
        let img = BzImage::parse(&f).unwrap();
        assert_eq!(img.version, 0x020f);
        assert_eq!(img.setup_sects, 3);
        assert_eq!(img.kernel_offset(), 0x800);
        assert_eq!(img.kernel().len(), 0x3000);
        assert_eq!(img.kernel()[1], 1);
        assert_eq!(img.setup_header().len(), 0x26c - 0x1f1);
        assert_eq!(img.setup_header()[0], 3);
        assert_eq!(img.entry_offset(), 0x200);
        assert_eq!(img.pref_address, 0x100_0000);
        assert_eq!(img.kernel_alignment, 0x20_0000);
        assert_eq!(img.init_size, 0x80_0000);
        assert_eq!(img.cmdline_size, 0x7ff);
        assert_eq!(img.initrd_addr_max, 0x7fff_ffff);
        assert!(img.relocatable && img.can_be_loaded_above_4g() && img.has_acpi_rsdp_field());
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let mut f = synthetic(0x3000);
        set(&mut f, offset::SETUP_SECTS, &[0]);
        let img = BzImage::parse(&f).unwrap();
        assert_eq!(img.setup_sects, 4);
        assert_eq!(img.kernel_offset(), 5 * 512);
    }

    #[test]
    fn malformed_images_are_refused_with_reasons() {
        let good = synthetic(0x3000);
        let with = |at: usize, bytes: &[u8]| {
            let mut f = good.clone();
            set(&mut f, at, bytes);
            BzImage::parse(&f).unwrap_err()
        };
        assert_eq!(with(offset::HEADER, b"HdrX"), ImageError::NoHdrS);
        assert_eq!(with(offset::BOOT_FLAG, &[0, 0]), ImageError::BadBootFlag(0));
        assert_eq!(
            with(offset::VERSION, &0x020bu16.to_le_bytes()),
            ImageError::ProtocolTooOld { version: 0x020b }
        );
        assert_eq!(
            with(offset::JUMP + 1, &[0xa0]),
            ImageError::HeaderTooLong { end: 0x2a2 }
        );
        assert_eq!(with(offset::LOADFLAGS, &[0]), ImageError::NotLoadedHigh);
        assert_eq!(with(offset::XLOADFLAGS, &[0x7e]), ImageError::No64BitEntry);
        assert_eq!(
            with(offset::KERNEL_ALIGNMENT, &0x30_0000u32.to_le_bytes()),
            ImageError::BadAlignment {
                kernel_alignment: 0x30_0000
            }
        );
        assert_eq!(
            with(offset::INIT_SIZE, &0x100u32.to_le_bytes()),
            ImageError::InitSizeTooSmall {
                init_size: 0x100,
                kernel_len: 0x3000
            }
        );
        assert_eq!(
            with(offset::SETUP_SECTS, &[200]),
            ImageError::NoProtectedModeKernel {
                setup_end: 201 * 512,
                len: good.len()
            }
        );
        let e = with(offset::VERSION, &0x0201u16.to_le_bytes());
        assert_eq!(
            std::format!("{e}"),
            "the kernel uses boot protocol 2.01; 2.12 or later is needed for the 64-bit entry"
        );
    }

    #[test]
    fn every_truncation_and_random_corruption_is_an_error_not_a_panic() {
        let good = synthetic(0x400);
        for n in 0..good.len() {
            let _ = BzImage::parse(&good[..n]);
        }
        assert!(matches!(
            BzImage::parse(&good[..0x210]),
            Err(ImageError::Truncated { .. })
        ));
        assert!(matches!(
            BzImage::parse(&[]),
            Err(ImageError::Truncated {
                needed: 0x206,
                len: 0
            })
        ));
        // Deterministic xorshift corruption of the header bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = 0x1f0 + (state as usize % 0x80);
                f[at] = (state >> 32) as u8;
            }
            if let Ok(img) = BzImage::parse(&f) {
                let _ = (img.setup_header(), img.kernel());
            }
        }
    }

    /// The pinned Debian kernel, if `cargo xtask` has fetched it.
    pub(crate) fn debian_kernel() -> Option<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tandem/cache");
        let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
        });
        match found {
            Some(path) => std::fs::read(path).ok(),
            None => {
                std::println!(
                    "note: no vmlinuz-* in {} (run `cargo xtask` to fetch the pinned kernel); skipping",
                    dir.display()
                );
                None
            }
        }
    }

    #[test]
    fn debian_kernel_parses() {
        let Some(file) = debian_kernel() else { return };
        let img = BzImage::parse(&file).unwrap();
        assert!(img.version >= 0x020f, "version {:#x}", img.version);
        assert!(img.relocatable);
        assert_eq!(img.pref_address, 0x100_0000);
        assert_eq!(img.kernel_alignment, 0x20_0000);
        assert!(img.init_size as usize > img.kernel().len());
        assert!(img.cmdline_size >= 2047);
        assert_eq!(img.kernel_offset() + img.kernel().len(), file.len());
    }
}
