//! The BSP's event loop once the guests run: one loop, woken by the events it serves (a
//! vCPU reporting that its guest halted or stopped, a load-report kick, a management
//! request, a queued console line) and by its deadlines (the policy engine's next sample,
//! the stats timer, the core-move test's waits, the console's transmit FIFO), on the APIC
//! timer. Each pass steps the core-move test, runs a requested core move, reads the
//! guests' control channels, lets the policy engine switch, sample and decide, and reports
//! guests that stopped, then hands the console's queue to the UART a FIFO's worth at a time
//! (never waiting on the line). While a core-move test move is in flight the loop does not sleep:
//! it reads the channels and the console and steps the test again.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::cpu;
use crate::arch::descriptors;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::cmdline::CoreTest;
use crate::core_test::{self, Step};
use crate::guest::{self, GuestState};
use crate::partition::MAX_GUESTS;
use crate::{console, policy_engine, time};
use vmcall_proto::load_history::LoadRecord;

/// Serves the guests until the end. With `stats_ms`, every guest's exit counters are also
/// printed that often; with `core_test`, the core-move test runs first.
pub fn run(stats_ms: Option<u32>, core_test: Option<CoreTest>) -> ! {
    let mut test = core_test.and_then(core_test::Run::start);
    let apic = LocalApic::X2Apic;
    let ticks_per_ms = time::calibrate_apic_timer(&apic);
    let mut reported = [false; MAX_GUESTS];
    let stats_every = stats_ms.map(|ms| time::ticks_for_us(u64::from(ms) * 1000));
    let mut next_stats = stats_every.map(|every| cpu::read_tsc() + every);
    // The guests' watchdogs are looked at this often (`faults::poll` runs on every pass; the
    // deadline only makes sure a pass comes).
    let watch_every =
        crate::faults::check_period_ms().map(|ms| time::ticks_for_us(u64::from(ms) * 1000));
    let mut next_watch = watch_every.map(|every| cpu::read_tsc() + every);
    loop {
        let mut test_due = None;
        if let Some(run) = test.as_mut() {
            match run.step() {
                Step::Poll => {
                    for guest in guest::all() {
                        poll_control(guest);
                    }
                    console::drain_ready();
                    for _ in 0..1000 {
                        core::hint::spin_loop();
                    }
                    continue;
                }
                Step::At(tsc) => test_due = Some(tsc),
                Step::Done => test = None,
            }
        }
        if let (Some(every), Some(due)) = (stats_every, next_stats) {
            if cpu::read_tsc() >= due {
                for guest in guest::all()
                    .iter()
                    .filter(|g| g.state() == GuestState::Running)
                {
                    report(guest, GuestState::Running);
                }
                next_stats = Some(due + every);
            }
        }
        crate::moves::poll();
        crate::stats_page::poll();
        for guest in guest::all() {
            poll_control(guest);
        }
        crate::faults::poll();
        if let (Some(every), Some(due)) = (watch_every, next_watch) {
            if cpu::read_tsc() >= due {
                next_watch = Some(due + every);
            }
        }
        for guest in guest::all() {
            let id = usize::from(guest.id);
            let state = guest.state();
            if state == GuestState::Running || reported[id] {
                continue;
            }
            reported[id] = true;
            report(guest, state);
        }
        policy_engine::tick();
        // This core drains the console, a FIFO's worth at a time: while bytes wait, it
        // comes back once the FIFO can have been sent, and serves everything else between.
        let console_due = console::drain_without_waiting()
            .then(|| cpu::read_tsc() + time::ticks_for_us(console::FIFO_DRAIN_US));
        // The earliest deadline wakes this core; any event wakes it sooner.
        let deadline = [
            next_stats,
            next_watch,
            policy_engine::next_deadline(),
            test_due,
            console_due,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(deadline) = deadline {
            let now = cpu::read_tsc();
            if deadline <= now {
                continue;
            }
            let us = (deadline - now) / time::ticks_for_us(1).max(1);
            let ticks = (us.max(1) * u64::from(ticks_per_ms)).div_ceil(1000);
            apic.arm_timer(
                descriptors::WAKE_VECTOR,
                ticks.clamp(1, u64::from(u32::MAX)) as u32,
            );
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

/// Each guest's load as last noted (a report that changed it noticeably): (runnable
/// threads, mean busy per-mille), for the status page.
static LAST_LOAD: spin::Mutex<[(u32, u16); MAX_GUESTS]> =
    spin::Mutex::new([(u32::MAX, 0); MAX_GUESTS]);

/// Guest `id`'s load as last noted: (runnable threads, mean busy per-mille).
pub fn last_load(id: u8) -> Option<(u32, u16)> {
    let (runnable, busy) = *LAST_LOAD.lock().get(usize::from(id))?;
    (runnable != u32::MAX).then_some((runnable, busy))
}

/// Reads what the guest sent on its control channel: load reports (kept in every control
/// region's load history; noted for the status page when they change noticeably, and then
/// shown as a `load_report` marker if
/// [`print_load_reports`] is on) and core events (logged).
pub fn poll_control(guest: &guest::Guest) {
    let Some(control) = &guest.control else {
        return;
    };
    let print = PRINT_LOAD_REPORTS.load(Ordering::Relaxed);
    let drained = control.drain_reports(|report| {
        crate::faults::heartbeat(guest.id);
        crate::policy_engine::report(guest.id, &report);
        let cores = report.reported_cores();
        let total: u32 = cores
            .iter()
            .filter_map(|c| report.busy(c))
            .map(|b| u32::from(b.get()))
            .sum();
        let mean = (total / cores.len().max(1)) as u16;
        let record = LoadRecord {
            number: 0,
            at_us: time::now_us(),
            guest: guest.id,
            runnable: report.runnable_threads,
            busy_permille: mean,
            cores_reported: cores.len() as u8,
            requested_delta: report.requested_core_delta,
            hint: report.hint as u8,
        };
        // Every region gets every guest's reports, as every status page shows every guest.
        for each in guest::all() {
            if let Some(channel) = &each.control {
                channel.record_load(&record);
            }
        }
        let mut last = LAST_LOAD.lock();
        let (runnable, busy) = &mut last[usize::from(guest.id)];
        if *runnable != report.runnable_threads || mean.abs_diff(*busy) >= 100 {
            (*runnable, *busy) = (report.runnable_threads, mean);
            if !print {
                return;
            }
            console::marker("load_report", |o| {
                o.str("guest", guest.name())
                    .u64("at_us", record.at_us)
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
