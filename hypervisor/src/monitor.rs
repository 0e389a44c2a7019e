//! The monitor: the hypervisor's own work once the guests run, done in passes. A pass reads
//! the guests' control channels, advances the core move in flight (`moves`), lets the policy
//! engine switch, sample and decide, watches the guests' watchdogs and reports guests that
//! stopped, prints the exit counters when asked, and hands the console's queue to the UART
//! a FIFO's worth at a time (never waiting on the line). Nothing in a pass waits, and passes
//! run one at a time (whoever finds the monitor busy goes on).
//!
//! Where passes run depends on whether the hypervisor has a core of its own:
//!
//! * **Without one** (some guest may hold core 0, as in the default configuration), every
//!   core does the work on its way back into its guest when a pass is due: an event asked
//!   for one (a hypercall, a queued console line, a vCPU that ended) or the monitor's next
//!   deadline passed. Each vCPU's VMX-preemption timer is bounded by that deadline, so a pass
//!   comes even while every guest halts. A parked core runs passes while a move is in flight
//!   or console output waits, so the last guest going down still has its report printed.
//! * **With one** (no guest may hold core 0), core 0 runs the passes in its own loop, woken
//!   by those events (an IPI) and its deadlines (the APIC timer), and also the seeded
//!   core-move test (`core_test=`). While a move is in flight it does not sleep.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use spin::Mutex;

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

/// While a move is in flight, a pass comes at least this often (µs). The steps that make a
/// move fast need no pass: the core that parks grants itself to the target
/// (`moves::core_parked`), and Linux's agent asks for a pass with each answer (`Online`,
/// `Released`); this bounds how late an answer nobody asked a pass for (a decline) is seen.
/// Without a monitor core passes run on the guests' cores, Linux's among them while its
/// hotplug does the move's work (a pass costs some 100 µs of a core under Bochs).
const MOVE_STEP_US: u64 = 1000;
/// The shortest VMX-preemption timer a vCPU gets for the monitor's sake (µs): when another
/// core is running the pass that is due, this one goes back to its guest for at least this
/// long instead of exiting again at once.
const MIN_TIMER_US: u64 = 100;

/// What the passes keep between them.
struct Monitor {
    /// Guests whose end was reported.
    reported: [bool; MAX_GUESTS],
    stats_every: Option<u64>,
    next_stats: Option<u64>,
    watch_every: Option<u64>,
    next_watch: Option<u64>,
    passes: u64,
    pass_ticks: u64,
}

static MONITOR: Mutex<Option<Monitor>> = Mutex::new(None);
/// Core 0 is the hypervisor's own and runs every pass.
static OWN_CORE: AtomicBool = AtomicBool::new(true);
/// An event asked for a pass.
static WANTED: AtomicBool = AtomicBool::new(false);
/// The TSC by which the next pass is due.
static NEXT_PASS: AtomicU64 = AtomicU64::new(0);
/// The VMX-preemption timer's rate: it counts down every 2^rate TSC ticks.
static TIMER_RATE: AtomicU8 = AtomicU8::new(0);
/// Copies of the passes' count and time, read without taking the monitor.
static PASSES: AtomicU64 = AtomicU64::new(0);
static PASS_TICKS: AtomicU64 = AtomicU64::new(0);

/// At boot, before the guests start: with `own_core`, core 0 will run the passes
/// ([`run_on_own_core`]); without, the guests' cores do. With `stats_ms`, every guest's exit
/// counters are also printed that often.
pub fn init(stats_ms: Option<u32>, own_core: bool, preemption_timer_rate: u8) {
    let stats_every = stats_ms.map(|ms| time::ticks_for_us(u64::from(ms) * 1000));
    // The guests' watchdogs are looked at this often (`faults::poll` runs on every pass; the
    // deadline only makes sure a pass comes).
    let watch_every =
        crate::faults::check_period_ms().map(|ms| time::ticks_for_us(u64::from(ms) * 1000));
    let now = cpu::read_tsc();
    *MONITOR.lock() = Some(Monitor {
        reported: [false; MAX_GUESTS],
        stats_every,
        next_stats: stats_every.map(|every| now + every),
        watch_every,
        next_watch: watch_every.map(|every| now + every),
        passes: 0,
        pass_ticks: 0,
    });
    TIMER_RATE.store(preemption_timer_rate, Ordering::Relaxed);
    OWN_CORE.store(own_core, Ordering::Release);
}

/// Whether core 0 is the hypervisor's own (it runs every pass).
pub fn has_own_core() -> bool {
    OWN_CORE.load(Ordering::Acquire)
}

/// Asks for a pass soon: core 0 is woken when it is the monitor's; otherwise the next core
/// that goes back into its guest runs it (see [`run_if_due`]).
pub fn wake() {
    WANTED.store(true, Ordering::Release);
    if has_own_core() {
        LocalApic::X2Apic.send_fixed(CPUS[0].apic_id(), descriptors::WAKE_VECTOR);
    }
}

/// On a guest's core without a monitor core, before each VM entry: runs a pass if one is
/// due and nobody else is running one; the VMX-preemption timer value that brings this vCPU
/// back by the next pass at the latest (at most `wanted`, what the policy engine asks for).
pub fn run_if_due(core: usize, wanted: u32) -> u32 {
    let now = cpu::read_tsc();
    if (WANTED.load(Ordering::Acquire) || now >= NEXT_PASS.load(Ordering::Acquire)) && try_pass() {
        crate::core_idle::IDLE[core].hypervisor_work(cpu::read_tsc().saturating_sub(now));
    }
    let left = NEXT_PASS
        .load(Ordering::Acquire)
        .saturating_sub(cpu::read_tsc())
        .max(time::ticks_for_us(MIN_TIMER_US));
    let ticks = (left >> TIMER_RATE.load(Ordering::Relaxed)).max(1);
    u32::try_from(ticks).unwrap_or(u32::MAX).min(wanted)
}

/// On a parked core without a monitor core: runs the passes due while work waits that no
/// guest's exit may come for soon (a move in flight, console output, an event), until it is
/// done or `stop` says the core has something else to do.
pub fn serve_while_busy(stop: impl Fn() -> bool) {
    loop {
        let busy =
            WANTED.load(Ordering::Acquire) || crate::moves::in_flight() || console::has_queued();
        if !busy || stop() {
            return;
        }
        if cpu::read_tsc() >= NEXT_PASS.load(Ordering::Acquire) || WANTED.load(Ordering::Acquire) {
            try_pass();
        }
        for _ in 0..100 {
            core::hint::spin_loop();
        }
    }
}

/// Runs one pass unless another core is running one; whether it ran.
fn try_pass() -> bool {
    let Some(mut guard) = MONITOR.try_lock() else {
        return false;
    };
    let Some(monitor) = guard.as_mut() else {
        return false;
    };
    WANTED.store(false, Ordering::Release);
    let start = cpu::read_tsc();
    let next = pass(monitor);
    NEXT_PASS.store(next.unwrap_or(u64::MAX), Ordering::Release);
    monitor.passes += 1;
    monitor.pass_ticks += cpu::read_tsc().saturating_sub(start);
    PASSES.store(monitor.passes, Ordering::Relaxed);
    PASS_TICKS.store(monitor.pass_ticks, Ordering::Relaxed);
    true
}

/// Passes run since boot and their time (TSC ticks), for the status page.
pub fn work() -> (u64, u64) {
    (
        PASSES.load(Ordering::Relaxed),
        PASS_TICKS.load(Ordering::Relaxed),
    )
}

/// One pass; the TSC by which the next one is due, if any is.
fn pass(m: &mut Monitor) -> Option<u64> {
    let now = cpu::read_tsc();
    if let (Some(every), Some(due)) = (m.stats_every, m.next_stats) {
        if now >= due {
            for guest in guest::all()
                .iter()
                .filter(|g| g.state() == GuestState::Running)
            {
                report(guest, GuestState::Running);
            }
            m.next_stats = Some(due.max(now.saturating_sub(every)) + every);
        }
    }
    for guest in guest::all() {
        poll_control(guest);
    }
    crate::faults::poll();
    if let (Some(every), Some(due)) = (m.watch_every, m.next_watch) {
        if now >= due {
            m.next_watch = Some(now + every);
        }
    }
    for guest in guest::all() {
        let id = usize::from(guest.id);
        let state = guest.state();
        if state == GuestState::Running || m.reported[id] {
            continue;
        }
        m.reported[id] = true;
        report(guest, state);
    }
    // A move that ends here is noted by the policy engine that started it, and the status
    // page shows both together; a move the engine starts takes its first step at once.
    crate::moves::advance();
    policy_engine::tick();
    crate::moves::advance();
    crate::moves::publish_if_due();
    crate::stats_page::poll();
    let now = cpu::read_tsc();
    // The console's queue goes out a FIFO's worth at a time: while bytes wait, a pass comes
    // back once the FIFO can have been sent.
    let console_due =
        console::drain_without_waiting().then(|| now + time::ticks_for_us(console::FIFO_DRAIN_US));
    let move_due = crate::moves::in_flight().then(|| now + time::ticks_for_us(MOVE_STEP_US));
    [
        m.next_stats,
        m.next_watch,
        policy_engine::next_deadline(),
        console_due,
        move_due,
    ]
    .into_iter()
    .flatten()
    .min()
}

/// Core 0's life when it is the hypervisor's own: passes until the end, and the core-move
/// test (`core_test`) first.
pub fn run_on_own_core(core_test: Option<CoreTest>) -> ! {
    let mut test = core_test.and_then(core_test::Run::start);
    let apic = LocalApic::X2Apic;
    let ticks_per_ms = time::calibrate_apic_timer(&apic);
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
        try_pass();
        if crate::moves::in_flight() {
            // A move's steps follow each other as fast as the guests answer: the next pass
            // comes after a short spin, at once when asked for (a core parked).
            for _ in 0..1000 {
                if WANTED.load(Ordering::Acquire) {
                    break;
                }
                core::hint::spin_loop();
            }
            continue;
        }
        // The earliest deadline wakes this core; any event wakes it sooner.
        let deadline = [Some(NEXT_PASS.load(Ordering::Acquire)), test_due]
            .into_iter()
            .flatten()
            .filter(|&d| d != u64::MAX)
            .min();
        if let Some(deadline) = deadline {
            let now = cpu::read_tsc();
            if deadline <= now || WANTED.load(Ordering::Acquire) {
                continue;
            }
            let us = (deadline - now) / time::ticks_for_us(1).max(1);
            let ticks = (us.max(1) * u64::from(ticks_per_ms)).div_ceil(1000);
            apic.arm_timer(
                descriptors::WAKE_VECTOR,
                ticks.clamp(1, u64::from(u32::MAX)) as u32,
            );
        }
        if WANTED.load(Ordering::Acquire) {
            continue;
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

/// From a pass: reads what the guest sent on its control channel: load reports (kept in every control
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
            final_offer: report.final_offer,
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
