//! Whether a local APIC delivers the interrupt it holds requested: the highest vector in its
//! IRR must be of a higher priority class (the vector's upper four bits) than the processor
//! priority, PPR, the higher of the task priority and the class of the highest vector in
//! service (Intel SDM Vol. 3A §11.8.3.1, "Processor Priority Register"). Pure, so it is
//! host-tested; `arch::lapic` reads the registers.

/// Whether the highest vector requested in `irr` (eight 32-bit registers, vector `32 * i + bit`)
/// has a higher priority class (its upper four bits) than the processor priority `ppr`.
pub fn deliverable(irr: &[u32; 8], ppr: u32) -> bool {
    let highest = (0..8u32).rev().find_map(|i| {
        let bits = irr[i as usize];
        (bits != 0).then(|| i * 32 + 31 - bits.leading_zeros())
    });
    highest.is_some_and(|vector| vector >> 4 > (ppr & 0xff) >> 4)
}

#[cfg(test)]
mod tests {
    use super::deliverable;

    fn requesting(vectors: &[u32]) -> [u32; 8] {
        let mut irr = [0; 8];
        for v in vectors {
            irr[(v / 32) as usize] |= 1 << (v % 32);
        }
        irr
    }

    #[test]
    fn a_request_is_deliverable_only_above_the_processor_priority_class() {
        assert!(!deliverable(&[0; 8], 0));
        assert!(deliverable(&requesting(&[0x21]), 0));
        // Vector 0x21 is class 2: a PPR of class 2 (an interrupt of class 2 in service, or
        // that TPR) holds it, class 1 does not.
        assert!(!deliverable(&requesting(&[0x21]), 0x20));
        assert!(!deliverable(&requesting(&[0x21]), 0x2f));
        assert!(deliverable(&requesting(&[0x21]), 0x1f));
        // The highest request counts: the timer (0xec) above a class-0xe priority is not
        // deliverable, the reschedule vector (0xfd) with it is.
        assert!(!deliverable(&requesting(&[0x21, 0xec]), 0xe0));
        assert!(deliverable(&requesting(&[0x21, 0xec, 0xfd]), 0xe0));
        // PPR's bits above 7 are reserved and ignored.
        assert!(deliverable(&requesting(&[0x31]), 0x120));
    }
}
