//! Per-process address spaces (Intel SDM Vol. 3A §4.5, 4-level paging, 4 KiB pages).
//!
//! A process's root table (PML4) copies every entry of the kernel's root except slot 1, so the
//! kernel's identity map (slot 0) is the same in every address space, still supervisor-only
//! (the kernel's entries never set the U/S bit), and slot 1 is the process's own user window
//! (`lavender_abi::USER_BASE..USER_END`). Tables below slot 1 belong to the process alone and
//! are freed with it.
//!
//! User memory is reached from the kernel only through this module, by its guest-physical
//! address (identity-mapped), after a walk of the process's tables that checks the U/S bit
//! (and R/W for writes) at every level: a hostile pointer gets `BadAddress`, never a kernel
//! page fault. Page tables change only while a process is being built (`&mut self`); after
//! that they are only read, so walks need no lock.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use spin::Mutex;

use lavender_abi::{in_user_window, USER_BASE};
use vmcall_proto::region::{BufferRef, DataWindow, WindowError};
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use crate::kernel::arch::{copy, paging};
use crate::kernel::memory;

const PAGE: u64 = 4096;
const ENTRIES: usize = 512;
/// The PML4 slot of the user window.
const USER_SLOT: usize = (USER_BASE >> 39) as usize;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
/// NX (SDM Vol. 3A §4.5, Table 4-19); honoured because EFER.NXE is set.
const NO_EXECUTE: u64 = 1 << 63;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// A leaf that maps memory this address space does not own (the data window shared with
/// Linux): never freed with the space. Bit 9 of a 4 KiB page's entry is ignored by the
/// processor and free for software (SDM Vol. 3A §4.5, Table 4-20).
const SHARED_FRAME: u64 = 1 << 9;
/// Intermediate entries allow everything; the leaves decide (rights combine across levels).
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpaceError {
    OutOfFrames,
    /// Not a page-aligned address inside the user window.
    NotUserPage(u64),
}

impl fmt::Display for SpaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames => write!(f, "out of memory"),
            Self::NotUserPage(address) => write!(f, "{address:#x} is not a user page"),
        }
    }
}

/// A user pointer that is outside the window, unmapped, or lacks the access asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadAddress(pub u64);

/// A page of zeroes, fresh from the frame allocator.
fn zeroed_frame() -> Result<u64, SpaceError> {
    let frame = memory::allocate_frame().ok_or(SpaceError::OutOfFrames)?;
    // SAFETY: the frame was just handed out, so nothing else uses it; it is identity-mapped
    // in every address space (the kernel's map covers all of Lavender's memory) and 4 KiB long.
    unsafe { copy::zero_bytes(frame as usize as *mut u8, PAGE as usize) };
    Ok(frame)
}

/// Entry `index` of the table at `table` (a guest-physical address of a live table).
fn entry(table: u64, index: usize) -> *mut u64 {
    (table as usize as *mut u64).wrapping_add(index)
}

fn read_entry(table: u64, index: usize) -> u64 {
    // SAFETY: `table` is a live, identity-mapped page table (a root made by `new` or a table
    // reached from it through present entries) and `index` < 512, so the read is inside it;
    // entries are naturally aligned u64s, read whole.
    unsafe { entry(table, index % ENTRIES).read_volatile() }
}

fn table_index(address: u64, level: u32) -> usize {
    (address >> (12 + 9 * (level - 1))) as usize & (ENTRIES - 1)
}

pub struct AddressSpace {
    root: u64,
    /// Held while [`AddressSpace::map_shared`] adds entries to a running process's tables, so
    /// two of its threads never add the same table twice.
    adding: Mutex<()>,
}

impl AddressSpace {
    /// A new address space with the kernel's mappings and an empty user window.
    pub fn new() -> Result<Self, SpaceError> {
        let root = memory::allocate_frame().ok_or(SpaceError::OutOfFrames)?;
        let kernel = paging::root();
        // The kernel's entries, one string copy (at 50 instructions a microsecond under Bochs,
        // an entry-by-entry loop took 80 µs of every exec), then the user window's entry
        // cleared: the new space's own tables go there.
        // SAFETY: `root` was just handed out (nothing else uses it) and `kernel` is the live
        // kernel root table, both identity-mapped 4 KiB tables that do not overlap; the copy
        // takes each entry whole (8-byte moves of aligned words); the store after it is entry
        // USER_SLOT (< 512) of that same fresh root, which no CR3 holds yet.
        unsafe {
            copy::copy_bytes(
                root as usize as *mut u8,
                kernel as usize as *const u8,
                PAGE as usize,
            );
            entry(root, USER_SLOT).write_volatile(0);
        }
        Ok(Self {
            root,
            adding: Mutex::new(()),
        })
    }

    /// The root's address, for CR3.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps the user page at `page` to a fresh zeroed frame, or, if it is mapped already (two
    /// segments sharing a page), widens its rights. Returns the frame.
    pub fn map_page(
        &mut self,
        page: u64,
        writable: bool,
        executable: bool,
    ) -> Result<u64, SpaceError> {
        if page % PAGE != 0 || !in_user_window(page, PAGE) {
            return Err(SpaceError::NotUserPage(page));
        }
        let table = self.leaf_table(page)?;
        let index = table_index(page, 1);
        let value = read_entry(table, index);
        let (frame, writable, executable) = if value & PRESENT != 0 {
            (
                value & ADDRESS_MASK,
                writable || value & WRITABLE != 0,
                executable || value & NO_EXECUTE == 0,
            )
        } else {
            (zeroed_frame()?, writable, executable)
        };
        let flags = PRESENT
            | USER
            | if writable { WRITABLE } else { 0 }
            | if executable { 0 } else { NO_EXECUTE };
        // SAFETY: as above, a leaf table of this address space; the process does not run yet
        // (pages are only mapped while it is built), so no TLB holds the old entry.
        unsafe { entry(table, index).write_volatile(frame | flags) };
        Ok(frame)
    }

    /// The leaf table (level 1) that maps user page `page`, with the tables above it added
    /// where missing. Its callers are the only writer: the process is being built (`&mut
    /// self`), or `adding` is held.
    fn leaf_table(&self, page: u64) -> Result<u64, SpaceError> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let index = table_index(page, level);
            let value = read_entry(table, index);
            table = if value & PRESENT != 0 {
                value & ADDRESS_MASK
            } else {
                let next = zeroed_frame()?;
                // The zeroes are stored before the entry that makes the table reachable.
                fence(Ordering::Release);
                // SAFETY: `table` is one of this space's tables, reached from its root; the
                // caller is the only writer; index < 512. The store is one aligned 8-byte
                // write, which a walk on another core (of a running process) reads whole.
                unsafe { entry(table, index).write_volatile(next | TABLE_FLAGS) };
                next
            };
        }
        Ok(table)
    }

    /// Maps `len` bytes of memory this space does not own (the data window shared with Linux,
    /// at guest-physical `physical`) at user address `base`, readable and writable, never
    /// executable; both page-aligned. Unlike [`Self::map_page`] it runs while the process runs:
    /// it only adds entries (one 8-byte store each, after the table it points to is zeroed), so
    /// a walk on another core sees each entry whole, before or after. Pages mapped already
    /// (a second call) are mapped again to the same frames. The frames are not freed with the
    /// space.
    pub fn map_shared(&self, base: u64, physical: u64, len: u64) -> Result<(), SpaceError> {
        if base % PAGE != 0 || physical % PAGE != 0 || !in_user_window(base, len) {
            return Err(SpaceError::NotUserPage(base));
        }
        let _adding = self.adding.lock();
        for offset in (0..len).step_by(PAGE as usize) {
            let page = base + offset;
            let table = self.leaf_table(page)?;
            let flags = PRESENT | USER | WRITABLE | NO_EXECUTE | SHARED_FRAME;
            // SAFETY: as above, a leaf table of this space. The entry was not present or maps
            // the same frame with the same rights, so no TLB holds a translation it changes
            // (SDM Vol. 3A §4.10.2.3: not-present entries are not cached).
            unsafe {
                entry(table, table_index(page, 1)).write_volatile((physical + offset) | flags)
            };
        }
        Ok(())
    }

    /// The guest-physical address behind user address `address`, if the page is present and
    /// user-accessible (and writable, when `write`).
    pub fn translate(&self, address: u64, write: bool) -> Option<u64> {
        if !in_user_window(address, 1) {
            return None;
        }
        let required = PRESENT | USER | if write { WRITABLE } else { 0 };
        let mut table = self.root;
        for level in (1..=4).rev() {
            let value = read_entry(table, table_index(address, level));
            if value & required != required || (level > 1 && value & HUGE != 0) {
                return None;
            }
            table = value & ADDRESS_MASK;
        }
        Some(table + address % PAGE)
    }

    /// Calls `visit(guest_physical, length, offset)` for each page-sized piece of
    /// `address..address + length`, after checking the whole range first.
    fn pieces(
        &self,
        address: u64,
        length: usize,
        write: bool,
        mut visit: impl FnMut(u64, usize, usize),
    ) -> Result<(), BadAddress> {
        if !in_user_window(address, length as u64) {
            return Err(BadAddress(address));
        }
        let mut offset = 0;
        // Check every page before touching any, so a failure changes nothing.
        while offset < length {
            let at = address + offset as u64;
            self.translate(at, write).ok_or(BadAddress(at))?;
            offset += (PAGE - at % PAGE) as usize;
        }
        let mut offset = 0;
        while offset < length {
            let at = address + offset as u64;
            let piece = ((PAGE - at % PAGE) as usize).min(length - offset);
            let physical = self.translate(at, write).ok_or(BadAddress(at))?;
            visit(physical, piece, offset);
            offset += piece;
        }
        Ok(())
    }

    /// Copies user memory at `address` into `out`.
    pub fn read(&self, address: u64, out: &mut [u8]) -> Result<(), BadAddress> {
        let destination = out.as_mut_ptr();
        self.pieces(address, out.len(), false, |physical, length, offset| {
            // SAFETY: `physical..physical + length` lies in one present user page of this
            // process (checked by the walk), which is identity-mapped kernel memory; the
            // destination is `out[offset..offset + length]`, borrowed mutably here. Other
            // threads of the process may write the page meanwhile: the copy is opaque and
            // takes some value of each byte.
            unsafe {
                copy::copy_bytes(
                    destination.wrapping_add(offset),
                    physical as usize as *const u8,
                    length,
                )
            };
        })
    }

    /// Copies `bytes` into the process's memory while it is built: also into pages user mode
    /// cannot write (read-only segments, relocations in RELRO).
    pub fn load(&mut self, address: u64, bytes: &[u8]) -> Result<(), BadAddress> {
        let source = bytes.as_ptr();
        self.pieces(address, bytes.len(), false, |physical, length, offset| {
            // SAFETY: as in `read`, the other way round: a present page of this process's user
            // window, which no kernel data lives in; the source is
            // `bytes[offset..offset + length]`.
            unsafe {
                copy::copy_bytes(
                    physical as usize as *mut u8,
                    source.wrapping_add(offset),
                    length,
                )
            };
        })
    }

    /// Copies `buffer.len` bytes of user memory at `address` into `buffer` of the data
    /// window Linux shares: one copy, page by page, with no buffer between.
    pub fn read_into_window(
        &self,
        address: u64,
        window: &DataWindow<'_>,
        buffer: BufferRef,
    ) -> Result<(), WindowCopyError> {
        self.copy_with_window(address, window, buffer, Direction::ToWindow)
    }

    /// Copies `buffer` of the data window into user memory at `address` (mapped writable for
    /// user mode): one copy, page by page, with no buffer between.
    pub fn write_from_window(
        &self,
        address: u64,
        window: &DataWindow<'_>,
        buffer: BufferRef,
    ) -> Result<(), WindowCopyError> {
        self.copy_with_window(address, window, buffer, Direction::ToUser)
    }

    fn copy_with_window(
        &self,
        address: u64,
        window: &DataWindow<'_>,
        buffer: BufferRef,
        direction: Direction,
    ) -> Result<(), WindowCopyError> {
        if buffer.len == 0 {
            // Nothing moves: a call without input or output names no user memory.
            return Ok(());
        }
        let (window_bytes, len) = window.raw_parts(buffer).map_err(WindowCopyError::Window)?;
        let to_user = direction == Direction::ToUser;
        self.pieces(address, len, to_user, |physical, length, offset| {
            let user = physical as usize as *mut u8;
            let shared = window_bytes.wrapping_add(offset);
            let (destination, source) = if to_user {
                (user, shared.cast_const())
            } else {
                (shared, user.cast_const())
            };
            // SAFETY: the user side is a present page of this process (checked by the walk,
            // user-writable when written); the window side lies in the window (`raw_parts`
            // checked `buffer` against it), which Rust code reaches only through atomics and
            // such copies, never references. Both sides may change under the copy (the
            // process's threads, the agent): it is opaque and takes some value of each byte.
            unsafe { copy::copy_bytes(destination, source, length) };
        })
        .map_err(WindowCopyError::User)
    }
}

/// Which way [`AddressSpace::copy_with_window`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToWindow,
    ToUser,
}

/// Why a copy between user memory and the data window failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowCopyError {
    User(BadAddress),
    Window(WindowError),
}

/// Loads `root` into CR3 unless it is there already. Writing CR3 flushes this core's
/// non-global TLB entries (SDM Vol. 3A §4.10.4.1); the kernel's own mappings are the same in
/// every root, so the code running now keeps its meaning.
pub fn switch_to(root: u64) {
    let (current, _) = Cr3::read();
    if current.start_address().as_u64() == root {
        return;
    }
    let frame = PhysFrame::containing_address(PhysAddr::new(root));
    // SAFETY: `root` is the kernel's root or a live process root made by `AddressSpace::new`,
    // whose entries outside the user window equal the kernel's: every kernel address (code,
    // stacks, heap) translates as before. The scheduler switches a process's root out of every
    // core before freeing it (see `sched`).
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
}

/// Switches this core to the kernel's own root.
pub fn switch_to_kernel() {
    switch_to(paging::root());
}

impl Drop for AddressSpace {
    /// Frees every frame of the user window (pages and tables) and the root. Runs only once no
    /// core has the root in CR3 (the last thread of the process has switched away).
    fn drop(&mut self) {
        free_tables(read_entry(self.root, USER_SLOT), 3);
        memory::free_frame(self.root);
    }
}

/// Frees the table an entry at level `level + 1` points to, and everything below it.
fn free_tables(parent_entry: u64, level: u32) {
    if parent_entry & PRESENT == 0 {
        return;
    }
    let table = parent_entry & ADDRESS_MASK;
    for index in 0..ENTRIES {
        let value = read_entry(table, index);
        if value & PRESENT == 0 {
            continue;
        }
        if level == 1 {
            if value & SHARED_FRAME == 0 {
                memory::free_frame(value & ADDRESS_MASK);
            }
        } else {
            free_tables(value, level - 1);
        }
    }
    memory::free_frame(table);
}
