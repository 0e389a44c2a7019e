//! The host's early check of a `--linux-kernel` file: is it a bzImage the hypervisor can
//! boot through the 64-bit entry? It reads the setup header only (the x86 boot protocol,
//! the kernel's `Documentation/arch/x86/boot.rst`, "The Real-Mode Kernel Header"), so a
//! wrong file is refused in milliseconds instead of after a build and a boot. The hypervisor
//! validates the whole image again when it loads it.

use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

/// Offsets in the image, boot.rst "The Real-Mode Kernel Header".
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const LOADFLAGS: usize = 0x211;
const XLOADFLAGS: usize = 0x236;
/// Everything read here lies before this offset.
const HEADER_BYTES: usize = XLOADFLAGS + 2;

const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Protocol 2.12 introduced `xloadflags`, which says whether there is a 64-bit entry point.
const MIN_PROTOCOL: u16 = 0x020c;
/// `loadflags` bit 0: the protected-mode code is loaded at 0x100000 (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point (at 0x200 into it).
const XLF_KERNEL_64: u16 = 1 << 0;

/// Why a file is not a bootable bzImage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    TooShort { len: usize },
    NoHdrS,
    BadBootFlag(u16),
    ProtocolTooOld { version: u16 },
    NotLoadedHigh,
    No64BitEntry,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { len } => write!(
                f,
                "not a bzImage: {len} bytes, shorter than the x86 boot protocol's setup header \
                 ({HEADER_BYTES:#x} bytes)"
            ),
            Self::NoHdrS => f.write_str(
                "not a bzImage: no \"HdrS\" magic at offset 0x202 (x86 boot protocol header)",
            ),
            Self::BadBootFlag(flag) => {
                write!(
                    f,
                    "not a bzImage: boot_flag at 0x1fe is {flag:#06x}, not 0xaa55"
                )
            }
            Self::ProtocolTooOld { version } => write!(
                f,
                "the kernel speaks boot protocol {}.{:02}; 2.12 or later is needed for the \
                 64-bit entry",
                version >> 8,
                version & 0xff
            ),
            Self::NotLoadedHigh => {
                f.write_str("not a bzImage: LOADED_HIGH is clear in loadflags (a zImage?)")
            }
            Self::No64BitEntry => f.write_str(
                "the kernel has no 64-bit entry point (XLF_KERNEL_64 is clear in xloadflags): \
                 a 32-bit kernel?",
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Checks the first bytes of a kernel image.
pub fn check_header(image: &[u8]) -> Result<(), HeaderError> {
    let u16_at = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]);
    if image.len() < HEADER_BYTES {
        // A short file with the magic is a truncated kernel; without it, not a kernel at all.
        return Err(if image.get(HEADER..HEADER + 4) == Some(HDRS_MAGIC) {
            HeaderError::TooShort { len: image.len() }
        } else {
            HeaderError::NoHdrS
        });
    }
    if &image[HEADER..HEADER + 4] != HDRS_MAGIC {
        return Err(HeaderError::NoHdrS);
    }
    let boot_flag = u16_at(BOOT_FLAG);
    if boot_flag != BOOT_FLAG_MAGIC {
        return Err(HeaderError::BadBootFlag(boot_flag));
    }
    let version = u16_at(VERSION);
    if version < MIN_PROTOCOL {
        return Err(HeaderError::ProtocolTooOld { version });
    }
    if image[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(HeaderError::NotLoadedHigh);
    }
    if u16_at(XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(HeaderError::No64BitEntry);
    }
    Ok(())
}

/// Checks the file given as `--linux-kernel`; the error names the option, the path and the
/// problem.
pub fn check_file(path: &Path) -> Result<()> {
    let context = || format!("--linux-kernel {}", path.display());
    if !path.is_file() {
        anyhow::bail!("{}: no such file", context());
    }
    let mut head = Vec::with_capacity(HEADER_BYTES);
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_BYTES as u64).read_to_end(&mut head))
        .with_context(context)?;
    check_header(&head).with_context(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header fields of a 64-bit bzImage with boot protocol 2.15.
    fn good_header() -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
        image[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[LOADFLAGS] = LOADED_HIGH;
        image[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&0x3u16.to_le_bytes());
        image
    }

    #[test]
    fn a_64_bit_bzimage_passes() {
        assert_eq!(check_header(&good_header()), Ok(()));
    }

    #[test]
    fn text_and_short_files_are_not_bzimages() {
        assert_eq!(
            check_header(b"root:x:0:0:root:/root:/bin/bash\n"),
            Err(HeaderError::NoHdrS)
        );
        assert_eq!(check_header(&[0; 0x1000]), Err(HeaderError::NoHdrS));
        let truncated = &good_header()[..0x210];
        assert_eq!(
            check_header(truncated),
            Err(HeaderError::TooShort { len: 0x210 })
        );
    }

    #[test]
    fn each_header_field_is_checked() {
        let mut flag = good_header();
        flag[BOOT_FLAG] = 0;
        assert_eq!(check_header(&flag), Err(HeaderError::BadBootFlag(0xaa00)));

        let mut old = good_header();
        old[VERSION..VERSION + 2].copy_from_slice(&0x020bu16.to_le_bytes());
        assert_eq!(
            check_header(&old),
            Err(HeaderError::ProtocolTooOld { version: 0x020b })
        );
        assert!(HeaderError::ProtocolTooOld { version: 0x020b }
            .to_string()
            .contains("2.11"));

        let mut low = good_header();
        low[LOADFLAGS] = 0;
        assert_eq!(check_header(&low), Err(HeaderError::NotLoadedHigh));

        let mut x32 = good_header();
        x32[XLOADFLAGS] = 0x2;
        assert_eq!(check_header(&x32), Err(HeaderError::No64BitEntry));
    }

    #[test]
    fn file_errors_name_the_option_and_the_problem() {
        let err = format!("{:#}", check_file(Path::new("/etc/passwd")).unwrap_err());
        assert!(err.contains("--linux-kernel /etc/passwd"), "{err}");
        assert!(err.contains("HdrS"), "{err}");
        let err = format!(
            "{:#}",
            check_file(Path::new("/nonexistent/bzImage")).unwrap_err()
        );
        assert!(err.contains("no such file"), "{err}");

        let file = std::env::temp_dir().join(format!("tandem-bzimage-{}", std::process::id()));
        std::fs::write(&file, good_header()).unwrap();
        check_file(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
    }
}
