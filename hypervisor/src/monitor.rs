//! The BSP's watch over the guests once they run: it sleeps until a vCPU reports that
//! its guest halted or was stopped, then prints that guest's exit counters and shows the
//! hypervisor is still in charge.

use crate::arch::descriptors;
use crate::arch::percpu::CPUS;
use crate::guest::{self, GuestState};
use crate::partition::MAX_GUESTS;
use crate::vcpu::CORE_EXITS;
use crate::{console, time};

pub fn run() -> ! {
    let mut reported = [false; MAX_GUESTS];
    loop {
        for guest in guest::all() {
            let id = usize::from(guest.id);
            let state = guest.state();
            if state == GuestState::Running || reported[id] {
                continue;
            }
            reported[id] = true;
            report(guest, state);
        }
        descriptors::wait_for_wakeup();
    }
}

fn report(guest: &guest::Guest, state: GuestState) {
    let state_name = match state {
        GuestState::Halted => "halted",
        GuestState::Stopped => "stopped",
        GuestState::Running => "running",
    };
    log::info!(
        "guest '{}' {state_name} after {} VM exits",
        guest.name(),
        guest.exits.total()
    );
    console::marker("exit_counters", |o| {
        o.str("guest", guest.name())
            .str("state", state_name)
            .u64("total", guest.exits.total());
        o.object("by_reason", |r| {
            for (name, count) in guest.exits.nonzero() {
                r.u64(name, count);
            }
        });
        o.array("by_core", |a| {
            for core in guest.config.allowed_cores.iter().map(|c| c.index()) {
                a.object(|c| {
                    c.u64("cpu", core as u64)
                        .u64("apic_id", CPUS[core].apic_id().into());
                    c.object("by_reason", |r| {
                        for (name, count) in CORE_EXITS[core].nonzero() {
                            r.u64(name, count);
                        }
                    });
                });
            }
        });
    });
    let running = guest::all()
        .iter()
        .filter(|g| g.state() == GuestState::Running)
        .count();
    console::marker("hv_alive", |o| {
        o.u64("guests_running", running as u64)
            .u64("uptime_us", time::now_us());
    });
}
