//! Ring throughput and round-trip latency between two threads, against `rtrb` as the reference
//! SPSC queue. 64-byte messages, one cache line per message on both sides:
//!
//! * ours: a ring of 64-byte slots in the record format ([`SlotFormat::Record`]), each message a
//!   [`Record64`] (64 bytes, 64-aligned) moved by the typed record calls (`try_push_record`,
//!   `try_pop_record`, `push_records`, `pop_records`);
//! * rtrb: a 64-byte, 64-aligned [`Line`] element, pushed by value and popped by value (batches
//!   through `write_chunk_uninit` / `read_chunk`).
//!
//! Both are typed fixed-size elements, and both sides copy every message: each producer copies
//! it from its own private 64 bytes (a batch: from a private array, ours; from a private value
//! repeated, rtrb) into the ring, and each consumer copies it out of the ring into private memory
//! (ours: a private record or array of records; rtrb: the popped value) before looking at it
//! (`black_box`). Neither side is handed the ring's memory to fill or read in place. The
//! `framed_*` cases run our default, framed format on the same ring size instead, through the
//! byte-slice calls: an 8-byte length header and a 56-byte payload per slot (against the same
//! 64-byte rtrb elements), for comparison.
//!
//! `cargo bench -p vmcall-proto --bench ring` runs criterion. With `RING_AB=<trials>` set it
//! instead runs an interleaved A/B comparison: each trial runs every case for ours and for rtrb
//! back to back (alternating which goes first), so background load hits both alike; it reports
//! the median and best ns per message of each, in how many trials ours was at least as fast, and
//! the median of the per-trial ratios ours/rtrb ("pair o/r").
//! `RING_AB_ITERS=<n>` sets the iterations per run (default 4), `RING_AB_CASE=<case>` runs one
//! case only.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use vmcall_proto::region::{CacheLine, RingLayout, RingSpec, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, PushError, Record64, SlotFormat, RING_CONTROL_SIZE};

const SLOTS: u32 = 1024;
const SLOT_SIZE: u32 = 64;
const BATCH: usize = 32;
/// A full framed payload: the slot less its header word.
const FRAMED_PAYLOAD: usize = SLOT_SIZE as usize - 8;
/// Messages per measured iteration: enough that starting the producer thread is noise.
const MESSAGES_PER_ITERATION: u64 = 1 << 16;
/// Round trips per measured iteration.
const ROUND_TRIPS_PER_ITERATION: u64 = 1 << 12;

/// Waiting for the other thread: spin briefly, then give the core away. The machine has two
/// cores and other work; a thread spinning through its whole time slice while its peer waits
/// for a core would measure the scheduler, not the queue. Used identically for both queues.
struct Backoff(u32);

impl Backoff {
    fn new() -> Self {
        Self(0)
    }

    fn wait(&mut self) {
        self.0 += 1;
        if self.0 % 128 == 0 {
            thread::yield_now();
        } else {
            spin_loop();
        }
    }
}

/// rtrb's element, and our private message buffers: 64 bytes, aligned like our slots. A bare
/// `[u8; 64]` has alignment 1, so rtrb's buffer starts wherever the allocator puts it (32 bytes
/// into a cache line, measured on the development machine) and every message straddles two
/// lines, handicapping rtrb.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

fn ring_memory() -> Vec<CacheLine> {
    let bytes = RING_CONTROL_SIZE + (SLOTS * SLOT_SIZE) as usize;
    (0..bytes / 64).map(|_| CacheLine::default()).collect()
}

fn our_ring(lines: &[CacheLine], format: SlotFormat) -> (Producer<'_>, Consumer<'_>) {
    let region = SharedRegion::from_cache_lines(lines);
    let layout = RingLayout::new(
        &region,
        0,
        RingSpec {
            slot_count: SLOTS,
            slot_size: SLOT_SIZE,
            format,
        },
    )
    .unwrap();
    (
        Producer::attach(&region, &layout).unwrap(),
        Consumer::attach(&region, &layout).unwrap(),
    )
}

fn ours_single(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let lines = ring_memory();
    let (mut producer, mut consumer) = our_ring(&lines, SlotFormat::Record);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            // The producer's own copy, as rtrb's producer has: not a line of the consumer
            // thread's stack.
            let message = Record64([7u8; 64]);
            let mut backoff = Backoff::new();
            for _ in 0..count {
                while let Err(PushError::Full) = producer.try_push_record(black_box(&message)) {
                    backoff.wait();
                }
            }
        });
        let mut out = Record64::ZERO;
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            if consumer.try_pop_record(&mut out).unwrap() {
                black_box(&out);
                received += 1;
            } else {
                backoff.wait();
            }
        }
        start.elapsed()
    })
}

fn framed_single(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let lines = ring_memory();
    let (mut producer, mut consumer) = our_ring(&lines, SlotFormat::Framed);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            let message = Line([7u8; 64]);
            let message = &message.0[..FRAMED_PAYLOAD];
            let mut backoff = Backoff::new();
            for _ in 0..count {
                while let Err(PushError::Full) = producer.try_push(black_box(message)) {
                    backoff.wait();
                }
            }
        });
        let mut out = Line([0u8; 64]);
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.try_pop(&mut out.0).unwrap() {
                Some(len) => {
                    black_box(&out.0[..len]);
                    received += 1;
                }
                None => backoff.wait(),
            }
        }
        start.elapsed()
    })
}

fn ours_batch(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let lines = ring_memory();
    let (mut producer, mut consumer) = our_ring(&lines, SlotFormat::Record);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            // The producer's own copies, as rtrb's producer has.
            let batch = [Record64([7u8; 64]); BATCH];
            let mut backoff = Backoff::new();
            let mut sent = 0;
            while sent < count {
                let want = (count - sent).min(BATCH as u64) as usize;
                match producer.push_records(black_box(&batch[..want])).unwrap() {
                    0 => backoff.wait(),
                    pushed => sent += pushed as u64,
                }
            }
        });
        let mut out = [Record64::ZERO; BATCH];
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.pop_records(&mut out).unwrap() {
                0 => backoff.wait(),
                got => {
                    black_box(&out[..got]);
                    received += got as u64;
                }
            }
        }
        start.elapsed()
    })
}

fn framed_batch(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let lines = ring_memory();
    let (mut producer, mut consumer) = our_ring(&lines, SlotFormat::Framed);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            let message = Line([7u8; 64]);
            let batch: [&[u8]; BATCH] = [&message.0[..FRAMED_PAYLOAD]; BATCH];
            let mut backoff = Backoff::new();
            let mut sent = 0;
            while sent < count {
                let want = (count - sent).min(BATCH as u64) as usize;
                match producer.push_batch(black_box(&batch[..want])).unwrap() {
                    0 => backoff.wait(),
                    pushed => sent += pushed as u64,
                }
            }
        });
        let mut scratch = Line([0u8; 64]);
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.pop_batch(&mut scratch.0, BATCH, |payload| {
                black_box(payload);
            }) {
                Ok(0) => backoff.wait(),
                Ok(got) => received += got as u64,
                Err(error) => panic!("{error}"),
            }
        }
        start.elapsed()
    })
}

fn rtrb_single(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let (mut producer, mut consumer) = rtrb::RingBuffer::<Line>::new(SLOTS as usize);
    let message = Line([7u8; 64]);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            for _ in 0..count {
                while producer.push(*black_box(&message)).is_err() {
                    backoff.wait();
                }
            }
        });
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.pop() {
                Ok(message) => {
                    black_box(&message);
                    received += 1;
                }
                Err(_) => backoff.wait(),
            }
        }
        start.elapsed()
    })
}

fn rtrb_batch(iterations: u64) -> Duration {
    let count = iterations * MESSAGES_PER_ITERATION;
    let (mut producer, mut consumer) = rtrb::RingBuffer::<Line>::new(SLOTS as usize);
    let message = Line([7u8; 64]);
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            let mut sent = 0;
            while sent < count {
                let want = (count - sent).min(BATCH as u64) as usize;
                let free = producer.slots().min(want);
                if free == 0 {
                    backoff.wait();
                    continue;
                }
                let chunk = producer.write_chunk_uninit(free).unwrap();
                sent += chunk.fill_from_iter(std::iter::repeat(*black_box(&message))) as u64;
            }
        });
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            let ready = consumer.slots().min(BATCH);
            if ready == 0 {
                backoff.wait();
                continue;
            }
            let chunk = consumer.read_chunk(ready).unwrap();
            for message in chunk.into_iter() {
                black_box(&message);
            }
            received += ready as u64;
        }
        start.elapsed()
    })
}

fn ours_round_trip(iterations: u64) -> Duration {
    let count = iterations * ROUND_TRIPS_PER_ITERATION;
    let ping_lines = ring_memory();
    let pong_lines = ring_memory();
    let (mut ping_tx, mut ping_rx) = our_ring(&ping_lines, SlotFormat::Record);
    let (mut pong_tx, mut pong_rx) = our_ring(&pong_lines, SlotFormat::Record);
    thread::scope(|scope| {
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            let mut record = Record64::ZERO;
            for _ in 0..count {
                while !ping_rx.try_pop_record(&mut record).unwrap() {
                    backoff.wait();
                }
                pong_tx.try_push_record(&record).unwrap();
            }
        });
        let message = Record64([7u8; 64]);
        let mut record = Record64::ZERO;
        let mut backoff = Backoff::new();
        let start = Instant::now();
        for _ in 0..count {
            ping_tx.try_push_record(black_box(&message)).unwrap();
            while !pong_rx.try_pop_record(&mut record).unwrap() {
                backoff.wait();
            }
            black_box(&record);
        }
        start.elapsed()
    })
}

fn rtrb_round_trip(iterations: u64) -> Duration {
    let count = iterations * ROUND_TRIPS_PER_ITERATION;
    let (mut ping_tx, mut ping_rx) = rtrb::RingBuffer::<Line>::new(SLOTS as usize);
    let (mut pong_tx, mut pong_rx) = rtrb::RingBuffer::<Line>::new(SLOTS as usize);
    let message = Line([7u8; 64]);
    thread::scope(|scope| {
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            for _ in 0..count {
                let message = loop {
                    if let Ok(message) = ping_rx.pop() {
                        break message;
                    }
                    backoff.wait();
                };
                pong_tx.push(message).unwrap();
            }
        });
        let mut backoff = Backoff::new();
        let start = Instant::now();
        for _ in 0..count {
            ping_tx.push(*black_box(&message)).unwrap();
            loop {
                if let Ok(message) = pong_rx.pop() {
                    black_box(&message);
                    break;
                }
                backoff.wait();
            }
        }
        start.elapsed()
    })
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("throughput_64B");
    group.throughput(Throughput::Elements(MESSAGES_PER_ITERATION));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("ours/single", |b| b.iter_custom(ours_single));
    group.bench_function("rtrb/single", |b| b.iter_custom(rtrb_single));
    group.bench_function("ours/batch32", |b| b.iter_custom(ours_batch));
    group.bench_function("rtrb/batch32", |b| b.iter_custom(rtrb_batch));
    group.bench_function("ours_framed/single", |b| b.iter_custom(framed_single));
    group.bench_function("ours_framed/batch32", |b| b.iter_custom(framed_batch));
    group.finish();
}

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_trip_64B");
    group.throughput(Throughput::Elements(ROUND_TRIPS_PER_ITERATION));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("ours", |b| b.iter_custom(ours_round_trip));
    group.bench_function("rtrb", |b| b.iter_custom(rtrb_round_trip));
    group.finish();
}

criterion_group!(benches, throughput, latency);

type Case = (&'static str, fn(u64) -> Duration, fn(u64) -> Duration, u64);

/// The interleaved A/B comparison (see the module documentation).
fn interleaved(trials: usize, iterations: u64) {
    let cases: [Case; 5] = [
        ("single", ours_single, rtrb_single, MESSAGES_PER_ITERATION),
        ("batch32", ours_batch, rtrb_batch, MESSAGES_PER_ITERATION),
        (
            "round_trip",
            ours_round_trip,
            rtrb_round_trip,
            ROUND_TRIPS_PER_ITERATION,
        ),
        (
            "framed_single",
            framed_single,
            rtrb_single,
            MESSAGES_PER_ITERATION,
        ),
        (
            "framed_batch32",
            framed_batch,
            rtrb_batch,
            MESSAGES_PER_ITERATION,
        ),
    ];
    let ns_per = |run: fn(u64) -> Duration, per_iteration: u64| {
        run(iterations).as_nanos() as f64 / (iterations * per_iteration) as f64
    };
    // `RING_AB_CASE=<name>` restricts the comparison to one case.
    let only = std::env::var("RING_AB_CASE").ok();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|(name, ..)| only.as_deref().is_none_or(|only| only == *name))
        .collect();
    let mut results = vec![(Vec::new(), Vec::new()); cases.len()];
    // Warm-up: page in both queues' code and memory once.
    for &(_, ours, theirs, per) in &cases {
        ns_per(ours, per);
        ns_per(theirs, per);
    }
    for trial in 0..trials {
        for (&(_, ours, theirs, per), (mine, reference)) in cases.iter().zip(&mut results) {
            if trial % 2 == 0 {
                mine.push(ns_per(ours, per));
                reference.push(ns_per(theirs, per));
            } else {
                reference.push(ns_per(theirs, per));
                mine.push(ns_per(ours, per));
            }
        }
    }
    println!(
        "{trials} interleaved trials, {iterations} iterations each; ns per message (round trip: per round trip)"
    );
    println!(
        "{:<14} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "case",
        "ours med",
        "rtrb med",
        "med o/r",
        "ours best",
        "rtrb best",
        "best o/r",
        "ours<=rtrb",
        "pair o/r"
    );
    for (&(name, ..), (mine, reference)) in cases.iter().zip(&results) {
        let wins = mine.iter().zip(reference).filter(|(a, b)| a <= b).count();
        let (om, rm) = (median(mine), median(reference));
        let (ob, rb) = (best(mine), best(reference));
        // Each trial's two runs are back to back, so their ratio is the least disturbed by
        // load that comes and goes (and by where the host places the two vCPUs).
        let ratios: Vec<f64> = mine.iter().zip(reference).map(|(a, b)| a / b).collect();
        println!(
            "{name:<14} {om:>11.2} {rm:>11.2} {:>9.3} {ob:>9.2} {rb:>9.2} {:>9.3} {:>6}/{trials} {:>9.3}",
            om / rm,
            ob / rb,
            wins,
            median(&ratios)
        );
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn best(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() {
    let setting = |name| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
    };
    if let Some(trials) = setting("RING_AB") {
        interleaved(trials, setting("RING_AB_ITERS").unwrap_or(4) as u64);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
