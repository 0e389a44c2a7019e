//! The stats page behind `vmctl stats` (ABI.md, "Stats page"): VM exits per guest, core and
//! reason with the TSC cycles spent handling them, core-move counts and per-stage medians,
//! published in the second half of each control region's data window.
//!
//! Who writes what: each core writes only its own exit accounts (`CpuPublic::exit_times`, on
//! its exit path); the BSP alone keeps the reset baseline and the stage samples and writes the
//! page. A holder asks with `STATS` (refresh, or reset then refresh): the call only bumps a
//! request number and wakes the BSP, which serves it at its next look and shows the number it
//! served in the page, so a reset is never a write by the reader.

use core::sync::atomic::{AtomicU64, Ordering};

use heapless::String;
use spin::Mutex;
use vmcall_proto::marker::{write_object, JsonObject};

use crate::arch::percpu::CPUS;
use crate::guest;
use crate::platform::MAX_CPUS;
use crate::stats::{ExitBaseline, StageSamples};
use crate::vmx::exit::{reason_name, ExitTimesSnapshot, COUNTED_REASONS};
use crate::{moves, time};

/// Requests made (`STATS`), and the latest of them that asked for a reset.
static REQUESTED: AtomicU64 = AtomicU64::new(0);
static RESET_AT: AtomicU64 = AtomicU64::new(0);

/// The page's size bound: 4 cores with both guests' reasons take about 5 KiB.
const PAGE_BYTES: usize = 16 * 1024;

struct Publisher {
    /// The last request served.
    served: u64,
    /// The last reset served (a request number) and how many resets were made.
    reset_served: u64,
    resets: u64,
    /// When the figures start: boot, or the last reset (µs since boot).
    since_us: u64,
    exits: ExitBaseline,
    moves: [u64; moves::COUNT_NAMES.len()],
    stages: StageSamples,
    page: String<PAGE_BYTES>,
}

/// The BSP's state (only the BSP locks it).
static PUBLISHER: Mutex<Publisher> = Mutex::new(Publisher {
    served: 0,
    reset_served: 0,
    resets: 0,
    since_us: 0,
    exits: ExitBaseline::new(),
    moves: [0; moves::COUNT_NAMES.len()],
    stages: StageSamples::new(),
    page: String::new(),
});

/// `STATS` from a guest: asks the BSP for a fresh page (after a reset when `reset`); the
/// request's number, which the page's `request` reaches once served.
pub fn request(reset: bool) -> u64 {
    let number = REQUESTED.fetch_add(1, Ordering::AcqRel) + 1;
    if reset {
        RESET_AT.fetch_max(number, Ordering::AcqRel);
    }
    crate::monitor::wake();
    number
}

/// A finished move's stage times (on the BSP, from `moves`): kept when it completed.
pub fn record_move(
    from: Option<u8>,
    to: Option<u8>,
    done: bool,
    stages: &[(&'static str, u64)],
    total: u64,
) {
    if !done {
        return;
    }
    let mut publisher = PUBLISHER.lock();
    for &(stage, us) in stages {
        publisher.stages.record(from, to, stage, us);
    }
    publisher.stages.record(from, to, "total", total);
}

/// On the BSP: serves the requests made since the last look, if any.
pub fn poll() {
    let requested = REQUESTED.load(Ordering::Acquire);
    let mut publisher = PUBLISHER.lock();
    if requested == publisher.served {
        return;
    }
    let reset_at = RESET_AT.load(Ordering::Acquire);
    if reset_at > publisher.reset_served {
        reset(&mut publisher);
        publisher.reset_served = reset_at;
    }
    publisher.served = requested;
    let Publisher {
        page,
        exits,
        moves: move_base,
        stages,
        served,
        resets,
        since_us,
        ..
    } = &mut *publisher;
    page.clear();
    let written = write_object(page, |o| {
        o.u64("published_us", time::now_us())
            .u64("tsc_hz", time::tsc_hz())
            .u64("request", *served)
            .u64("reset_generation", *resets)
            .u64("since_us", *since_us);
        guest_fields(o, exits);
        move_fields(o, move_base, stages);
    });
    if written.is_err() {
        log::warn!("stats page larger than {PAGE_BYTES} bytes; not published");
        return;
    }
    for guest in guest::all() {
        if let Some(control) = &guest.control {
            control.publish_stats(page.as_bytes());
        }
    }
}

fn reset(publisher: &mut Publisher) {
    for (core, cpu) in CPUS.iter().enumerate() {
        for guest in guest::all() {
            publisher
                .exits
                .set(core, guest.id, cpu.exit_times.snapshot(guest.id));
        }
    }
    publisher.moves = moves::counts();
    publisher.stages.clear();
    publisher.resets += 1;
    publisher.since_us = time::now_us();
}

/// `[{reason, count, cycles}]` for the reasons with exits.
fn exit_list<W: core::fmt::Write>(
    o: &mut JsonObject<'_, W>,
    key: &str,
    accounts: &ExitTimesSnapshot,
) {
    o.array(key, |a| {
        for (slot, &(count, cycles)) in accounts.iter().enumerate() {
            if count > 0 {
                a.object(|e| {
                    e.str("reason", reason_name(slot))
                        .u64("count", count)
                        .u64("cycles", cycles);
                });
            }
        }
    });
}

/// Per guest, exits summed over the cores; per core, each guest's exits there.
fn guest_fields<W: core::fmt::Write>(o: &mut JsonObject<'_, W>, base: &ExitBaseline) {
    let since =
        |core: usize, guest: u8| base.since(core, guest, CPUS[core].exit_times.snapshot(guest));
    o.array("guests", |a| {
        for g in guest::all() {
            let mut sum: ExitTimesSnapshot = [(0, 0); COUNTED_REASONS];
            for core in 0..MAX_CPUS {
                for (total, (count, cycles)) in sum.iter_mut().zip(since(core, g.id)) {
                    total.0 += count;
                    total.1 = total.1.wrapping_add(cycles);
                }
            }
            a.object(|j| {
                j.u64("id", g.id.into()).str("name", g.name());
                exit_list(j, "exits", &sum);
            });
        }
    });
    o.array("cores", |a| {
        for core in 0..MAX_CPUS {
            let seen: heapless::Vec<
                (&guest::Guest, ExitTimesSnapshot),
                { crate::partition::MAX_GUESTS },
            > = guest::all()
                .iter()
                .map(|g| (g, since(core, g.id)))
                .filter(|(_, accounts)| accounts.iter().any(|&(count, _)| count > 0))
                .collect();
            if seen.is_empty() {
                continue;
            }
            a.object(|c| {
                c.u64("core", core as u64);
                c.array("guests", |gs| {
                    for (g, accounts) in &seen {
                        gs.object(|j| {
                            j.str("name", g.name());
                            exit_list(j, "exits", accounts);
                        });
                    }
                });
            });
        }
    });
}

fn move_fields<W: core::fmt::Write>(
    o: &mut JsonObject<'_, W>,
    base: &[u64; moves::COUNT_NAMES.len()],
    stages: &StageSamples,
) {
    let now = moves::counts();
    o.object("moves", |m| {
        for ((name, now), base) in moves::COUNT_NAMES.iter().zip(now).zip(base) {
            m.u64(name, now.saturating_sub(*base));
        }
    });
    let name = |id: Option<u8>| id.and_then(guest::by_id).map_or("hypervisor", |g| g.name());
    o.array("stages", |a| {
        for e in stages.entries() {
            a.object(|s| {
                s.str("from", name(e.from))
                    .str("to", name(e.to))
                    .str("stage", e.stage)
                    .u64("count", e.count)
                    .u64("median_us", e.median());
            });
        }
    });
}
