//! Ring throughput and round-trip latency between two threads, against `rtrb` as the reference
//! SPSC queue. 64-byte messages: one 64-byte slot for us (8-byte header + 56-byte payload), a
//! `[u8; 64]` element for rtrb, so both move one cache line per message.
//!
//! `cargo bench -p vmcall-proto --bench ring`

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmcall_proto::region::{CacheLine, RingLayout, RingSpec, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, PushError, RING_CONTROL_SIZE};

const SLOTS: u32 = 1024;
const SLOT_SIZE: u32 = 64;
const BATCH: usize = 32;
const PAYLOAD: usize = SLOT_SIZE as usize - 8;
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

fn ring_memory() -> Vec<CacheLine> {
    let bytes = RING_CONTROL_SIZE + (SLOTS * SLOT_SIZE) as usize;
    (0..bytes / 64).map(|_| CacheLine::default()).collect()
}

fn our_ring(lines: &[CacheLine]) -> (Producer<'_>, Consumer<'_>) {
    let region = SharedRegion::from_cache_lines(lines);
    let layout = RingLayout::new(
        &region,
        0,
        RingSpec {
            slot_count: SLOTS,
            slot_size: SLOT_SIZE,
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
    let (mut producer, mut consumer) = our_ring(&lines);
    let message = [7u8; PAYLOAD];
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            for _ in 0..count {
                while let Err(PushError::Full) = producer.try_push(black_box(&message)) {
                    backoff.wait();
                }
            }
        });
        let mut out = [0u8; PAYLOAD];
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.try_pop(&mut out).unwrap() {
                Some(len) => {
                    black_box(&out[..len]);
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
    let (mut producer, mut consumer) = our_ring(&lines);
    let message = [7u8; PAYLOAD];
    let batch: [&[u8]; BATCH] = [&message; BATCH];
    thread::scope(|scope| {
        let start = Instant::now();
        scope.spawn(move || {
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
        let mut scratch = [0u8; PAYLOAD];
        let mut received = 0;
        let mut backoff = Backoff::new();
        while received < count {
            match consumer.pop_batch(&mut scratch, BATCH, |payload| {
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
    let (mut producer, mut consumer) = rtrb::RingBuffer::<[u8; 64]>::new(SLOTS as usize);
    let message = [7u8; 64];
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
    let (mut producer, mut consumer) = rtrb::RingBuffer::<[u8; 64]>::new(SLOTS as usize);
    let message = [7u8; 64];
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
    let (mut ping_tx, mut ping_rx) = our_ring(&ping_lines);
    let (mut pong_tx, mut pong_rx) = our_ring(&pong_lines);
    thread::scope(|scope| {
        scope.spawn(move || {
            let mut backoff = Backoff::new();
            let mut buffer = [0u8; PAYLOAD];
            for _ in 0..count {
                let len = loop {
                    if let Some(len) = ping_rx.try_pop(&mut buffer).unwrap() {
                        break len;
                    }
                    backoff.wait();
                };
                pong_tx.try_push(&buffer[..len]).unwrap();
            }
        });
        let message = [7u8; PAYLOAD];
        let mut buffer = [0u8; PAYLOAD];
        let mut backoff = Backoff::new();
        let start = Instant::now();
        for _ in 0..count {
            ping_tx.try_push(black_box(&message)).unwrap();
            while pong_rx.try_pop(&mut buffer).unwrap().is_none() {
                backoff.wait();
            }
        }
        start.elapsed()
    })
}

fn rtrb_round_trip(iterations: u64) -> Duration {
    let count = iterations * ROUND_TRIPS_PER_ITERATION;
    let (mut ping_tx, mut ping_rx) = rtrb::RingBuffer::<[u8; 64]>::new(SLOTS as usize);
    let (mut pong_tx, mut pong_rx) = rtrb::RingBuffer::<[u8; 64]>::new(SLOTS as usize);
    let message = [7u8; 64];
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
criterion_main!(benches);
