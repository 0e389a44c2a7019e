//! The running guests, published once by the BSP before any vCPU starts.

use core::sync::atomic::{AtomicU8, Ordering};

use heapless::Vec;

use super::console::GuestConsole;
use super::control::ControlChannel;
use super::EntryState;
use crate::arch::guest_memory::GuestRam;
use crate::partition::{GuestConfig, MAX_GUESTS, MAX_SHARED_REGIONS};
use crate::rate_limit::RateLimit;
use crate::vmx::exit::ExitCounters;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestState {
    Running = 0,
    /// Halted with interrupts disabled: it will not run again by itself.
    Halted = 1,
    /// Stopped by the hypervisor (violation or unexpected exit).
    Stopped = 2,
}

pub struct Guest {
    /// Index in the configuration; also the owner id in core ownership.
    pub id: u8,
    pub config: GuestConfig,
    pub ram: GuestRam,
    pub ept_pointer: u64,
    pub vpid: u16,
    pub msr_bitmap: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub entry: EntryState,
    pub exits: ExitCounters,
    pub console: GuestConsole,
    /// Rings shared with the hypervisor (core events, load reports), if configured.
    pub control: Option<ControlChannel>,
    /// The ids of the guests it shares a region with, told when it goes down.
    pub peers: Vec<u8, MAX_GUESTS>,
    /// Whom its `DOORBELL` wakes: per region shared with one other guest, the region's
    /// guest-physical base as this guest maps it, and that guest's id.
    pub doorbells: Vec<(u64, u8), MAX_SHARED_REGIONS>,
    /// Bounds the console output the guest can cause (warnings, `isolation_violation`
    /// markers).
    pub warnings: RateLimit,
    /// Bounds how often the guest can wake the monitor (`LOAD_REPORT_KICK`).
    pub kicks: RateLimit,
    /// Written through `set_state`; `pub(super)` so `build` can create it.
    pub(super) state: AtomicU8,
}

/// Guest-caused warnings: 16 at once, then one every 100 ms.
pub const WARNING_LIMIT: (u32, u64) = (16, 100_000);
/// Monitor wake-ups by `LOAD_REPORT_KICK`: 32 at once, then one per millisecond.
pub const KICK_LIMIT: (u32, u64) = (32, 1_000);

impl Guest {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn state(&self) -> GuestState {
        match self.state.load(Ordering::Acquire) {
            1 => GuestState::Halted,
            2 => GuestState::Stopped,
            _ => GuestState::Running,
        }
    }

    pub fn set_state(&self, state: GuestState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

static GUESTS: spin::Once<Vec<Guest, MAX_GUESTS>> = spin::Once::new();

/// Publishes the guests (once, on the BSP, before any vCPU starts).
pub fn install(guests: Vec<Guest, MAX_GUESTS>) {
    GUESTS.call_once(|| guests);
}

pub fn all() -> &'static [Guest] {
    GUESTS.get().map_or(&[], |g| g.as_slice())
}

pub fn by_id(id: u8) -> Option<&'static Guest> {
    all().get(usize::from(id))
}

/// The guest whose boot core is CPU `index`, if any.
pub fn booting_on(index: usize) -> Option<&'static Guest> {
    all().iter().find(|g| g.config.boot_core.index() == index)
}
