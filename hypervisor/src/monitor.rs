//! The BSP's watch over the guests once they run: it sleeps until a vCPU reports that
//! its guest halted or was stopped (or its stats timer fires), then prints that guest's
//! exit counters and shows the hypervisor is still in charge. It also writes out the
//! queued console lines (`console::drain`) before each sleep.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::cpu;
use crate::arch::descriptors;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::guest::{self, GuestState};
use crate::partition::MAX_GUESTS;
use crate::{console, time};

/// Watches the guests until the end. With `stats_ms`, every guest's exit counters are
/// also printed that often (the BSP's APIC timer wakes it).
pub fn run(stats_ms: Option<u32>) -> ! {
    let apic = LocalApic::X2Apic;
    // The timer also wakes this core for the guests' watchdogs.
    let timer_ms = match (stats_ms, crate::faults::check_period_ms()) {
        (Some(stats), Some(watch)) => Some(stats.min(watch)),
        (stats, watch) => stats.or(watch),
    };
    let ticks_per_ms = timer_ms.map(|_| time::calibrate_apic_timer(&apic));
    let mut reported = [false; MAX_GUESTS];
    let mut next_stats =
        stats_ms.map(|ms| cpu::read_tsc() + time::ticks_for_us(u64::from(ms) * 1000));
    loop {
        if let (Some(ms), Some(due)) = (stats_ms, next_stats) {
            if cpu::read_tsc() >= due {
                for guest in guest::all()
                    .iter()
                    .filter(|g| g.state() == GuestState::Running)
                {
                    report(guest, GuestState::Running);
                }
                next_stats = Some(due + time::ticks_for_us(u64::from(ms) * 1000));
            }
        }
        if let (Some(ms), Some(per_ms)) = (timer_ms, ticks_per_ms) {
            apic.arm_timer(descriptors::WAKE_VECTOR, ms.saturating_mul(per_ms));
        }
        crate::moves::poll();
        crate::stats_page::poll();
        for guest in guest::all() {
            poll_control(guest);
        }
        crate::faults::poll();
        for guest in guest::all() {
            let id = usize::from(guest.id);
            let state = guest.state();
            if state == GuestState::Running || reported[id] {
                continue;
            }
            reported[id] = true;
            report(guest, state);
        }
        // This core drains the console. Lines queued while it wrote came without a
        // wake-up: look again rather than sleep.
        if console::drain() {
            descriptors::wait_for_wakeup();
        }
    }
}

fn report(guest: &guest::Guest, state: GuestState) {
    let state_name = match state {
        GuestState::Halted => "halted",
        GuestState::Stopped => "stopped",
        GuestState::Running => "running",
    };
    let exits = guest.exits.snapshot();
    log::info!(
        "guest '{}' {state_name} after {} VM exits",
        guest.name(),
        exits.total()
    );
    console::marker("exit_counters", |o| {
        o.str("guest", guest.name())
            .str("state", state_name)
            .u64("total", exits.total());
        o.object("by_reason", |r| {
            for (name, count) in exits.nonzero() {
                r.u64(name, count);
            }
        });
        o.array("by_core", |a| {
            for core in guest.config.allowed_cores.iter().map(|c| c.index()) {
                a.object(|c| {
                    c.u64("cpu", core as u64)
                        .u64("apic_id", CPUS[core].apic_id().into());
                    c.object("by_reason", |r| {
                        for (name, count) in CPUS[core].exits.snapshot().nonzero() {
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

/// Whether load reports are printed as `load_report` markers (`load_markers=on` or a debug
/// log). Off by default: the policy reads every report; a person at the console does not
/// want one per change of an idle guest's load.
static PRINT_LOAD_REPORTS: AtomicBool = AtomicBool::new(false);

/// Print load reports as `load_report` markers from now on (see [`poll_control`]).
pub fn print_load_reports(on: bool) {
    PRINT_LOAD_REPORTS.store(on, Ordering::Relaxed);
}

/// Last load report shown per guest: (runnable threads, mean busy per-mille).
static LAST_LOAD: spin::Mutex<[(u32, u16); MAX_GUESTS]> =
    spin::Mutex::new([(u32::MAX, 0); MAX_GUESTS]);

/// The last load report shown for guest `id`: (runnable threads, mean busy per-mille).
pub fn last_load(id: u8) -> Option<(u32, u16)> {
    let (runnable, busy) = *LAST_LOAD.lock().get(usize::from(id))?;
    (runnable != u32::MAX).then_some((runnable, busy))
}

/// Reads what the guest sent on its control channel: load reports (shown as a
/// `load_report` marker when they change noticeably, if [`print_load_reports`] is on) and
/// core events (logged).
pub fn poll_control(guest: &guest::Guest) {
    let Some(control) = &guest.control else {
        return;
    };
    let print = PRINT_LOAD_REPORTS.load(Ordering::Relaxed);
    let drained = control.drain_reports(|report| {
        crate::faults::heartbeat(guest.id);
        if !print {
            return;
        }
        let cores = report.reported_cores();
        let total: u32 = cores
            .iter()
            .filter_map(|c| report.busy(c))
            .map(|b| u32::from(b.get()))
            .sum();
        let mean = (total / cores.len().max(1)) as u16;
        let mut last = LAST_LOAD.lock();
        let (runnable, busy) = &mut last[usize::from(guest.id)];
        if *runnable != report.runnable_threads || mean.abs_diff(*busy) >= 100 {
            (*runnable, *busy) = (report.runnable_threads, mean);
            console::marker("load_report", |o| {
                o.str("guest", guest.name())
                    .u64("runnable", report.runnable_threads.into())
                    .u64("busy_permille_mean", mean.into())
                    .u64("cores_reported", cores.len().into())
                    .i64("requested_delta", report.requested_core_delta.into());
            });
        }
    });
    let events = control.drain_events(|event| crate::moves::guest_event(guest.id, event));
    if let Err(e) = drained.and(events) {
        log::warn!("guest '{}' control channel: {e}", guest.name());
    }
}
