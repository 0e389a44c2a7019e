//! A pool of zeroed 4 KiB pages in the hypervisor's `.bss` for the structures the CPU
//! reads by physical address: EPT tables, VMCSs, MSR and I/O bitmaps. Pages are handed
//! out once and never freed (guests are set up once per boot).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::vmx::ept::{TableMemory, ENTRIES};

/// 1 MiB: EPT tables for two partitions, a VMCS per core, bitmaps per guest.
const POOL_PAGES: usize = 256;
const PAGE_SIZE: usize = 4096;

#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE]);

struct Pool(UnsafeCell<[Page; POOL_PAGES]>);
// SAFETY: every page is handed out at most once (the atomic bump index below), so no
// two references to the same page are ever created.
unsafe impl Sync for Pool {}
static POOL: Pool = Pool(UnsafeCell::new(
    [const { Page([0; PAGE_SIZE]) }; POOL_PAGES],
));
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh zeroed page, or `None` when the pool is exhausted.
pub fn allocate_page() -> Option<&'static mut Page> {
    let index = NEXT.fetch_add(1, Ordering::AcqRel);
    if index >= POOL_PAGES {
        return None;
    }
    // SAFETY: `index` is unique to this call (atomic bump), in bounds, and pages start
    // zeroed in .bss and are never handed out twice.
    Some(unsafe { &mut (*POOL.0.get())[index] })
}

/// Physical address of a page (the hypervisor is identity-mapped).
pub fn physical_address(page: &Page) -> u64 {
    page as *const Page as u64
}

fn pool_bounds() -> (u64, u64) {
    let start = POOL.0.get() as u64;
    (start, start + (POOL_PAGES * PAGE_SIZE) as u64)
}

/// EPT tables come from the pool. `table()` only accepts addresses the pool handed out.
pub struct PoolTables;

impl TableMemory for PoolTables {
    fn allocate_table(&mut self) -> Option<u64> {
        allocate_page().map(|page| physical_address(page))
    }

    fn table(&mut self, host_physical: u64) -> &mut [u64; ENTRIES] {
        let (start, end) = pool_bounds();
        assert!(
            host_physical >= start
                && host_physical < end
                && host_physical.is_multiple_of(PAGE_SIZE as u64),
            "{host_physical:#x} is not an EPT table from the page pool"
        );
        // SAFETY: the address is a page of the pool (checked above) that `allocate_table`
        // handed to EPT construction, which runs on one core per guest at a time and holds
        // no other reference to it across this borrow (tied to `&mut self`).
        unsafe { &mut *(host_physical as *mut [u64; ENTRIES]) }
    }
}
