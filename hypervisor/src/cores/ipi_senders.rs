//! Which interrupts the hypervisor sends for a guest may still reach a core that leaves it.
//!
//! The hypervisor sends interrupts at a guest's vCPUs for the guest (its IPIs, checked and
//! forwarded; the wake-up a release asks for) and for itself (the NMI that makes a vCPU
//! leave). Each sender checks that the vCPU runs on the target core, then writes its ICR. A
//! sender delayed between the two (an NMI or an SMI on its own core can hold it for long)
//! could write the ICR after the core left the guest, cleaned its APIC and entered the
//! other guest, which would then receive the first guest's interrupt.
//!
//! So a sender counts itself in, checks the target, writes the ICR and counts itself out;
//! and a core leaving a guest, once the core manager no longer has it run the guest's vCPU,
//! waits until no sender is in before it cleans its APIC. A sender counted in before that
//! wait began has written its ICR when the wait ends, so its interrupt is in the APIC the
//! clean-up empties (only the APIC's delivery, well under a microsecond, is left, against the
//! microseconds of the clean-up); one counted in after it reads (acquire, through the count)
//! what the core wrote before it, the core manager's word without the guest, and sends
//! nothing unless the core runs that guest's vCPU again.
//!
//! Model-checked in `tests/loom_cores.rs`: without the count, or with the core's read of it a
//! plain load, the model finds the interrupt sent after the clean-up.

use super::sync::{spin, AtomicU32, Ordering};

/// The senders of interrupts at one core's vCPU between their check and their ICR write.
pub struct IpiSenders {
    inside: AtomicU32,
}

impl IpiSenders {
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            inside: AtomicU32::new(0),
        }
    }

    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            inside: AtomicU32::new(0),
        }
    }

    /// A sender: runs `send`, which checks that the target runs the vCPU the interrupt is
    /// for and if so writes the ICR, and returns whether it did. Whether it sent.
    pub fn send(&self, send: impl FnOnce() -> bool) -> bool {
        self.inside.fetch_add(1, Ordering::AcqRel);
        let sent = send();
        self.inside.fetch_sub(1, Ordering::AcqRel);
        sent
    }

    /// The core, once the core manager no longer has it run its guest's vCPU: waits until
    /// every sender that may have found that vCPU running has written its ICR (a few
    /// instructions each; senders never wait for the core).
    pub fn wait_until_sent(&self) {
        // Read by a read-modify-write, which the senders' count-ins are ordered with: with a
        // load, the core could read no sender while a sender reads the core manager's word
        // from before the core left (each missing the other's write), and the model finds it.
        while self.inside.fetch_add(0, Ordering::AcqRel) != 0 {
            spin();
        }
    }
}

impl Default for IpiSenders {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn senders_are_counted_out_whatever_they_find() {
        let senders = IpiSenders::new();
        assert!(senders.send(|| true));
        assert!(
            !senders.send(|| false),
            "the target no longer runs the vCPU"
        );
        senders.wait_until_sent();
        assert_eq!(senders.inside.load(Ordering::Relaxed), 0);
    }
}
