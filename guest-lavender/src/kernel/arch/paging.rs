//! Lavender's own 4-level page tables (Intel SDM Vol. 3A §4.5): an identity map of the ranges
//! an [`IdentityMapPlan`] lists, built from frames of the frame allocator, then made current.
//!
//! Identity mapping means a table's physical address is also its virtual address, both under the
//! hypervisor's entry tables and under Lavender's own, so `x86_64`'s `OffsetPageTable` with
//! offset 0 can edit the tables at any time. Frame 0 is never a table: the frame allocator never
//! hands it out, so no table reference is ever null.

use core::sync::atomic::{AtomicU64, Ordering};
use guest_lavender::identity_map::{
    small_pages_covering, Access, IdentityMapPlan, PageMapping, PageSize,
};

use spin::Mutex;
use x86_64::instructions::tlb;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::{MapToError, MapperFlush};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size2MiB,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use crate::kernel::memory::KernelFrames;

/// The tables in CR3, once Lavender's own are active.
static ACTIVE: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);
/// Their root: the kernel's address space, which every process's tables share (see
/// `address_space`) and which kernel threads and idle loops run in.
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    OutOfFrames,
    /// The address is not a canonical lower-half address, so it cannot be identity-mapped.
    NotMappable(u64),
    /// A mapping that should be new overlaps an existing one.
    Conflict(u64),
    /// The new tables would not map this address the kernel is running from; CR3 was not switched.
    WouldUnmap(u64),
    /// `map_probe_target` was called before `activate`.
    NotActive,
}

/// Page-table frames come from the kernel's frame allocator.
struct TableFrames<'a>(&'a mut KernelFrames);

// SAFETY: `FrameBitmap::allocate` hands out each frame at most once until it is freed, only
// frames of `Usable` memory that nothing else uses, and never frame 0.
unsafe impl FrameAllocator<Size4KiB> for TableFrames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        self.0
            .allocate()
            .map(|address| PhysFrame::containing_address(PhysAddr::new(address)))
    }
}

fn leaf_flags(access: Access) -> PageTableFlags {
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    match access {
        Access::Code => flags,
        // NX is honoured because the hypervisor enters Lavender with EFER.NXE set.
        Access::Data => flags | PageTableFlags::NO_EXECUTE,
    }
}

/// Intermediate tables allow everything; the leaf entries decide (SDM Vol. 3A §4.6: rights
/// combine across levels, so a restrictive parent would restrict every leaf below it).
const PARENT_FLAGS: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

fn map_error<S: x86_64::structures::paging::PageSize>(
    address: u64,
    error: MapToError<S>,
) -> MapError {
    match error {
        MapToError::FrameAllocationFailed => MapError::OutOfFrames,
        MapToError::ParentEntryHugePage | MapToError::PageAlreadyMapped(_) => {
            MapError::Conflict(address)
        }
    }
}

/// Maps one page, virtual = physical. Does not flush the TLB: before activation there is
/// nothing to flush, and afterwards the caller does.
fn map_page(
    tables: &mut OffsetPageTable<'static>,
    page: PageMapping,
    frames: &mut TableFrames<'_>,
) -> Result<(), MapError> {
    let address = VirtAddr::try_new(page.start).map_err(|_| MapError::NotMappable(page.start))?;
    let flags = leaf_flags(page.access);
    match page.size {
        PageSize::Large => {
            let virt = Page::<Size2MiB>::containing_address(address);
            let phys = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(page.start));
            // SAFETY: an identity mapping creates no new alias: the same bytes are reached at the
            // same address as under the entry tables, which map all of guest-physical memory.
            unsafe { tables.map_to_with_table_flags(virt, phys, flags, PARENT_FLAGS, frames) }
                .map(MapperFlush::ignore)
                .map_err(|error| map_error(page.start, error))
        }
        PageSize::Small => {
            let virt = Page::<Size4KiB>::containing_address(address);
            let phys = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(page.start));
            // SAFETY: as above.
            unsafe { tables.map_to_with_table_flags(virt, phys, flags, PARENT_FLAGS, frames) }
                .map(MapperFlush::ignore)
                .map_err(|error| map_error(page.start, error))
        }
    }
}

/// Builds tables for `plan` and switches CR3 to them, unless they would leave any of
/// `must_stay_mapped` (the running image, the stack) unmapped. Returns the root's address.
pub fn activate(
    plan: &IdentityMapPlan,
    frames: &mut KernelFrames,
    must_stay_mapped: &[u64],
) -> Result<u64, MapError> {
    let mut frames = TableFrames(frames);
    let root = frames.allocate_frame().ok_or(MapError::OutOfFrames)?;
    let root_address = root.start_address().as_u64();
    // SAFETY: the frame is fresh (handed out once, from `Usable` memory nothing else uses),
    // non-null, 4 KiB aligned as a `PageTable` requires, and identity-mapped by the entry
    // tables; this is the only reference to it.
    let pml4 = unsafe { &mut *(root_address as usize as *mut PageTable) };
    pml4.zero();
    // SAFETY: every frame a table can live in is identity-mapped (offset 0), under the entry
    // tables and under these tables once active (they map all `Usable` memory).
    let mut tables = unsafe { OffsetPageTable::new(pml4, VirtAddr::zero()) };
    for page in plan.pages() {
        map_page(&mut tables, page, &mut frames)?;
    }
    if let Some(missing) = must_stay_mapped.iter().find(|address| {
        tables.translate_addr(VirtAddr::new_truncate(**address))
            != Some(PhysAddr::new_truncate(**address))
    }) {
        return Err(MapError::WouldUnmap(*missing));
    }
    // SAFETY: the new tables identity-map the image, the stack (checked just above) and all of
    // Lavender's memory, exactly as the entry tables did, so every address the kernel uses
    // keeps its meaning across the switch. Writing CR3 flushes the non-global TLB entries
    // (SDM Vol. 3A §4.10.4.1); global ones from the entry tables translate identically.
    unsafe { Cr3::write(root, Cr3Flags::empty()) };
    KERNEL_ROOT.store(root_address, Ordering::Release);
    *ACTIVE.lock() = Some(tables);
    Ok(root_address)
}

/// Maps the 4 KiB pages under `address..address + len` that are not mapped yet (data access),
/// so a probe of memory outside Lavender's reaches the hypervisor's EPT instead of raising a
/// page fault in Lavender. Returns how many pages it added.
pub fn map_probe_target(
    address: u64,
    len: u64,
    frames: &mut KernelFrames,
) -> Result<usize, MapError> {
    let mut active = ACTIVE.lock();
    let tables = active.as_mut().ok_or(MapError::NotActive)?;
    let mut frames = TableFrames(frames);
    let mut added = 0;
    for start in small_pages_covering(address, len) {
        let virt = VirtAddr::try_new(start).map_err(|_| MapError::NotMappable(start))?;
        if tables.translate_addr(virt).is_none() {
            let page = PageMapping {
                start,
                size: PageSize::Small,
                access: Access::Data,
            };
            map_page(tables, page, &mut frames)?;
            // The entry was not present, and processors do not cache not-present translations
            // (SDM Vol. 3A §4.10.2.3); invalidating anyway costs one instruction and keeps this
            // correct if a mapping is ever replaced here.
            tlb::flush(virt);
            added += 1;
        }
    }
    Ok(added)
}

/// The root (PML4) of Lavender's kernel page tables (not necessarily what is in CR3 now: a
/// user thread's process has its own root).
pub fn root() -> u64 {
    KERNEL_ROOT.load(Ordering::Acquire)
}

/// Clears NX on the 4 KiB page at `address` (the AP trampoline, which runs while paging is
/// turned on). The page must be mapped with a 4 KiB entry.
pub fn make_executable(address: u64) -> Result<(), MapError> {
    let mut active = ACTIVE.lock();
    let tables = active.as_mut().ok_or(MapError::NotActive)?;
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new_truncate(address));
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    // SAFETY: only the execute permission of an identity-mapped page of Lavender's own memory
    // changes; every address keeps its translation, so no reference is invalidated.
    unsafe { tables.update_flags(page, flags) }
        .map(MapperFlush::flush)
        .map_err(|_| MapError::Conflict(address))
}

/// Calls `visit` with the guest-physical range of every page table the hypervisor built for
/// Lavender's entry (walked from CR3). They stay live until `activate` switches CR3, so the
/// frame allocator must not hand them out before, whichever region the hypervisor put them in.
/// (The entry GDT needs no such care: `gdt::load` has replaced it before memory is set up.)
pub fn entry_page_tables(mut visit: impl FnMut(u64, u64)) {
    let (root, _) = Cr3::read();
    visit_tables(root.start_address().as_u64(), 4, &mut visit);
}

/// Visits the table at `address` (a level-`level` table: 4 = PML4 ... 1 = PT) and every table
/// below it. Leaves (large pages and level-1 entries) are not tables and are skipped.
fn visit_tables(address: u64, level: u8, visit: &mut impl FnMut(u64, u64)) {
    visit(address, address + 4096);
    if level == 1 {
        return;
    }
    // SAFETY: `address` comes from CR3 or from a present non-leaf entry of the tables the
    // processor is using right now, so it is a live, 4 KiB aligned page table in identity-mapped
    // guest memory; it is only read, and nothing writes the entry tables while Lavender boots.
    let table = unsafe { &*(address as usize as *const PageTable) };
    for entry in table.iter() {
        let flags = entry.flags();
        let leaf = flags.contains(PageTableFlags::HUGE_PAGE);
        if flags.contains(PageTableFlags::PRESENT) && !leaf {
            visit_tables(entry.addr().as_u64(), level - 1, visit);
        }
    }
}
