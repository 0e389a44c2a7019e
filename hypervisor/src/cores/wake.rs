//! Who owes a parked core its wake-up IPI. A core that is about to halt in the hypervisor
//! raises its flag, looks at its mailbox one last time, and halts; a sender that posted a
//! request takes the flag down and, only if it was up, sends the IPI. So an IPI goes only to
//! a core that sleeps or is about to, at most one per sleep, and the core learns when it gets
//! up whether one is owed to it: if it is, it waits for that IPI before it does anything else.
//!
//! Without this, a core that saw a request by polling its mailbox could enter a guest while
//! the IPI sent for that request was still on its way: external interrupts do not exit to the
//! hypervisor while a guest runs, so the guest would receive the hypervisor's vector.
//!
//! Every write of the flag is a swap, so the core's raise and a sender's take are ordered:
//! if the take comes second, it finds the flag up and sends the IPI; if the raise comes
//! second, it reads the take's write (release, acquire), so the core's last look, after the
//! raise, sees the request the sender posted before its take. Either way the core does not
//! sleep through a request. Model-checked in `tests/loom_cores.rs`.

use super::sync::{AtomicBool, Ordering};

/// One core's flag: up while it sleeps (or is about to) awaiting the wake IPI.
pub struct WakeFlag {
    asleep: AtomicBool,
}

impl WakeFlag {
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            asleep: AtomicBool::new(false),
        }
    }

    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            asleep: AtomicBool::new(false),
        }
    }

    /// The core, before its last look at its mailbox and its halt.
    pub fn raise(&self) {
        self.asleep.swap(true, Ordering::AcqRel);
    }

    /// A sender, after it posted its request: whether it must send the wake IPI (the flag
    /// was up, and this sender took it down: no other sender sends one for this sleep).
    pub fn take(&self) -> bool {
        self.asleep.swap(false, Ordering::AcqRel)
    }

    /// The core, awake (or not halted at all, having seen a request): whether an IPI is
    /// owed to it, that it must take before it enters a guest (a sender took the flag).
    pub fn lower(&self) -> bool {
        !self.asleep.swap(false, Ordering::AcqRel)
    }
}

impl Default for WakeFlag {
    fn default() -> Self {
        Self::new()
    }
}
