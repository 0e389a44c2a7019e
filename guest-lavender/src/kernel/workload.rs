//! The workloads the command line can start at boot. `workload=primes`: the parallel primes
//! worker, as kernel threads. A coordinator thread starts `threads` workers per round, each
//! counting the primes in its share of `0..limit`, waits for all of them on a latch, checks the
//! total against an independent sieve and reports; the workers migrate and are stolen freely
//! while cores come and go. At the end it reports every worker created, finished, lost or run
//! twice.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_lavender::cmdline::{PrimesPlan, MAX_WORKER_THREADS};
use guest_lavender::primes;
use log::{error, info};

use crate::kernel::arch::heap;
use crate::kernel::sched::{self, Latch};
use crate::kernel::{console, time};

const MAX_WORKERS: usize = MAX_WORKER_THREADS as usize;

static COUNTS: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
/// Set by each worker when it finishes; a worker that finds its flag set ran twice.
static FINISHED: [AtomicBool; MAX_WORKERS] = [const { AtomicBool::new(false) }; MAX_WORKERS];
static DUPLICATED: AtomicU64 = AtomicU64::new(0);
static DONE: Latch = Latch::new();

/// Starts the primes coordinator thread.
pub fn start_primes(plan: PrimesPlan) {
    if sched::spawn(move || coordinate(plan)).is_none() {
        error!("workload: no thread for the primes coordinator");
    }
}

fn coordinate(plan: PrimesPlan) {
    let threads = (plan.threads as usize).min(MAX_WORKERS);
    let expected = primes::sieve_count(plan.limit);
    let (mut created, mut finished) = (0u64, 0u64);
    for round in 0..plan.rounds {
        let started = time::now();
        DONE.reset(threads);
        for (index, (count, flag)) in COUNTS.iter().zip(&FINISHED).take(threads).enumerate() {
            count.store(0, Ordering::Relaxed);
            flag.store(false, Ordering::Relaxed);
            let share = primes::share(plan.limit, threads as u64, index as u64);
            let spawned = sched::spawn(move || {
                count.store(primes::count_primes(share), Ordering::Relaxed);
                if flag.swap(true, Ordering::AcqRel) {
                    DUPLICATED.fetch_add(1, Ordering::Relaxed);
                }
                DONE.count_down();
            });
            match spawned {
                Some(_) => created += 1,
                None => {
                    error!("workload: thread table full, worker {index} not started");
                    DONE.count_down();
                }
            }
        }
        DONE.wait();
        let total: u64 = COUNTS[..threads]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        finished += FINISHED[..threads]
            .iter()
            .filter(|flag| flag.load(Ordering::Acquire))
            .count() as u64;
        let ok = expected == Some(total);
        let elapsed_us = time::ticks_to_us(time::now().wrapping_sub(started));
        info!(
            "workload: round {round}: {threads} threads counted {total} primes below {} in {elapsed_us} us ({})",
            plan.limit,
            if ok { "ok" } else { "WRONG" }
        );
        console::marker("worker_done", |o| {
            o.u64("threads", threads as u64)
                .u64("primes", total)
                .u64("expected", expected.unwrap_or(0))
                .bool("ok", ok)
                .u64("round", u64::from(round))
                .u64("elapsed_us", elapsed_us);
        });
    }
    let counters = sched::counters();
    console::marker("lavender_threads", |o| {
        o.u64("created", created)
            .u64("finished", finished)
            .u64("lost", created - finished.min(created))
            .u64("duplicated", DUPLICATED.load(Ordering::Relaxed))
            .u64("migrated", counters.migrated)
            .u64("stolen", counters.stolen)
            .u64("kernel_threads_created", counters.created)
            .u64("kernel_threads_exited", counters.exited)
            .u64("heap_used", heap::used() as u64);
    });
}
