//! Loading the Lavender microkernel into its partition and preparing its first entry.
//!
//! The entry contract (also in `guest-lavender`'s docs): 64-bit mode at the ELF entry,
//! CPL 0, interrupts off, RDI = guest-physical address of the boot-info page, RSP = top
//! of a 64 KiB stack, CR3 = page tables that identity-map guest-physical 0..4 GiB with
//! 2 MiB pages, a flat GDT (0x08 code, 0x10 data), no IDT. Those boot structures live in
//! the *boot area* at the top of the guest's first memory range, reported as `Loaded`
//! in the boot info together with the kernel image; the rest is `Usable`.

use core::fmt;

use heapless::Vec;
use vmcall_proto::bootinfo::{
    BootInfo, BootInfoError, MemoryKind, MemoryRegion, SharedRegionInfo, BOOT_INFO_SIZE,
};
use xmas_elf::program::Type as SegmentType;
use xmas_elf::ElfFile;

use super::{EntryState, GuestPhysicalMemory, OutsideGuest};
use crate::partition::{GuestConfig, MemoryRange};

const PAGE: u64 = 4096;
const STACK_SIZE: u64 = 64 * 1024;
/// Page tables (PML4, PDPT, 4 PDs), GDT, boot info, then the stack.
pub const BOOT_AREA_SIZE: u64 = 8 * PAGE + STACK_SIZE;
const PML4_OFFSET: u64 = 0;
const PDPT_OFFSET: u64 = PAGE;
const PD_OFFSET: u64 = 2 * PAGE;
const GDT_OFFSET: u64 = 6 * PAGE;
const BOOT_INFO_OFFSET: u64 = 7 * PAGE;
/// Control registers at entry: PE|MP|ET|NE|WP|PG; PAE|PGE|OSFXSR|OSXMMEXCPT; LME|LMA|NXE.
const ENTRY_CR0: u64 = 0x8001_0033;
const ENTRY_CR4: u64 = (1 << 5) | (1 << 7) | (1 << 9) | (1 << 10);
const ENTRY_EFER: u64 = (1 << 8) | (1 << 10) | (1 << 11);
/// Flat GDT: null, 64-bit code (0x08), data (0x10) (Intel SDM Vol. 3A §3.4.5).
const GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// Page-table entry bits: present, writable, page size (SDM Vol. 3A §5.5).
const PTE_PRESENT_WRITABLE: u64 = 0b11;
const PTE_LARGE: u64 = 1 << 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    NotElf(&'static str),
    NotX86_64Executable,
    SegmentOutsideFile { index: usize },
    SegmentOutsideMemory { index: usize, at: OutsideGuest },
    NoMemory,
    ImageOverlapsBootArea,
    BootInfo(BootInfoError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotElf(why) => write!(f, "the lavender module is not an ELF file: {why}"),
            Self::NotX86_64Executable => f.write_str("the lavender ELF is not an x86-64 executable"),
            Self::SegmentOutsideFile { index } => write!(f, "ELF segment {index} points past the end of the file"),
            Self::SegmentOutsideMemory { index, at } => write!(
                f,
                "ELF segment {index} at guest-physical {:#x}+{:#x} is outside the partition's memory",
                at.guest_physical, at.len
            ),
            Self::NoMemory => f.write_str("the partition has no memory range"),
            Self::ImageOverlapsBootArea => {
                f.write_str("the kernel image overlaps the boot area at the top of the first memory range")
            }
            Self::BootInfo(e) => write!(f, "cannot build the boot-info page: {e}"),
        }
    }
}

/// Where things ended up, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub entry: EntryState,
    /// Guest-physical [start, end) of the loaded image (page-rounded).
    pub image: (u64, u64),
    pub boot_area: (u64, u64),
}

/// Loads `elf` into `memory` and writes the boot structures. `shared` lists the shared
/// regions as the guest sees them.
pub fn load(
    memory: &impl GuestPhysicalMemory,
    elf: &[u8],
    config: &GuestConfig,
    guest_id: u32,
    shared: &[SharedRegionInfo],
) -> Result<Loaded, LoadError> {
    let image = load_segments(memory, elf)?;
    let first = config.memory.first().ok_or(LoadError::NoMemory)?;
    let top = first.guest + first.size;
    let base = top
        .checked_sub(BOOT_AREA_SIZE)
        .filter(|b| *b >= first.guest)
        .ok_or(LoadError::NoMemory)?;
    if image.0 < top && base < image.1 {
        return Err(LoadError::ImageOverlapsBootArea);
    }
    let boot_area = (base, top);
    let outside = |at| LoadError::SegmentOutsideMemory {
        index: usize::MAX,
        at,
    };
    memory.zero(base, BOOT_AREA_SIZE).map_err(outside)?;
    write_page_tables(memory, base).map_err(outside)?;
    let gdt: Vec<u8, 24> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    memory.write(base + GDT_OFFSET, &gdt).map_err(outside)?;

    let mut info = BootInfo::new(
        guest_id,
        config.boot_core,
        config.initial_cores,
        config.allowed_cores,
    );
    for range in &config.memory {
        for region in carve(range, &[image, boot_area]) {
            info.add_memory_region(region)
                .map_err(LoadError::BootInfo)?;
        }
    }
    for region in shared {
        info.add_shared_region(*region)
            .map_err(LoadError::BootInfo)?;
    }
    info.set_cmdline(&config.cmdline)
        .map_err(LoadError::BootInfo)?;
    let mut page = [0u8; BOOT_INFO_SIZE];
    info.write(&mut page).map_err(LoadError::BootInfo)?;
    memory
        .write(base + BOOT_INFO_OFFSET, &page)
        .map_err(outside)?;

    let entry = EntryState {
        rip: ElfFile::new(elf)
            .map_err(LoadError::NotElf)?
            .header
            .pt2
            .entry_point(),
        rsp: top,
        rdi: base + BOOT_INFO_OFFSET,
        rsi: 0,
        cr0: ENTRY_CR0,
        cr3: base + PML4_OFFSET,
        cr4: ENTRY_CR4,
        efer: ENTRY_EFER,
        code_selector: 0x08,
        data_selector: 0x10,
        gdt_base: base + GDT_OFFSET,
        gdt_limit: (GDT.len() * 8 - 1) as u16,
    };
    Ok(Loaded {
        entry,
        image,
        boot_area,
    })
}

/// Copies the PT_LOAD segments to their physical addresses; returns the page-rounded
/// guest-physical range they cover.
fn load_segments(memory: &impl GuestPhysicalMemory, elf: &[u8]) -> Result<(u64, u64), LoadError> {
    let file = ElfFile::new(elf).map_err(LoadError::NotElf)?;
    let x86_64 = file.header.pt2.machine().as_machine() == xmas_elf::header::Machine::X86_64;
    let executable = file.header.pt2.type_().as_type() == xmas_elf::header::Type::Executable;
    if !x86_64 || !executable || file.header.pt1.class() != xmas_elf::header::Class::SixtyFour {
        return Err(LoadError::NotX86_64Executable);
    }
    let (mut start, mut end) = (u64::MAX, 0);
    for (index, segment) in file.program_iter().enumerate() {
        if segment.get_type() != Ok(SegmentType::Load) || segment.mem_size() == 0 {
            continue;
        }
        let (offset, file_size, mem_size) =
            (segment.offset(), segment.file_size(), segment.mem_size());
        let bytes = offset
            .checked_add(file_size)
            .filter(|e| file_size <= mem_size && *e <= elf.len() as u64)
            .map(|e| &elf[offset as usize..e as usize])
            .ok_or(LoadError::SegmentOutsideFile { index })?;
        let address = segment.physical_addr();
        let at = |len| LoadError::SegmentOutsideMemory {
            index,
            at: OutsideGuest {
                guest_physical: address,
                len,
            },
        };
        memory.write(address, bytes).map_err(|_| at(mem_size))?;
        memory
            .zero(address + file_size, mem_size - file_size)
            .map_err(|_| at(mem_size))?;
        start = start.min(address & !(PAGE - 1));
        end = end.max((address + mem_size).div_ceil(PAGE) * PAGE);
    }
    if start >= end {
        return Err(LoadError::NotElf("no loadable segment"));
    }
    Ok((start, end))
}

/// Identity map of guest-physical 0..4 GiB with 2 MiB pages.
fn write_page_tables(memory: &impl GuestPhysicalMemory, base: u64) -> Result<(), OutsideGuest> {
    memory.write(
        base + PML4_OFFSET,
        &((base + PDPT_OFFSET) | PTE_PRESENT_WRITABLE).to_le_bytes(),
    )?;
    for gib in 0..4u64 {
        let pd = base + PD_OFFSET + gib * PAGE;
        memory.write(
            base + PDPT_OFFSET + gib * 8,
            &(pd | PTE_PRESENT_WRITABLE).to_le_bytes(),
        )?;
        let mut table = [0u8; PAGE as usize];
        for (i, entry) in table.chunks_exact_mut(8).enumerate() {
            let address = (gib << 30) + ((i as u64) << 21);
            entry.copy_from_slice(&(address | PTE_PRESENT_WRITABLE | PTE_LARGE).to_le_bytes());
        }
        memory.write(pd, &table)?;
    }
    Ok(())
}

/// Splits `range` (guest-physical) into Usable parts and the Loaded parts that
/// intersect `loaded`, in address order.
fn carve(range: &MemoryRange, loaded: &[(u64, u64)]) -> Vec<MemoryRegion, 8> {
    let (start, end) = (range.guest, range.guest + range.size);
    let mut cuts: Vec<(u64, u64), 4> = loaded
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    cuts.sort_unstable();
    let mut regions = Vec::new();
    let mut cursor = start;
    let mut push = |base: u64, end: u64, kind| {
        if base < end {
            // At most 2 cuts: 5 regions fit.
            let _ = regions.push(MemoryRegion {
                base,
                size: end - base,
                kind,
                reserved: 0,
            });
        }
    };
    for (s, e) in cuts {
        push(cursor, s.max(cursor), MemoryKind::Usable);
        push(s.max(cursor), e, MemoryKind::Loaded);
        cursor = cursor.max(e);
    }
    push(cursor, end, MemoryKind::Usable);
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::{GuestKind, Name, ViolationPolicy};
    use std::vec::Vec as StdVec;
    use vmcall_proto::cores::{CoreId, CoreSet};

    use crate::guest::fake_memory::FakeRam;

    fn config(size: u64) -> GuestConfig {
        let mut memory = heapless::Vec::new();
        memory
            .push(MemoryRange {
                guest: 0,
                host: 0x800_0000,
                size,
            })
            .unwrap();
        GuestConfig {
            name: Name::try_from("lavender").unwrap(),
            kind: GuestKind::Lavender,
            boot_core: CoreId::new(1).unwrap(),
            initial_cores: CoreSet(0b10),
            allowed_cores: CoreSet(0b1110),
            memory,
            cmdline: heapless::String::try_from("hello").unwrap(),
            on_violation: ViolationPolicy::Stop,
            devices: heapless::Vec::new(),
            watchdog_ms: None,
            min_cores: 1,
            max_cores: 3,
        }
    }

    /// A minimal ELF64 executable with one PT_LOAD of `code` at `address` (+ `bss` zeros).
    fn elf(address: u64, code: &[u8], bss: u64) -> StdVec<u8> {
        let mut f = StdVec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&(address + 4).to_le_bytes()); // entry
        f.extend_from_slice(&64u64.to_le_bytes()); // phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&7u32.to_le_bytes());
        f.extend_from_slice(&120u64.to_le_bytes()); // offset
        f.extend_from_slice(&address.to_le_bytes());
        f.extend_from_slice(&address.to_le_bytes());
        f.extend_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        f.extend_from_slice(&4096u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    const SIZE: u64 = 16 << 20;

    #[test]
    fn loads_segments_and_writes_boot_structures() {
        let ram = FakeRam::new(SIZE as usize, 0xaa);
        let loaded = load(
            &ram,
            &elf(0x20_0000, b"\x90\x90\x90\x90\xf4", 0x100),
            &config(SIZE),
            3,
            &[],
        )
        .unwrap();
        let mem = ram.bytes();
        assert_eq!(&mem[0x20_0000..0x20_0005], b"\x90\x90\x90\x90\xf4");
        assert!(
            mem[0x20_0005..0x20_0105].iter().all(|b| *b == 0),
            "bss zeroed"
        );
        assert_eq!(loaded.image, (0x20_0000, 0x20_1000));
        assert_eq!(loaded.entry.rip, 0x20_0004);
        assert_eq!(loaded.entry.rsp, SIZE);
        assert_eq!(loaded.boot_area, (SIZE - BOOT_AREA_SIZE, SIZE));
        // CR3 -> PML4[0] -> PDPT[0] -> PD[1] maps 2 MiB at 2 MiB.
        let read =
            |at: u64| u64::from_le_bytes(mem[at as usize..at as usize + 8].try_into().unwrap());
        let pdpt = read(loaded.entry.cr3) & !0xfff;
        let pd = read(pdpt) & !0xfff;
        assert_eq!(read(pd + 8), 0x20_0000 | 0x83);
        let info = BootInfo::read(&mem[loaded.entry.rdi as usize..][..BOOT_INFO_SIZE]).unwrap();
        assert_eq!(info.guest_id(), 3);
        assert_eq!(info.cmdline(), "hello");
        assert_eq!(info.boot_core(), CoreId::new(1).unwrap());
        let kinds: StdVec<_> = info
            .memory_regions()
            .iter()
            .map(|r| (r.base, r.size, r.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                (0, 0x20_0000, MemoryKind::Usable),
                (0x20_0000, 0x1000, MemoryKind::Loaded),
                (
                    0x20_1000,
                    SIZE - BOOT_AREA_SIZE - 0x20_1000,
                    MemoryKind::Usable
                ),
                (SIZE - BOOT_AREA_SIZE, BOOT_AREA_SIZE, MemoryKind::Loaded),
            ]
        );
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        let ram = FakeRam::new(SIZE as usize, 0);
        assert!(matches!(
            load(&ram, b"not an elf at all, clearly", &config(SIZE), 0, &[]),
            Err(LoadError::NotElf(_))
        ));
        assert!(matches!(
            load(&ram, &elf(SIZE + 0x1000, b"\x90", 0), &config(SIZE), 0, &[]),
            Err(LoadError::SegmentOutsideMemory { index: 0, .. })
        ));
        assert_eq!(
            load(&ram, &elf(SIZE - 0x1000, b"\x90", 0), &config(SIZE), 0, &[]),
            Err(LoadError::ImageOverlapsBootArea)
        );
        let mut truncated = elf(0x20_0000, b"\x90\x90", 0);
        truncated.truncate(truncated.len() - 1);
        assert_eq!(
            load(&ram, &truncated, &config(SIZE), 0, &[]),
            Err(LoadError::SegmentOutsideFile { index: 0 })
        );
    }
}
