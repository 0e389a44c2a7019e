//! Lavender's memory at boot: the frame allocator over its `Usable` regions, its own page
//! tables over everything the boot-info page says it has, the AP trampoline page and the
//! kernel heap.

use core::fmt;

use guest_lavender::frames::{FrameBitmap, FRAME_SIZE};
use guest_lavender::identity_map::{Access, IdentityMapPlan, PageSize, PlanError, Range};
use vmcall_proto::bootinfo::{BootInfo, MemoryKind};

use crate::kernel::arch::paging::MapError;
use crate::kernel::sync::IrqMutex;
use crate::kernel::{arch, smp};

/// Bitmap words for 4 GiB of guest-physical memory (2^20 frames, 128 KiB of bitmap): the
/// hypervisor identity-maps Lavender's space up to 4 GiB at entry, so its memory lies below.
/// Anything above would be reported as untracked.
const FRAME_BITMAP_WORDS: usize = (4 << 30) / 4096 / 64;

pub type KernelFrames = FrameBitmap<FRAME_BITMAP_WORDS>;

/// An `IrqMutex`: frames are also freed with interrupts off, when the scheduler tears down a
/// process after its last thread (see `process`).
static FRAMES: IrqMutex<KernelFrames> = IrqMutex::new(KernelFrames::new());

/// Frames of the kernel heap: 16 MiB (thread stacks, queues, boxed thread bodies).
const HEAP_FRAMES: usize = 4096;

/// What `init` found and did.
pub struct MemoryReport {
    /// The AP trampoline's page below 1 MiB, if Lavender owns one.
    pub trampoline_page: Option<u64>,
    pub heap_start: u64,
    pub heap_bytes: usize,
    pub free_frames: usize,
    /// `Usable` bytes the frame allocator cannot track (above 4 GiB).
    pub untracked_bytes: u64,
    pub small_pages: usize,
    pub large_pages: usize,
    pub page_table_root: u64,
}

#[derive(Clone, Copy, Debug)]
pub enum MemoryError {
    Plan(PlanError),
    Map(MapError),
    /// No run of free frames is long enough for the heap.
    NoHeap,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plan(error) => write!(f, "the boot-info regions cannot be mapped: {error:?}"),
            Self::Map(error) => write!(f, "building the page tables failed: {error:?}"),
            Self::NoHeap => write!(
                f,
                "no {HEAP_FRAMES} contiguous free frames for the kernel heap"
            ),
        }
    }
}

/// Guest-physical ranges the boot-info page gives Lavender, with the access each needs.
fn owned_ranges(boot_info: &BootInfo) -> impl Iterator<Item = Range> + '_ {
    let memory = boot_info.memory_regions().iter().map(|region| Range {
        start: region.base,
        end: region.base + region.size,
        access: match region.kind {
            // The image, its boot stack and the boot-info page: the image must stay executable.
            MemoryKind::Loaded => Access::Code,
            MemoryKind::Usable => Access::Data,
        },
    });
    let shared = boot_info.shared_regions().iter().map(|region| Range {
        start: region.guest_physical,
        end: region.guest_physical + region.size,
        access: Access::Data,
    });
    memory.chain(shared)
}

/// Fills the frame allocator and switches to Lavender's own page tables. `stack_address` is
/// any address on the running stack, which must stay mapped across the switch.
pub fn init(boot_info: &BootInfo, stack_address: u64) -> Result<MemoryReport, MemoryError> {
    let mut frames = FRAMES.lock();
    let mut untracked_bytes = 0;
    for region in boot_info
        .memory_regions()
        .iter()
        .filter(|region| region.kind == MemoryKind::Usable)
    {
        untracked_bytes += frames.add_free(region.base, region.base + region.size);
    }
    // The contract places the image and the entry page tables in `Loaded` regions; reserving
    // them as well costs nothing and keeps the allocator from handing out memory in use if a
    // region table ever disagrees.
    let (image_start, image_end) = arch::entry::image_range();
    frames.reserve(image_start, image_end);
    arch::paging::entry_page_tables(|start, end| frames.reserve(start, end));
    // Before any frame is handed out: the trampoline needs a page below 1 MiB.
    let trampoline_page = smp::choose_trampoline_page(
        boot_info
            .memory_regions()
            .iter()
            .filter(|region| region.kind == MemoryKind::Usable)
            .map(|region| (region.base, region.base + region.size)),
    );
    if let Some(page) = trampoline_page {
        frames.reserve(page, page + FRAME_SIZE);
    }

    let plan = IdentityMapPlan::new(owned_ranges(boot_info)).map_err(MemoryError::Plan)?;
    let must_stay_mapped = [image_start, image_end - 1, stack_address];
    let page_table_root =
        arch::paging::activate(&plan, &mut frames, &must_stay_mapped).map_err(MemoryError::Map)?;
    let large_pages = plan
        .pages()
        .filter(|page| page.size == PageSize::Large)
        .count();
    let heap_start = frames
        .allocate_contiguous(HEAP_FRAMES)
        .ok_or(MemoryError::NoHeap)?;
    let heap_bytes = HEAP_FRAMES * FRAME_SIZE as usize;
    arch::heap::init(heap_start, heap_bytes);
    let report = MemoryReport {
        trampoline_page,
        heap_start,
        heap_bytes,
        free_frames: frames.free_count(),
        untracked_bytes,
        small_pages: plan.pages().count() - large_pages,
        large_pages,
        page_table_root,
    };
    Ok(report)
}

/// Whether any byte of `address..address + len` is Lavender's own or shared memory.
pub fn is_owned(boot_info: &BootInfo, address: u64, len: u64) -> bool {
    let end = address.saturating_add(len);
    owned_ranges(boot_info).any(|range| range.start < end && address < range.end)
}

/// Maps `address..address + len` for a probe (see `arch::paging::map_probe_target`).
pub fn map_probe_target(address: u64, len: u64) -> Result<usize, MapError> {
    arch::paging::map_probe_target(address, len, &mut FRAMES.lock())
}

/// A free 4 KiB frame (not zeroed), for user memory and its page tables.
pub fn allocate_frame() -> Option<u64> {
    FRAMES.lock().allocate()
}

/// Gives back a frame [`allocate_frame`] handed out.
pub fn free_frame(address: u64) {
    if let Err(problem) = FRAMES.lock().free(address) {
        log::error!("freeing frame {address:#x}: {problem:?}");
    }
}

/// Frames still free.
pub fn free_frames() -> usize {
    FRAMES.lock().free_count()
}
