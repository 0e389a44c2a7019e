//! The kernel heap: `linked_list_allocator`'s first-fit heap over a contiguous run of frames,
//! behind a spin lock that also masks interrupts, so an interrupt handler that allocates cannot
//! spin forever on a lock held by the thread it interrupted.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};

use linked_list_allocator::Heap;
use spin::Mutex;
use x86_64::instructions::interrupts::without_interrupts;

struct KernelHeap(Mutex<Heap>);

#[global_allocator]
static HEAP: KernelHeap = KernelHeap(Mutex::new(Heap::empty()));

// SAFETY: `Heap` hands out disjoint blocks of the memory it was given, each at least as large
// and as aligned as the layout asked for, and takes back only blocks it handed out with the
// same layout (the `GlobalAlloc` contract on `dealloc`'s caller).
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        without_interrupts(|| {
            self.0
                .lock()
                .allocate_first_fit(layout)
                .map_or(null_mut(), |block| block.as_ptr())
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(block) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator returned for `layout`.
            without_interrupts(|| unsafe { self.0.lock().deallocate(block, layout) });
        }
    }
}

/// Gives the heap the memory `start..start + size`. Called once, before the first allocation.
pub fn init(start: u64, size: usize) {
    // SAFETY: the caller took `start..start + size` from the frame allocator for the heap alone:
    // it is identity-mapped, writable, used by nothing else, and never given back.
    without_interrupts(|| unsafe { HEAP.0.lock().init(start as usize as *mut u8, size) });
}

/// Bytes the heap has handed out and not taken back.
pub fn used() -> usize {
    without_interrupts(|| HEAP.0.lock().used())
}
