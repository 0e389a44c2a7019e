//! Reading a user program's ELF file (System V ABI, ELF-64 object format) into a load plan:
//! the `PT_LOAD` segments and the `R_X86_64_RELATIVE` relocations of a static
//! position-independent executable, which is what `x86_64-unknown-none` builds by default.
//!
//! Everything is validated in [`ElfImage::parse`], before the kernel allocates anything: every
//! offset and size stays inside the file, every segment and relocation inside the image's span,
//! and no other relocation type or dynamic dependency is accepted. A bad file is refused with
//! an [`ElfError`] naming the first problem; no input makes this code panic.

use core::fmt;
use core::ops::Range;

/// Largest address span an image may cover (its highest segment end, from address 0).
pub const MAX_IMAGE_SPAN: u64 = 256 << 20;

const HEADER_SIZE: usize = 64;
const PROGRAM_HEADER_SIZE: usize = 56;
const MAX_PROGRAM_HEADERS: usize = 64;
const PAGE: u64 = 4096;

const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_RELAENT: u64 = 9;
const DT_REL: u64 = 17;
const DT_JMPREL: u64 = 23;
const RELA_SIZE: u64 = 24;
const R_X86_64_RELATIVE: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than the structure that must be at `offset`.
    Truncated {
        offset: usize,
    },
    NotElf,
    /// Not a 64-bit little-endian x86-64 file of the current version.
    WrongKind,
    /// Not a position-independent executable (`ET_DYN`).
    NotPositionIndependent,
    /// Needs a program interpreter or shared libraries.
    Dynamic,
    BadProgramHeaders,
    /// A segment whose sizes, alignment or addresses do not make sense.
    BadSegment {
        index: usize,
    },
    /// The image spans more than [`MAX_IMAGE_SPAN`].
    TooLarge,
    NoSegments,
    /// The entry point is not in an executable segment.
    BadEntry,
    BadDynamicSection,
    /// A relocation other than `R_X86_64_RELATIVE`, or `REL` (not `RELA`) relocations.
    UnsupportedRelocation {
        kind: u32,
    },
    /// A relocation that would write outside the writable memory of the image.
    BadRelocation {
        offset: u64,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { offset } => write!(f, "file truncated (at byte {offset})"),
            Self::NotElf => write!(f, "not an ELF file"),
            Self::WrongKind => write!(f, "not a 64-bit little-endian x86-64 ELF file"),
            Self::NotPositionIndependent => write!(f, "not a position-independent executable"),
            Self::Dynamic => write!(f, "needs an interpreter or shared libraries"),
            Self::BadProgramHeaders => write!(f, "bad program header table"),
            Self::BadSegment { index } => write!(f, "bad segment (program header {index})"),
            Self::TooLarge => write!(f, "image spans more than {} MiB", MAX_IMAGE_SPAN >> 20),
            Self::NoSegments => write!(f, "no loadable segment"),
            Self::BadEntry => write!(f, "entry point outside the executable segments"),
            Self::BadDynamicSection => write!(f, "bad dynamic section"),
            Self::UnsupportedRelocation { kind } => write!(f, "unsupported relocation type {kind}"),
            Self::BadRelocation { offset } => {
                write!(f, "relocation at {offset:#x} outside the writable segments")
            }
        }
    }
}

/// One `PT_LOAD` segment, at its address relative to the image's load base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub address: u64,
    pub memory_size: u64,
    /// The bytes the file supplies (the rest, up to `memory_size`, is zero).
    pub file: Range<usize>,
    pub writable: bool,
    pub executable: bool,
}

/// Where to write `base + addend` (both relative to the load base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relocation {
    pub offset: u64,
    pub addend: u64,
}

/// A validated image.
#[derive(Clone, Debug)]
pub struct ElfImage<'a> {
    bytes: &'a [u8],
    program_headers: Range<usize>,
    entry: u64,
    span: u64,
    /// File range of the `RELA` table.
    relocations: Range<usize>,
}

fn read<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], ElfError> {
    offset
        .checked_add(N)
        .and_then(|end| bytes.get(offset..end))
        .and_then(|slice| slice.try_into().ok())
        .ok_or(ElfError::Truncated { offset })
}

fn u16_at(bytes: &[u8], offset: usize) -> Result<u16, ElfError> {
    read(bytes, offset).map(u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], offset: usize) -> Result<u32, ElfError> {
    read(bytes, offset).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], offset: usize) -> Result<u64, ElfError> {
    read(bytes, offset).map(u64::from_le_bytes)
}

struct ProgramHeader {
    kind: u32,
    flags: u32,
    offset: u64,
    address: u64,
    file_size: u64,
    memory_size: u64,
    align: u64,
}

fn program_header(bytes: &[u8], at: usize) -> Result<ProgramHeader, ElfError> {
    Ok(ProgramHeader {
        kind: u32_at(bytes, at)?,
        flags: u32_at(bytes, at + 4)?,
        offset: u64_at(bytes, at + 8)?,
        address: u64_at(bytes, at + 16)?,
        file_size: u64_at(bytes, at + 32)?,
        memory_size: u64_at(bytes, at + 40)?,
        align: u64_at(bytes, at + 48)?,
    })
}

impl<'a> ElfImage<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let ident: [u8; 16] = read(bytes, 0)?;
        if ident[..4] != *b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        // ELFCLASS64, ELFDATA2LSB, EV_CURRENT.
        if ident[4] != 2 || ident[5] != 1 || ident[6] != 1 || u16_at(bytes, 18)? != EM_X86_64 {
            return Err(ElfError::WrongKind);
        }
        if u16_at(bytes, 16)? != ET_DYN {
            return Err(ElfError::NotPositionIndependent);
        }
        let entry = u64_at(bytes, 24)?;
        let table = usize::try_from(u64_at(bytes, 32)?).map_err(|_| ElfError::BadProgramHeaders)?;
        let entry_size = usize::from(u16_at(bytes, 54)?);
        let count = usize::from(u16_at(bytes, 56)?);
        if entry_size != PROGRAM_HEADER_SIZE || count == 0 || count > MAX_PROGRAM_HEADERS {
            return Err(ElfError::BadProgramHeaders);
        }
        let table_end = table
            .checked_add(count * PROGRAM_HEADER_SIZE)
            .filter(|end| *end <= bytes.len() && table >= HEADER_SIZE)
            .ok_or(ElfError::BadProgramHeaders)?;
        let mut image = Self {
            bytes,
            program_headers: table..table_end,
            entry,
            span: 0,
            relocations: 0..0,
        };
        let mut dynamic = None;
        let mut loads = 0;
        for index in 0..count {
            let header = program_header(bytes, table + index * PROGRAM_HEADER_SIZE)?;
            match header.kind {
                PT_LOAD => {
                    image.check_segment(index, &header)?;
                    loads += 1;
                }
                PT_INTERP => return Err(ElfError::Dynamic),
                PT_DYNAMIC => dynamic = Some(header),
                _ => {}
            }
        }
        if loads == 0 {
            return Err(ElfError::NoSegments);
        }
        if !image
            .segments()
            .any(|segment| segment.executable && segment.contains(entry, 1))
        {
            return Err(ElfError::BadEntry);
        }
        if let Some(header) = dynamic {
            image.relocations = image.read_dynamic(&header)?;
            image.check_relocations()?;
        }
        Ok(image)
    }

    fn check_segment(&mut self, index: usize, header: &ProgramHeader) -> Result<(), ElfError> {
        let bad = ElfError::BadSegment { index };
        let file_end = header
            .offset
            .checked_add(header.file_size)
            .filter(|end| *end <= self.bytes.len() as u64)
            .ok_or(bad)?;
        let memory_end = header
            .address
            .checked_add(header.memory_size)
            .ok_or(ElfError::TooLarge)?;
        if memory_end > MAX_IMAGE_SPAN {
            return Err(ElfError::TooLarge);
        }
        let page_congruent = header.align <= 1 || header.offset % PAGE == header.address % PAGE;
        if header.file_size > header.memory_size || !page_congruent || file_end < header.offset {
            return Err(bad);
        }
        self.span = self.span.max(memory_end);
        Ok(())
    }

    /// The `RELA` table's file range, from the dynamic section.
    fn read_dynamic(&self, header: &ProgramHeader) -> Result<Range<usize>, ElfError> {
        let bad = ElfError::BadDynamicSection;
        let start = usize::try_from(header.offset).map_err(|_| bad)?;
        let end = start
            .checked_add(usize::try_from(header.file_size).map_err(|_| bad)?)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(bad)?;
        let (mut table, mut size, mut entry_size) = (None, 0, RELA_SIZE);
        for at in (start..end).step_by(16) {
            let tag = u64_at(self.bytes, at)?;
            let value = u64_at(self.bytes, at + 8)?;
            match tag {
                DT_NULL => break,
                DT_NEEDED => return Err(ElfError::Dynamic),
                DT_REL => return Err(ElfError::UnsupportedRelocation { kind: 0 }),
                DT_RELA => table = Some(value),
                DT_RELASZ => size = value,
                DT_RELAENT => entry_size = value,
                // Relocations for lazily bound calls only exist with shared libraries.
                DT_JMPREL => return Err(ElfError::Dynamic),
                _ => {}
            }
        }
        let Some(address) = table else {
            return Ok(0..0);
        };
        if entry_size != RELA_SIZE || size % RELA_SIZE != 0 {
            return Err(bad);
        }
        // The table is addressed by its load address: find the file bytes behind it.
        let segment = self
            .segments()
            .find(|segment| segment.contains(address, size))
            .ok_or(bad)?;
        let offset = (address - segment.address) as usize;
        let file_start = segment.file.start + offset;
        let file_end = file_start + size as usize;
        if file_end > segment.file.end {
            return Err(bad);
        }
        Ok(file_start..file_end)
    }

    fn check_relocations(&self) -> Result<(), ElfError> {
        // The writable segments, read once rather than from the headers for each relocation
        // (a program's few dozen took some 90 µs of its exec under Bochs that way).
        let mut writable: [Option<Segment>; MAX_PROGRAM_HEADERS] =
            [const { None }; MAX_PROGRAM_HEADERS];
        for (slot, segment) in writable
            .iter_mut()
            .zip(self.segments().filter(|segment| segment.writable))
        {
            *slot = Some(segment);
        }
        for at in self.relocations.clone().step_by(RELA_SIZE as usize) {
            let info = u64_at(self.bytes, at + 8)?;
            let offset = u64_at(self.bytes, at)?;
            if info as u32 != R_X86_64_RELATIVE || info >> 32 != 0 {
                return Err(ElfError::UnsupportedRelocation { kind: info as u32 });
            }
            if !writable
                .iter()
                .flatten()
                .any(|segment| segment.contains(offset, 8))
            {
                return Err(ElfError::BadRelocation { offset });
            }
        }
        Ok(())
    }

    /// Where execution starts, relative to the load base.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// One past the highest byte any segment occupies, relative to the load base.
    pub fn span(&self) -> u64 {
        self.span
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The `PT_LOAD` segments, in file order.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        self.program_headers
            .clone()
            .step_by(PROGRAM_HEADER_SIZE)
            .filter_map(|at| program_header(self.bytes, at).ok())
            .filter(|header| header.kind == PT_LOAD)
            .map(|header| Segment {
                address: header.address,
                memory_size: header.memory_size,
                file: header.offset as usize..(header.offset + header.file_size) as usize,
                writable: header.flags & PF_W != 0,
                executable: header.flags & PF_X != 0,
            })
    }

    /// The relocations, each already checked to lie in a writable segment.
    pub fn relocations(&self) -> impl Iterator<Item = Relocation> + '_ {
        self.relocations
            .clone()
            .step_by(RELA_SIZE as usize)
            .filter_map(|at| {
                Some(Relocation {
                    offset: u64_at(self.bytes, at).ok()?,
                    addend: u64_at(self.bytes, at + 16).ok()?,
                })
            })
    }
}

impl Segment {
    /// Whether `address..address + length` lies inside the segment's memory.
    pub fn contains(&self, address: u64, length: u64) -> bool {
        address >= self.address
            && address
                .checked_add(length)
                .is_some_and(|end| end <= self.address + self.memory_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small but complete static PIE: a read-only + executable segment holding the code and
    /// the RELA table, a writable segment with one pointer to relocate and some .bss, and a
    /// dynamic section.
    fn sample() -> Vec<u8> {
        let mut file = vec![0u8; 0x3000];
        let put = |file: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            file[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut file, 0, b"\x7fELF\x02\x01\x01");
        put(&mut file, 16, &ET_DYN.to_le_bytes());
        put(&mut file, 18, &EM_X86_64.to_le_bytes());
        put(&mut file, 24, &0x1010u64.to_le_bytes()); // entry
        put(&mut file, 32, &64u64.to_le_bytes()); // program headers
        put(&mut file, 54, &(PROGRAM_HEADER_SIZE as u16).to_le_bytes());
        put(&mut file, 56, &3u16.to_le_bytes());
        let header = |file: &mut Vec<u8>, index: usize, h: [u64; 6], kind: u32, flags: u32| {
            let at = 64 + index * PROGRAM_HEADER_SIZE;
            put(file, at, &kind.to_le_bytes());
            put(file, at + 4, &flags.to_le_bytes());
            for (field, value) in h.iter().enumerate() {
                // offset, vaddr, paddr, filesz, memsz, align
                put(file, at + 8 + field * 8, &value.to_le_bytes());
            }
        };
        header(
            &mut file,
            0,
            [0x1000, 0x1000, 0x1000, 0x100, 0x100, 0x1000],
            PT_LOAD,
            5,
        );
        header(
            &mut file,
            1,
            [0x2000, 0x2000, 0x2000, 0x80, 0x4000, 0x1000],
            PT_LOAD,
            6,
        );
        header(
            &mut file,
            2,
            [0x2040, 0x2040, 0x2040, 0x40, 0x40, 8],
            PT_DYNAMIC,
            6,
        );
        // RELA table at 0x1080 (in the first segment): one relocation of 0x2000 to 0x1010.
        put(&mut file, 0x1080, &0x2000u64.to_le_bytes());
        put(
            &mut file,
            0x1088,
            &u64::from(R_X86_64_RELATIVE).to_le_bytes(),
        );
        put(&mut file, 0x1090, &0x1010u64.to_le_bytes());
        for (index, (tag, value)) in [(DT_RELA, 0x1080u64), (DT_RELASZ, 24), (DT_RELAENT, 24)]
            .into_iter()
            .enumerate()
        {
            put(&mut file, 0x2040 + index * 16, &tag.to_le_bytes());
            put(&mut file, 0x2048 + index * 16, &value.to_le_bytes());
        }
        file
    }

    #[test]
    fn a_valid_image() {
        let file = sample();
        let image = ElfImage::parse(&file).unwrap();
        assert_eq!(image.entry(), 0x1010);
        assert_eq!(image.span(), 0x6000);
        let segments: Vec<Segment> = image.segments().collect();
        assert_eq!(segments.len(), 2);
        assert_eq!(segments[0].file, 0x1000..0x1100);
        assert!(segments[0].executable && !segments[0].writable);
        assert!(segments[1].writable && !segments[1].executable);
        assert_eq!(segments[1].memory_size, 0x4000);
        let relocations: Vec<Relocation> = image.relocations().collect();
        assert_eq!(
            relocations,
            vec![Relocation {
                offset: 0x2000,
                addend: 0x1010
            }]
        );
    }

    #[test]
    fn bad_images_are_refused() {
        let patched = |at: usize, bytes: &[u8]| {
            let mut file = sample();
            file[at..at + bytes.len()].copy_from_slice(bytes);
            ElfImage::parse(&file).map(|_| ())
        };
        assert_eq!(patched(0, b"\x7fELG"), Err(ElfError::NotElf));
        assert_eq!(patched(4, &[1]), Err(ElfError::WrongKind));
        assert_eq!(
            patched(16, &2u16.to_le_bytes()),
            Err(ElfError::NotPositionIndependent)
        );
        assert_eq!(
            patched(24, &0x2000u64.to_le_bytes()),
            Err(ElfError::BadEntry)
        );
        assert_eq!(
            patched(56, &0u16.to_le_bytes()),
            Err(ElfError::BadProgramHeaders)
        );
        // First segment's file size past the end of the file.
        assert_eq!(
            patched(64 + 32, &0x10_0000u64.to_le_bytes()),
            Err(ElfError::BadSegment { index: 0 })
        );
        // Second segment's memory size beyond the allowed span.
        assert_eq!(
            patched(64 + 56 + 40, &MAX_IMAGE_SPAN.to_le_bytes()),
            Err(ElfError::TooLarge)
        );
        // A relocation of another type, or one aimed at the read-only segment.
        assert_eq!(
            patched(0x1088, &1u64.to_le_bytes()),
            Err(ElfError::UnsupportedRelocation { kind: 1 })
        );
        assert_eq!(
            patched(0x1080, &0x1000u64.to_le_bytes()),
            Err(ElfError::BadRelocation { offset: 0x1000 })
        );
        // Shared libraries.
        assert_eq!(
            patched(0x2070, &DT_NEEDED.to_le_bytes()),
            Err(ElfError::Dynamic)
        );
    }

    #[test]
    fn no_input_makes_it_panic() {
        let file = sample();
        for length in 0..file.len().min(0x2100) {
            let _ = ElfImage::parse(&file[..length]);
        }
        // Every byte of the headers and tables set to a few hostile values in turn.
        let interesting = (0..0x200).chain(0x1080..0x1098).chain(0x2040..0x2080);
        for at in interesting {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut mutated = file.clone();
                mutated[at] = value;
                if let Ok(image) = ElfImage::parse(&mutated) {
                    assert!(image.span() <= MAX_IMAGE_SPAN);
                    for segment in image.segments() {
                        assert!(segment.file.end <= mutated.len());
                    }
                    let _ = image.relocations().count();
                }
            }
        }
    }
}
