//! What a guest leaves on a core it no longer runs on, cleared before the core serves
//! anyone else (the hypervisor included): the local APIC registers it reaches directly
//! (x2APIC MSRs pass through), an NMI held back for it, the extended (FPU/SSE/AVX) state
//! and XCR0, CR2, the debug registers, and the pass-through MSRs the VMCS does not switch.

use crate::arch::lapic::LocalApic;
use crate::arch::{cpu, msr};

/// Returns this core's state to what it is at boot. Runs on the core, after its vCPU
/// ended and before it takes another request. Returns the vectors 16..31 the guest left
/// pending or in service in the APIC (bit `v` for vector `v`), which were dropped.
pub fn core_state() -> u32 {
    // The APIC first: a TPR of 0xff would keep the wake IPI out, an armed timer would
    // fire into the next owner or the hypervisor.
    let low_vectors = LocalApic::X2Apic.reset_for_next_owner();
    // An NMI sent for the guest and held back by the blocking an NMI exit leaves would
    // otherwise reach the next guest at its entry.
    cpu::unblock_nmis();
    cpu::clear_extended_state();
    cpu::clear_debug_registers_and_cr2();
    msr::clear_guest_only_msrs();
    low_vectors
}
