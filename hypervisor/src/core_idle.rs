//! Each core's idle time as the hypervisor sees it from outside the guest: from the HLT exit
//! that puts the vCPU in the HLT activity state to its wake-up. The guest's interrupts reach
//! it without a VM exit, except while it halts: then an external interrupt makes it exit
//! (`vcpu::exits`), so the wake is an exit and the interval ends there. Other exits of a
//! halted vCPU (the VMX-preemption timer, which counts down in the HLT state, SDM Vol. 3C
//! §26.5.1; an NMI) find it still halted and the interval goes on.
//!
//! Without that exit a wake would go unseen until the guest's next exit, usually the HLT
//! that ends its work: everything it did after an interrupt woke it counted as idle, and the
//! busy time a sample saw depended on where other exits happened to fall.
//!
//! One writer per core (its own vCPU loop); the policy engine reads. Times are TSC
//! ticks passed in by the caller, so the accounting is host-tested.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::platform::MAX_CPUS;

/// One core's idle accounting.
pub struct CoreIdle {
    /// TSC when the vCPU last entered the HLT state and has not been seen awake since; 0
    /// while it runs.
    halted_since: AtomicU64,
    /// Idle ticks of closed intervals, since boot.
    idle: AtomicU64,
    /// Ticks the core spent on the hypervisor's own work while its vCPU was not halted.
    hypervisor: AtomicU64,
}

impl CoreIdle {
    pub const fn new() -> Self {
        Self {
            halted_since: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            hypervisor: AtomicU64::new(0),
        }
    }

    /// The vCPU enters the HLT state at `now`.
    pub fn halted(&self, now: u64) {
        self.halted_since.store(now.max(1), Ordering::Release);
    }

    /// Whether the vCPU was halted when last seen.
    pub fn is_halted(&self) -> bool {
        self.halted_since.load(Ordering::Acquire) != 0
    }

    /// A VM exit at `now`; `still_halted`: the vCPU was in the HLT state when it exited and
    /// the exit was not its wake-up.
    pub fn exit(&self, now: u64, still_halted: bool) {
        let since = self.halted_since.load(Ordering::Acquire);
        if since == 0 {
            return;
        }
        self.idle
            .fetch_add(now.saturating_sub(since), Ordering::AcqRel);
        self.halted_since
            .store(if still_halted { now.max(1) } else { 0 }, Ordering::Release);
    }

    /// The core spent `ticks` on the hypervisor's own work (a pass of the monitor) between two
    /// entries of its vCPU: the guest neither ran nor idled then, so a sample leaves that time
    /// out of the guest's window. A halted vCPU's open interval already covers it (as idle).
    pub fn hypervisor_work(&self, ticks: u64) {
        if !self.is_halted() {
            self.hypervisor.fetch_add(ticks, Ordering::AcqRel);
        }
    }

    /// Ticks of the hypervisor's own work while the vCPU ran, since boot.
    pub fn hypervisor_ticks(&self) -> u64 {
        self.hypervisor.load(Ordering::Acquire)
    }

    /// The vCPU left the core (parked): an open interval ends at `now`.
    pub fn left(&self, now: u64) {
        self.exit(now, false);
    }

    /// Idle ticks since boot, up to `now` (an open interval counts to `now`).
    pub fn idle_ticks(&self, now: u64) -> u64 {
        let since = self.halted_since.load(Ordering::Acquire);
        let open = if since == 0 {
            0
        } else {
            now.saturating_sub(since)
        };
        self.idle.load(Ordering::Acquire) + open
    }
}

impl Default for CoreIdle {
    fn default() -> Self {
        Self::new()
    }
}

/// The machine's cores.
pub static IDLE: [CoreIdle; MAX_CPUS] = [const { CoreIdle::new() }; MAX_CPUS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_halt_counts_until_the_exit_that_finds_the_vcpu_awake() {
        let idle = CoreIdle::new();
        idle.exit(50, false);
        assert_eq!(idle.idle_ticks(100), 0);
        idle.halted(100);
        assert_eq!(idle.idle_ticks(150), 50);
        // The preemption timer finds it still halted: the interval goes on.
        idle.exit(200, true);
        assert_eq!(idle.idle_ticks(250), 150);
        // The next exit finds it running: the interval ends there.
        idle.exit(300, false);
        assert_eq!(idle.idle_ticks(1000), 200);
        assert!(!idle.is_halted());
        idle.halted(1000);
        idle.left(1010);
        assert_eq!(idle.idle_ticks(5000), 210);
    }

    #[test]
    fn a_guest_is_busy_from_the_interrupt_that_wakes_it() {
        // A guest halts at 100, a timer exit at 200 finds it halted, an interrupt wakes it at
        // 300 (the wake's exit), it works until it halts again at 700 (an HLT exit), and
        // sleeps until an interrupt at 900.
        let idle = CoreIdle::new();
        idle.halted(100);
        idle.exit(200, true);
        idle.exit(300, false);
        assert!(!idle.is_halted());
        // Its work from 300 to 700 is busy time, also while no exit came.
        assert_eq!(idle.idle_ticks(700), 200);
        idle.halted(700);
        idle.exit(900, false);
        // Idle 100..300 and 700..900; busy 300..700 and since 900.
        assert_eq!(idle.idle_ticks(1000), 400);
    }

    #[test]
    fn the_hypervisors_work_is_not_the_guests_busy_time() {
        let idle = CoreIdle::new();
        // Running: a pass of 30 ticks between two entries is the hypervisor's, not idle.
        idle.hypervisor_work(30);
        assert_eq!((idle.idle_ticks(100), idle.hypervisor_ticks()), (0, 30));
        // Halted: the open interval covers it already, as idle.
        idle.halted(100);
        idle.hypervisor_work(30);
        assert_eq!((idle.idle_ticks(150), idle.hypervisor_ticks()), (50, 30));
    }
}
