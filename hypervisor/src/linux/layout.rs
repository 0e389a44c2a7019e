//! Where the Linux guest's boot pieces go in its guest-physical memory, and the boot
//! page tables and GDT the 64-bit boot protocol needs (boot.rst, "64-bit Boot
//! Protocol": paging on with an identity map of the kernel's `init_size` from its load
//! address, the zero page and the command line; a GDT with flat `__BOOT_CS` (0x10,
//! execute/read) and `__BOOT_DS` (0x18, read/write); interrupts off; RSI = zero page).
//!
//! ```text
//! guest-physical
//! 0x0000_0000  page 0 (real-mode IVT / BIOS data area, zeroed; Linux reserves it)
//! 0x0000_1000  GDT                                      \
//! 0x0000_2000  PML4, PDPT, 4 PDs: identity 0..4 GiB     |  boot area (low memory,
//! 0x0000_8000  zero page (struct boot_params)           |  dead once Linux runs on
//! 0x0000_9000  stack (16 KiB, top at 0xd000)            |  its own tables; e820
//! 0x0000_d000  command line (NUL-terminated)            /  usable)
//!   ...        free low memory: the decompressor puts its 5-level-paging trampoline
//!              just below 640 KiB, Linux its real-mode AP trampoline below 1 MiB
//! 0x000a_0000  legacy hole (e820 reserved) up to 1 MiB
//! pref_address (16 MiB)  kernel: the lowest kernel_alignment-aligned address >= its
//!              pref_address with init_size bytes of free RAM
//!   ...
//! top of RAM below 4 GiB: ACPI tables (e820 ACPI), then the initrd just below them
//!              (and below initrd_addr_max)
//! ```
//!
//! The kernel goes at or above `pref_address` even when relocatable: a relocatable
//! kernel loaded lower still decompresses at `LOAD_PHYSICAL_ADDR` (=`pref_address`)
//! (arch/x86/boot/compressed/head_64.S: `cmpq $LOAD_PHYSICAL_ADDR, %rbx; jae 1f`),
//! so that memory must be free anyway.

use core::fmt;

use heapless::Vec;

use crate::guest::{GuestPhysicalMemory, OutsideGuest};
use crate::partition::MemoryRange;

pub const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Everything the hypervisor builds lives below 4 GiB, which the boot page tables map.
pub const IDENTITY_MAPPED: u64 = 4 * GIB;

pub const BOOT_AREA_BASE: u64 = 0x1000;
pub const GDT_ADDRESS: u64 = 0x1000;
pub const PML4_ADDRESS: u64 = 0x2000;
const PDPT_ADDRESS: u64 = 0x3000;
const PD_ADDRESS: u64 = 0x4000;
pub const ZERO_PAGE_ADDRESS: u64 = 0x8000;
pub const STACK_BOTTOM: u64 = 0x9000;
pub const STACK_TOP: u64 = 0xd000;
pub const CMDLINE_ADDRESS: u64 = 0xd000;
/// The boot area must end here: the decompressor's trampoline goes in the top pages
/// below 640 KiB (`find_trampoline_placement()`), and Linux wants low memory for its
/// real-mode trampoline; 0x80000 leaves both plenty.
pub const BOOT_AREA_LIMIT: u64 = 0x8_0000;
/// Conventional memory every PC has and Linux relies on (BIOS data area, trampolines).
pub const CONVENTIONAL_MEMORY: (u64, u64) = (0, 0xa_0000);

/// GDT for the 64-bit entry (Intel SDM Vol. 3A §3.4.5; boot.rst "64-bit Boot
/// Protocol"): null, unused, `__BOOT_CS` = 0x10 64-bit code (L=1, execute/read),
/// `__BOOT_DS` = 0x18 flat 4 GiB data (read/write).
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;
/// Page-table entry bits: present, writable; page size (SDM Vol. 3A §5.5).
const PTE_PRESENT_WRITABLE: u64 = 0b11;
const PTE_LARGE: u64 = 1 << 7;

/// What the layout has to place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutInput<'a> {
    /// The guest's RAM (guest-physical).
    pub ram: &'a [MemoryRange],
    /// Guest-physical [start, end) ranges that are not RAM for boot purposes (shared
    /// regions) and must be avoided.
    pub avoid: &'a [(u64, u64)],
    pub pref_address: u64,
    pub kernel_alignment: u64,
    pub relocatable: bool,
    pub init_size: u64,
    /// Bytes of the protected-mode kernel copied to the load address.
    pub kernel_len: u64,
    pub initrd_size: u64,
    /// Highest address the initrd may occupy (inclusive), from the header.
    pub initrd_addr_max: u64,
    /// Command-line bytes including the terminating NUL.
    pub cmdline_len: u64,
    pub acpi_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// [start, end) of the low boot area (GDT, page tables, zero page, stack, cmdline).
    pub boot_area: (u64, u64),
    pub gdt: u64,
    pub pml4: u64,
    pub zero_page: u64,
    pub stack_top: u64,
    pub cmdline: u64,
    /// Load address of the protected-mode kernel.
    pub kernel: u64,
    /// [load, load + init_size): the kernel's whole working buffer.
    pub kernel_buffer: (u64, u64),
    /// [start, end) of the initrd (empty when there is none).
    pub initrd: (u64, u64),
    /// [start, end) of the ACPI tables area (page-rounded).
    pub acpi: (u64, u64),
}

impl Layout {
    /// The 64-bit entry point: load address + 0x200.
    pub fn entry(&self) -> u64 {
        self.kernel + super::bzimage::ENTRY_64_OFFSET
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Guest RAM does not cover 0..640 KiB.
    NoConventionalMemory,
    CmdlineTooLong {
        len: u64,
    },
    /// No init_size bytes of free RAM at an aligned address >= pref_address below
    /// 4 GiB (or exactly at pref_address for a non-relocatable kernel).
    KernelDoesNotFit {
        init_size: u64,
        pref_address: u64,
    },
    AcpiDoesNotFit {
        size: u64,
    },
    InitrdDoesNotFit {
        size: u64,
        max_end: u64,
    },
    TooFragmented,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoConventionalMemory => f.write_str(
                "the Linux guest's RAM must cover guest-physical 0..0xa0000 (conventional memory for the boot structures and Linux's trampolines)",
            ),
            Self::CmdlineTooLong { len } => write!(f, "the command line ({len} bytes) does not fit in the boot area"),
            Self::KernelDoesNotFit { init_size, pref_address } => write!(
                f,
                "no {init_size:#x} bytes of free RAM below 4 GiB at or above the kernel's preferred address {pref_address:#x}"
            ),
            Self::AcpiDoesNotFit { size } => write!(f, "no {size:#x} bytes of free RAM below 4 GiB for the ACPI tables"),
            Self::InitrdDoesNotFit { size, max_end } => write!(
                f,
                "no {size:#x} bytes of free RAM below {max_end:#x} for the initrd"
            ),
            Self::TooFragmented => f.write_str("guest memory is too fragmented to plan the boot layout"),
        }
    }
}

type Segments = Vec<(u64, u64), 32>;

/// `segments` minus [start, end).
fn subtract(segments: &Segments, (start, end): (u64, u64)) -> Result<Segments, LayoutError> {
    let mut out = Segments::new();
    for &(s, e) in segments {
        for piece in [(s, e.min(start)), (s.max(end), e)] {
            if piece.0 < piece.1 {
                out.push(piece).map_err(|_| LayoutError::TooFragmented)?;
            }
        }
    }
    Ok(out)
}

const fn align_up(x: u64, align: u64) -> Option<u64> {
    match x.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// Lowest `align`-aligned start >= `min` with `size` bytes inside one segment, ending
/// at or below `max_end`.
fn lowest_fit(free: &Segments, size: u64, align: u64, min: u64, max_end: u64) -> Option<u64> {
    free.iter()
        .filter_map(|&(s, e)| {
            let start = align_up(s.max(min), align)?;
            let end = start.checked_add(size)?;
            (end <= e && end <= max_end).then_some(start)
        })
        .min()
}

/// Highest `align`-aligned start with `size` bytes inside one segment, ending at or
/// below `max_end`.
fn highest_fit(free: &Segments, size: u64, align: u64, max_end: u64) -> Option<u64> {
    free.iter()
        .filter_map(|&(s, e)| {
            let start = (e.min(max_end).checked_sub(size)?) & !(align - 1);
            (start >= s).then_some(start)
        })
        .max()
}

/// Plans the layout; see the module documentation.
pub fn plan(input: &LayoutInput) -> Result<Layout, LayoutError> {
    let covers = |(s, e): (u64, u64)| {
        input
            .ram
            .iter()
            .any(|r| r.guest <= s && r.guest.saturating_add(r.size) >= e)
    };
    if !covers(CONVENTIONAL_MEMORY) {
        return Err(LayoutError::NoConventionalMemory);
    }
    let cmdline_end = align_up(CMDLINE_ADDRESS.saturating_add(input.cmdline_len), PAGE)
        .filter(|end| *end <= BOOT_AREA_LIMIT)
        .ok_or(LayoutError::CmdlineTooLong {
            len: input.cmdline_len,
        })?;

    let mut free = Segments::new();
    for r in input.ram {
        free.push((r.guest, r.guest.saturating_add(r.size)))
            .map_err(|_| LayoutError::TooFragmented)?;
    }
    // Nothing else goes below 1 MiB: the boot area, the legacy hole, the trampolines.
    free = subtract(&free, (0, MIB))?;
    for &range in input.avoid {
        free = subtract(&free, range)?;
    }

    let align = input.kernel_alignment.max(PAGE);
    let kernel_does_not_fit = LayoutError::KernelDoesNotFit {
        init_size: input.init_size,
        pref_address: input.pref_address,
    };
    if !align.is_power_of_two() {
        return Err(kernel_does_not_fit);
    }
    let size = input.init_size.max(input.kernel_len);
    let kernel = if input.relocatable {
        lowest_fit(&free, size, align, input.pref_address, IDENTITY_MAPPED)
    } else {
        lowest_fit(&free, size, PAGE, input.pref_address, IDENTITY_MAPPED)
            .filter(|a| *a == input.pref_address)
    }
    .ok_or(kernel_does_not_fit)?;
    let kernel_buffer = (kernel, kernel + size);
    free = subtract(&free, kernel_buffer)?;

    let acpi_size = align_up(input.acpi_size, PAGE).unwrap_or(u64::MAX);
    let acpi = if acpi_size == 0 {
        (0, 0)
    } else {
        let at = highest_fit(&free, acpi_size, PAGE, IDENTITY_MAPPED)
            .ok_or(LayoutError::AcpiDoesNotFit { size: acpi_size })?;
        free = subtract(&free, (at, at + acpi_size))?;
        (at, at + acpi_size)
    };

    let initrd = if input.initrd_size == 0 {
        (0, 0)
    } else {
        let max_end = input.initrd_addr_max.saturating_add(1).min(IDENTITY_MAPPED);
        let size = align_up(input.initrd_size, PAGE).unwrap_or(u64::MAX);
        let at = highest_fit(&free, size, PAGE, max_end).ok_or(LayoutError::InitrdDoesNotFit {
            size: input.initrd_size,
            max_end,
        })?;
        (at, at + input.initrd_size)
    };

    Ok(Layout {
        boot_area: (BOOT_AREA_BASE, cmdline_end),
        gdt: GDT_ADDRESS,
        pml4: PML4_ADDRESS,
        zero_page: ZERO_PAGE_ADDRESS,
        stack_top: STACK_TOP,
        cmdline: CMDLINE_ADDRESS,
        kernel,
        kernel_buffer,
        initrd,
        acpi,
    })
}

/// The GDT's bytes.
pub fn gdt_bytes() -> [u8; GDT.len() * 8] {
    let mut bytes = [0u8; GDT.len() * 8];
    for (chunk, d) in bytes.chunks_exact_mut(8).zip(GDT) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    bytes
}

/// Number of page-table pages: PML4, PDPT, one PD per GiB of the identity map.
pub const PAGE_TABLE_PAGES: usize = 2 + (IDENTITY_MAPPED / GIB) as usize;

/// Page `index` (0 = PML4, 1 = PDPT, 2.. = PDs) of the boot page tables placed at
/// `base`: an identity map of 0..4 GiB with 2 MiB pages, writable, executable.
pub fn page_table_page(base: u64, index: usize) -> [u8; PAGE as usize] {
    let mut page = [0u8; PAGE as usize];
    let mut set = |i: usize, value: u64| {
        page[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    };
    match index {
        0 => set(0, (base + PAGE) | PTE_PRESENT_WRITABLE),
        1 => {
            for gib in 0..(IDENTITY_MAPPED / GIB) {
                set(
                    gib as usize,
                    (base + (2 + gib) * PAGE) | PTE_PRESENT_WRITABLE,
                );
            }
        }
        n if n < PAGE_TABLE_PAGES => {
            let gib = (n - 2) as u64;
            for i in 0..512u64 {
                set(
                    i as usize,
                    ((gib << 30) + (i << 21)) | PTE_PRESENT_WRITABLE | PTE_LARGE,
                );
            }
        }
        _ => {}
    }
    page
}

/// Writes the GDT and the page tables of `layout` into guest memory.
pub fn write_boot_structures(
    memory: &impl GuestPhysicalMemory,
    layout: &Layout,
) -> Result<(), OutsideGuest> {
    memory.write(layout.gdt, &gdt_bytes())?;
    for index in 0..PAGE_TABLE_PAGES {
        memory.write(
            layout.pml4 + index as u64 * PAGE,
            &page_table_page(layout.pml4, index),
        )?;
    }
    Ok(())
}

const _: () = assert!(PML4_ADDRESS + PAGE_TABLE_PAGES as u64 * PAGE == ZERO_PAGE_ADDRESS);
const _: () = assert!(PDPT_ADDRESS == PML4_ADDRESS + PAGE && PD_ADDRESS == PDPT_ADDRESS + PAGE);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec::Vec as StdVec;

    pub(crate) fn ram(list: &[(u64, u64)]) -> StdVec<MemoryRange> {
        list.iter()
            .map(|&(guest, size)| MemoryRange {
                guest,
                host: guest + 0x4000_0000,
                size,
            })
            .collect()
    }

    fn input(ram: &[MemoryRange]) -> LayoutInput<'_> {
        LayoutInput {
            ram,
            avoid: &[],
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            relocatable: true,
            init_size: 0x337_8000,
            kernel_len: 0xd7_0000,
            initrd_size: 0x80_1234,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_len: 100,
            acpi_size: 0x700,
        }
    }

    #[test]
    fn typical_partition() {
        let ram = ram(&[(0, 0x1000_0000)]);
        let l = plan(&input(&ram)).unwrap();
        assert_eq!(l.kernel, 0x100_0000);
        assert_eq!(l.entry(), 0x100_0200);
        assert_eq!(l.kernel_buffer, (0x100_0000, 0x437_8000));
        assert_eq!(l.acpi, (0xfff_f000, 0x1000_0000));
        assert_eq!(l.initrd, (0xf7f_d000, 0xf7f_d000 + 0x80_1234));
        assert_eq!(l.boot_area, (0x1000, 0xe000));
        assert_eq!(
            (l.zero_page, l.cmdline, l.stack_top),
            (0x8000, 0xd000, 0xd000)
        );
    }

    #[test]
    fn kernel_moves_up_past_a_shared_region_and_initrd_respects_its_max() {
        let ram = ram(&[(0, 0xa_0000), (0x10_0000, 0x1_4000_0000 - 0x10_0000)]);
        let mut i = input(&ram);
        let avoid = [(0x200_0000, 0x220_0000)];
        i.avoid = &avoid;
        i.initrd_addr_max = 0x3fff_ffff;
        let l = plan(&i).unwrap();
        assert_eq!(
            l.kernel, 0x220_0000,
            "first 2 MiB-aligned fit above the region"
        );
        // RAM goes past 4 GiB; the tables stay below it.
        assert_eq!(l.acpi, (0xffff_f000, 0x1_0000_0000));
        assert_eq!(l.initrd, (0x3f7f_e000, 0x3f7f_e000 + 0x80_1234));
    }

    #[test]
    fn errors() {
        let small = ram(&[(0x10_0000, 0x1000_0000)]);
        assert_eq!(plan(&input(&small)), Err(LayoutError::NoConventionalMemory));
        let tiny = ram(&[(0, 0x200_0000)]);
        assert!(matches!(
            plan(&input(&tiny)),
            Err(LayoutError::KernelDoesNotFit { .. })
        ));
        let just_kernel = ram(&[(0, 0xa_0000), (0x100_0000, 0x337_8000)]);
        assert!(matches!(
            plan(&input(&just_kernel)),
            Err(LayoutError::AcpiDoesNotFit { .. })
        ));
        let no_initrd_room = ram(&[(0, 0xa_0000), (0x100_0000, 0x337_9000)]);
        assert!(matches!(
            plan(&input(&no_initrd_room)),
            Err(LayoutError::InitrdDoesNotFit { .. })
        ));
        let ok = ram(&[(0, 0x1000_0000)]);
        let mut i = input(&ok);
        i.cmdline_len = 0x10_0000;
        assert_eq!(
            plan(&i),
            Err(LayoutError::CmdlineTooLong { len: 0x10_0000 })
        );
        let mut i = input(&ok);
        i.relocatable = false;
        let avoid = [(0x100_0000, 0x110_0000)];
        i.avoid = &avoid;
        assert!(matches!(
            plan(&i),
            Err(LayoutError::KernelDoesNotFit { .. })
        ));
    }

    #[test]
    fn page_tables_identity_map_4_gib_and_gdt_has_boot_selectors() {
        let read =
            |p: &[u8; 4096], i: usize| u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().unwrap());
        let pml4 = page_table_page(PML4_ADDRESS, 0);
        assert_eq!(read(&pml4, 0), PDPT_ADDRESS | 3);
        assert_eq!(read(&pml4, 1), 0);
        let pdpt = page_table_page(PML4_ADDRESS, 1);
        for g in 0..4 {
            assert_eq!(read(&pdpt, g), (PD_ADDRESS + g as u64 * PAGE) | 3);
        }
        assert_eq!(read(&pdpt, 4), 0);
        let last = page_table_page(PML4_ADDRESS, 5);
        assert_eq!(read(&last, 511), (0xffe0_0000) | 0x83);
        assert_eq!(page_table_page(PML4_ADDRESS, 6), [0; 4096]);
        let gdt = gdt_bytes();
        // 0x10: present, DPL 0, code, execute/read, L=1, D=0.
        let cs = u64::from_le_bytes(gdt[0x10..0x18].try_into().unwrap());
        assert_eq!((cs >> 40) & 0xff, 0x9b);
        assert_eq!((cs >> 53) & 1, 1, "L");
        assert_eq!((cs >> 54) & 1, 0, "D must be 0 with L");
        let ds = u64::from_le_bytes(gdt[0x18..0x20].try_into().unwrap());
        assert_eq!((ds >> 40) & 0xff, 0x93);
        assert_eq!(GDT_LIMIT, 31);
    }
}
