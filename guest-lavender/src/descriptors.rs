//! Layout of Lavender's GDT and the encoding of its IDT gates.
//!
//! One GDT layout serves every core: kernel code and data, user data and code (in the order
//! `SYSRET` needs), then one TSS descriptor per core slot. A core's TSS selector (the task
//! register, read with `STR`) therefore also names its slot, which the exception path uses to
//! find per-core state without touching an MSR.

/// Most cores Lavender can hold at once; sizes every per-core array.
pub const MAX_CORE_SLOTS: usize = 16;

/// 64-bit kernel code segment (GDT entry 1).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Kernel data and stack segment (GDT entry 2).
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// User data and stack segment (GDT entry 3), with RPL 3.
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// 64-bit user code segment (GDT entry 4), with RPL 3.
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// First TSS descriptor (GDT entry 5). A 64-bit TSS descriptor takes two entries, 16 bytes
/// (Intel SDM Vol. 3A §8.2.3, "TSS Descriptor in 64-bit mode").
const FIRST_TSS_SELECTOR: u16 = 0x28;
const TSS_DESCRIPTOR_SIZE: u16 = 16;
/// GDT entries: null, kernel code and data, user data and code, and two per TSS.
pub const GDT_ENTRIES: usize = 5 + 2 * MAX_CORE_SLOTS;

/// IA32_STAR for `SYSCALL`/`SYSRET` (SDM Vol. 2B, "SYSCALL" and "SYSRET"): bits 47:32 give
/// the kernel CS (SS is the next entry); bits 63:48 a base from which 64-bit `SYSRET` loads SS
/// = base + 8 and CS = base + 16, both with RPL 3. Hence user data must directly precede user
/// code, and the base is the kernel data selector.
pub const STAR: u64 = (KERNEL_DATA_SELECTOR as u64) << 48 | (KERNEL_CODE_SELECTOR as u64) << 32;

/// Interrupt-stack-table slot (1-based, as in the gate) for exceptions that must not use the
/// interrupted stack: #DF, which a kernel stack overflow raises (SDM Vol. 3A §6.14.5).
pub const DOUBLE_FAULT_IST: u8 = 1;
/// IST slot for NMIs: an NMI can arrive in the instructions of the system-call path that still
/// run on the user's stack (before the switch to the kernel stack, or after the switch back
/// just before `SYSRET`), so it must never use the interrupted stack.
pub const NMI_IST: u8 = 2;

/// The TSS selector of core slot `slot`.
pub const fn tss_selector(slot: usize) -> u16 {
    FIRST_TSS_SELECTOR + slot as u16 * TSS_DESCRIPTOR_SIZE
}

/// The core slot whose TSS `selector` names (the value `STR` returns on that core).
pub fn slot_of_tss_selector(selector: u16) -> Option<usize> {
    let offset = selector.checked_sub(FIRST_TSS_SELECTOR)?;
    let slot = usize::from(offset / TSS_DESCRIPTOR_SIZE);
    (offset % TSS_DESCRIPTOR_SIZE == 0 && slot < MAX_CORE_SLOTS).then_some(slot)
}

/// A 64-bit IDT gate descriptor (SDM Vol. 3A §6.14.1, Figure 6-8), as two little-endian words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct Gate(pub [u64; 2]);

/// Type 0xE: 64-bit interrupt gate, which clears IF on entry (SDM Vol. 3A §6.12.1.3).
const INTERRUPT_GATE_TYPE: u64 = 0xE;
const PRESENT: u64 = 1 << 47;

impl Gate {
    /// Not present: delivering its vector raises #NP instead.
    pub const MISSING: Gate = Gate([0, 0]);

    /// A present ring-0 interrupt gate to `handler` in `code_selector`, switching to IST stack
    /// `ist` (1..=7) or staying on the current stack (0).
    pub const fn interrupt(handler: u64, code_selector: u16, ist: u8) -> Gate {
        let low = (handler & 0xffff)
            | (code_selector as u64) << 16
            | (ist as u64 & 0b111) << 32
            | INTERRUPT_GATE_TYPE << 40
            | PRESENT
            | (handler >> 16 & 0xffff) << 48;
        Gate([low, handler >> 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_selectors_round_trip() {
        assert_eq!(tss_selector(0), 0x28);
        assert_eq!(tss_selector(1), 0x38);
        for slot in 0..MAX_CORE_SLOTS {
            assert_eq!(slot_of_tss_selector(tss_selector(slot)), Some(slot));
        }
        assert_eq!(slot_of_tss_selector(0x10), None);
        assert_eq!(
            slot_of_tss_selector(0x30),
            None,
            "the high half of a TSS descriptor"
        );
        assert_eq!(slot_of_tss_selector(tss_selector(MAX_CORE_SLOTS)), None);
        // The last TSS descriptor ends exactly at the end of the table.
        assert_eq!(usize::from(tss_selector(MAX_CORE_SLOTS)), GDT_ENTRIES * 8);
    }

    #[test]
    fn sysret_selectors_follow_star() {
        let base = (STAR >> 48) as u16;
        assert_eq!((base + 8) | 3, USER_DATA_SELECTOR);
        assert_eq!((base + 16) | 3, USER_CODE_SELECTOR);
        assert_eq!((STAR >> 32) as u16, KERNEL_CODE_SELECTOR);
        assert_eq!(
            (STAR >> 32) as u16 + 8,
            KERNEL_DATA_SELECTOR,
            "SYSCALL's SS"
        );
    }

    #[test]
    fn interrupt_gate_fields() {
        let gate = Gate::interrupt(
            0xffff_8000_1234_5678,
            KERNEL_CODE_SELECTOR,
            DOUBLE_FAULT_IST,
        );
        let [low, high] = gate.0;
        assert_eq!(low & 0xffff, 0x5678, "offset 15:0");
        assert_eq!(low >> 16 & 0xffff, 0x08, "selector");
        assert_eq!(low >> 32 & 0b111, 1, "IST");
        assert_eq!(low >> 35 & 0b11111, 0, "bits 39:35 are zero");
        assert_eq!(low >> 40 & 0xf, 0xe, "type");
        assert_eq!(low >> 44 & 1, 0, "bit 44 is zero");
        assert_eq!(low >> 45 & 0b11, 0, "DPL 0");
        assert_eq!(low >> 47 & 1, 1, "present");
        assert_eq!(low >> 48, 0x1234, "offset 31:16");
        assert_eq!(high, 0xffff_8000, "offset 63:32, reserved bits zero");
        assert_eq!(core::mem::size_of::<Gate>(), 16);
    }
}
