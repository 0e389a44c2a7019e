//! Lavender's GDT and per-core TSSs.
//!
//! The layout (kernel and user segments, a TSS descriptor per core slot) is in
//! [`guest_lavender::descriptors`]. The TSS of a 64-bit kernel only supplies stacks (Intel SDM
//! Vol. 3A §8.7): RSP0, the stack an interrupt or exception from user mode switches to (the
//! running user thread's kernel stack, set at every switch to one: [`set_kernel_stack`]), and
//! the interrupt-stack-table entries that #DF and NMIs switch to, so a kernel stack overflow is
//! reported instead of escalating to a triple fault, and an NMI never runs on a user stack.
//!
//! Each core slot has its own copy of the GDT, copied fresh every time a core starts in the slot:
//! `LTR` marks the slot's TSS descriptor busy (SDM Vol. 3A §8.2.2) and loading a busy TSS
//! raises #GP, so a slot reused by a later bring-up needs a fresh, non-busy descriptor.

use core::cell::UnsafeCell;

use guest_lavender::descriptors::{
    tss_selector, DOUBLE_FAULT_IST, GDT_ENTRIES, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR,
    MAX_CORE_SLOTS, NMI_IST, USER_CODE_SELECTOR, USER_DATA_SELECTOR,
};
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{lgdt, load_tss};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

/// Bytes of each core's #DF and NMI stacks: room for the exception report's formatting.
const DOUBLE_FAULT_STACK_SIZE: usize = 8 * 1024;

/// A stack only the processor and the code running on it touch, never through a Rust reference.
#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; DOUBLE_FAULT_STACK_SIZE]>);

// SAFETY: Rust code never reads or writes a `Stack` through a reference; it only takes the
// address of its top, and each core's stack is used by that core alone.
unsafe impl Sync for Stack {}

impl Stack {
    const fn new() -> Self {
        Self(UnsafeCell::new([0; DOUBLE_FAULT_STACK_SIZE]))
    }

    /// The initial RSP: one past the highest byte (stacks grow down), 16-byte aligned.
    fn top(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.0.get()) + DOUBLE_FAULT_STACK_SIZE as u64
    }
}

static DOUBLE_FAULT_STACKS: [Stack; MAX_CORE_SLOTS] = [const { Stack::new() }; MAX_CORE_SLOTS];
static NMI_STACKS: [Stack; MAX_CORE_SLOTS] = [const { Stack::new() }; MAX_CORE_SLOTS];

/// The TSSs. The processor reads a TSS from memory at every privilege change, so RSP0 is
/// rewritten in place (by the slot's own core only) rather than through a Rust reference.
struct Tss(UnsafeCell<TaskStateSegment>);

// SAFETY: a slot's TSS is written only by the core running in the slot (its RSP0, through a
// raw pointer, with no reference alive) and read by the processor; `build_gdt` only takes its
// address.
unsafe impl Sync for Tss {}

static TSS: Once<[Tss; MAX_CORE_SLOTS]> = Once::new();

/// One slot's GDT, as raw descriptors, written only by the core that starts in the slot,
/// before it loads it.
#[repr(C, align(16))]
struct SlotGdt(UnsafeCell<[u64; GDT_ENTRIES]>);

// SAFETY: a slot's GDT is written and loaded only by the one core that runs in the slot (see
// `load`); other cores never touch it.
unsafe impl Sync for SlotGdt {}

/// The GDT with every TSS descriptor available, as raw descriptors and their count, copied
/// into a slot at each start. Plain words: the `x86_64` crate's table clones entry by entry
/// through an out-of-line call, which cost a core about 7 µs of its bring-up under Bochs.
static FRESH_GDT: Once<([u64; GDT_ENTRIES], usize)> = Once::new();
/// The kernel code descriptor's index: never 0 in a slot's table once it was copied.
const KERNEL_CODE_INDEX: usize = KERNEL_CODE_SELECTOR as usize / 8;
static GDTS: [SlotGdt; MAX_CORE_SLOTS] =
    [const { SlotGdt(UnsafeCell::new([0; GDT_ENTRIES])) }; MAX_CORE_SLOTS];

fn build_tss() -> [Tss; MAX_CORE_SLOTS] {
    core::array::from_fn(|slot| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST - 1)] =
            DOUBLE_FAULT_STACKS[slot].top();
        tss.interrupt_stack_table[usize::from(NMI_IST - 1)] = NMI_STACKS[slot].top();
        Tss(UnsafeCell::new(tss))
    })
}

fn build_gdt(tss: &'static [Tss; MAX_CORE_SLOTS]) -> ([u64; GDT_ENTRIES], usize) {
    let mut gdt = GlobalDescriptorTable::<GDT_ENTRIES>::empty();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let user_data = gdt.append(Descriptor::user_data_segment());
    let user_code = gdt.append(Descriptor::user_code_segment());
    assert_eq!(
        (code.0, data.0, user_data.0, user_code.0),
        (
            KERNEL_CODE_SELECTOR,
            KERNEL_DATA_SELECTOR,
            USER_DATA_SELECTOR,
            USER_CODE_SELECTOR
        ),
        "GDT layout"
    );
    for (slot, tss) in tss.iter().enumerate() {
        // SAFETY: the TSS is a `'static` that is never moved; the shared reference lives only
        // while the descriptor is encoded, and no core writes a TSS before its slot's GDT is
        // built (`set_kernel_stack` runs on a core only after `load`).
        let selector = gdt.append(Descriptor::tss_segment(unsafe { &*tss.0.get() }));
        assert_eq!(selector.0, tss_selector(slot), "GDT layout");
    }
    let mut raw = [0; GDT_ENTRIES];
    for (word, entry) in raw.iter_mut().zip(gdt.entries()) {
        *word = entry.raw();
    }
    (raw, gdt.entries().len())
}

/// Gives slot `slot` a fresh copy of the GDT (built once: copying it is much cheaper than
/// building it on every bring-up), loads it on this core, reloads the segment registers and
/// loads the slot's TSS. At any time at most one core may run in a slot (the core table hands a
/// slot to a new core only after the previous one was released).
///
/// The slot's copy is made at its first start. A later start finds it as the last core left
/// it, which differs from the fresh one only in the busy flag `LTR` set in the slot's own TSS
/// descriptor (its type, in the descriptor's low word: Intel SDM Vol. 3A §8.2.2), so only
/// that word is restored: copying the whole table (hundreds of bytes) would cost the start
/// far more.
pub fn load(slot: usize) {
    assert!(slot < MAX_CORE_SLOTS, "core slot {slot} out of range");
    let tss = TSS.call_once(build_tss);
    let (fresh, entries) = FRESH_GDT.call_once(|| build_gdt(tss));
    let cell = GDTS[slot].0.get();
    let pointer = DescriptorTablePointer {
        limit: (entries * 8 - 1) as u16,
        base: VirtAddr::from_ptr(cell),
    };
    // SAFETY: only the core starting in `slot` touches the slot's GDT, and it has not loaded it
    // yet (a released core's GDTR no longer matters: that core runs no Lavender code), so this
    // mutable reference aliases no live one. The table then stays unchanged (but for the busy
    // bit the processor sets) until the slot's next core starts, as long as this core uses
    // it; it holds the `entries` valid descriptors `build_gdt` made, which `pointer` covers:
    // copied whole at the slot's first start, and since then changed only in the word
    // restored here.
    unsafe {
        let gdt = &mut *cell;
        let tss_low = usize::from(tss_selector(slot) / 8);
        if gdt[KERNEL_CODE_INDEX] == 0 {
            *gdt = *fresh;
        } else {
            gdt[tss_low] = fresh[tss_low];
        }
        lgdt(&pointer);
    }
    // SAFETY: the GDT just loaded has a 64-bit ring-0 code segment at KERNEL_CODE_SELECTOR and a
    // writable data segment at KERNEL_DATA_SELECTOR (checked in `build_gdt`), the same layout as
    // the hypervisor's entry GDT, so reloading CS (a far return) and the data segments keeps
    // the current code and stack valid. FS and GS are left alone: loading them would clear
    // their base addresses.
    unsafe {
        CS::set_reg(SegmentSelector(KERNEL_CODE_SELECTOR));
        SS::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
        DS::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
        ES::set_reg(SegmentSelector(KERNEL_DATA_SELECTOR));
    }
    // SAFETY: `tss_selector(slot)` is an available 64-bit TSS descriptor in the GDT just built
    // and loaded (checked in `build_gdt`), whose TSS is a `'static`; the descriptor is fresh,
    // so not busy (a busy TSS makes `LTR` raise #GP).
    unsafe { load_tss(SegmentSelector(tss_selector(slot))) };
}

/// Sets RSP0 of slot `slot`'s TSS: the stack the processor switches to when an interrupt or
/// exception arrives in user mode (SDM Vol. 3A §6.14.2). Called by the slot's own core only.
pub fn set_kernel_stack(slot: usize, top: u64) {
    let tss = TSS.get().expect("gdt::load ran on this core");
    // SAFETY: only the core running in `slot` writes its TSS, and no Rust reference to it is
    // alive (see `Tss`); the write is a plain aligned 64-bit store, which the processor reads
    // at the next privilege change.
    unsafe { (*tss[slot].0.get()).privilege_stack_table[0] = VirtAddr::new_truncate(top) };
}
