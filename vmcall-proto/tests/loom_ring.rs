//! Model checking of the shared-memory ring with loom: every interleaving (up to the preemption
//! bound) of a producer and a consumer on a 2-slot ring.
//!
//! Run from the workspace root:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmcall-proto --release --test loom_ring`
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use vmcall_proto::region::{RingLayout, RingSpec, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, Record64, SleepCheck, SlotFormat, RING_CONTROL_SIZE};

/// Two 16-byte slots: the smallest ring, so the producer wraps and meets a full ring.
const SPEC: RingSpec = RingSpec {
    slot_count: 2,
    slot_size: 16,
    format: SlotFormat::Framed,
};

/// Three messages whose lengths and contents differ, so a torn or stale slot is noticed.
const MESSAGES: [&[u8]; 3] = [
    b"\x01\x02\x03\x04\x05\x06\x07\x08",
    b"abc",
    b"\xa0\xa1\xa2\xa3\xa4",
];

fn ring_memory() -> Arc<Vec<AtomicU64>> {
    let words = (RING_CONTROL_SIZE + (SPEC.slot_count * SPEC.slot_size) as usize) / 8;
    Arc::new((0..words).map(|_| AtomicU64::new(0)).collect())
}

fn layout(region: &SharedRegion<'_>) -> RingLayout {
    RingLayout::new(region, 0, SPEC).expect("ring fits")
}

/// Exhaustive exploration (no preemption bound unless `LOOM_MAX_PREEMPTIONS` sets one); prints
/// how many interleavings were executed (`--nocapture` shows it).
/// Pushes `messages` in order: the first by single push, the rest by batches, yielding while
/// the ring is full.
fn send_in_order(producer: &mut Producer<'_>, messages: &[&[u8]]) {
    while producer.try_push(messages[0]).is_err() {
        thread::yield_now();
    }
    let mut rest = &messages[1..];
    while !rest.is_empty() {
        let pushed = producer.push_batch(rest).unwrap();
        rest = &rest[pushed..];
        if !rest.is_empty() {
            thread::yield_now();
        }
    }
}

/// Checks the ring holds nothing more: no message arrived twice.
fn assert_no_more(consumer: &mut Consumer<'_>, scratch: &mut [u8]) {
    assert_eq!(
        consumer.try_pop(scratch).unwrap(),
        None,
        "no duplicate message"
    );
}

/// Pops `messages` and checks each arrives once, in order, whole: the first by single pop,
/// the others by batch pop, so both paths are checked.
fn receive_in_order(consumer: &mut Consumer<'_>, scratch: &mut [u8], messages: &[&[u8]]) {
    let mut received = 0;
    while received == 0 {
        match consumer.try_pop(scratch).unwrap() {
            Some(len) => {
                assert_eq!(&scratch[..len], messages[0]);
                received = 1;
            }
            None => thread::yield_now(),
        }
    }
    while received < messages.len() {
        let got = consumer
            .pop_batch(scratch, 2, |payload| {
                assert_eq!(payload, messages[received]);
                received += 1;
            })
            .unwrap();
        if got == 0 {
            thread::yield_now();
        }
    }
}

fn model(name: &str, test: impl Fn() + Sync + Send + 'static) {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    loom::model::Builder::new().check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        test();
    });
    let executions = executions.load(std::sync::atomic::Ordering::Relaxed);
    println!("{name}: {executions} interleavings explored");
}

#[test]
fn single_and_batched_messages_arrive_once_in_order_untorn() {
    model("single and batched messages", || {
        let memory = ring_memory();
        let producer_memory = memory.clone();
        let producer = thread::spawn(move || {
            let region = SharedRegion::new(&producer_memory);
            let mut producer = Producer::attach(&region, &layout(&region)).unwrap();
            send_in_order(&mut producer, &MESSAGES);
        });

        let region = SharedRegion::new(&memory);
        let mut consumer = Consumer::attach(&region, &layout(&region)).unwrap();
        let mut scratch = [0u8; 8];
        receive_in_order(&mut consumer, &mut scratch, &MESSAGES);
        assert_no_more(&mut consumer, &mut scratch);
        producer.join().unwrap();
        assert_no_more(&mut consumer, &mut scratch);
    });
}

/// The doorbell rule: a consumer that finds the ring empty and decides to sleep is always woken
/// by a later publish. The producer publishes twice (checking the flag after each); the consumer
/// drains, then makes one sleep decision, and "sleeping" means nothing but the doorbell would
/// wake it. One sleep decision per execution is deliberate: loom 0.7 mis-models `SeqCst` fences
/// once the same thread has executed an earlier one (a two-round version of this store-buffering
/// litmus fails in loom although C11 forbids the outcome), and the rule is per sleep decision.
#[test]
fn doorbell_rule_loses_no_wake_up() {
    model("doorbell rule", || {
        let memory = ring_memory();
        // A latched doorbell: set by a ring, consumed by the wait (a pending interrupt before
        // `sti; hlt` behaves the same).
        let doorbell = Arc::new(AtomicBool::new(false));
        let producer_memory = memory.clone();
        let producer_doorbell = doorbell.clone();
        let producer = thread::spawn(move || {
            let region = SharedRegion::new(&producer_memory);
            let mut producer = Producer::attach(&region, &layout(&region)).unwrap();
            for message in &MESSAGES[..2] {
                producer.try_push(message).unwrap();
                if producer.wake_needed() {
                    producer_doorbell.store(true, Ordering::Release);
                }
            }
        });

        let region = SharedRegion::new(&memory);
        let mut consumer = Consumer::attach(&region, &layout(&region)).unwrap();
        let mut scratch = [0u8; 8];
        let mut received = 0;
        while let Some(len) = consumer.try_pop(&mut scratch).unwrap() {
            assert_eq!(&scratch[..len], MESSAGES[received]);
            received += 1;
        }
        if consumer.prepare_to_sleep().unwrap() == SleepCheck::MaySleep {
            // Asleep: nothing but the doorbell would wake us. Let the producer finish; if it
            // published after we looked, it must have rung.
            producer.join().unwrap();
            let published = consumer.available().unwrap() > 0;
            assert!(
                !published || doorbell.load(Ordering::Acquire),
                "lost wake-up"
            );
            return;
        }
        producer.join().unwrap();
        while let Some(len) = consumer.try_pop(&mut scratch).unwrap() {
            assert_eq!(&scratch[..len], MESSAGES[received]);
            received += 1;
        }
        assert_eq!(received, 2);
    });
}

/// The one-cache-line fast path (64-byte slots: fixed-size slot access, the bulk copy of full
/// payloads, batches located as slot runs): a full 56-byte message by single push, then full and
/// short ones by batch, through a 2-slot ring so the batches meet a full ring and wrap.
#[test]
fn line_slots_deliver_full_and_short_messages_in_order() {
    const LINE: RingSpec = RingSpec {
        slot_count: 2,
        slot_size: 64,
        format: SlotFormat::Framed,
    };
    const FULL_A: [u8; 56] = [0xa5; 56];
    const FULL_B: [u8; 56] = [0x5a; 56];
    // Four messages through two slots: the batch pop reads slot 1 while the producer may be
    // waiting to reuse it for the fourth, so a slot freed before it is read is noticed.
    const LINE_MESSAGES: [&[u8]; 4] = [&FULL_A, &FULL_B, b"short", &FULL_A];
    model("line slots", || {
        let words = (RING_CONTROL_SIZE + (LINE.slot_count * LINE.slot_size) as usize) / 8;
        let memory: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
        let producer_memory = memory.clone();
        let producer = thread::spawn(move || {
            let region = SharedRegion::new(&producer_memory);
            let layout = RingLayout::new(&region, 0, LINE).unwrap();
            let mut producer = Producer::attach(&region, &layout).unwrap();
            send_in_order(&mut producer, &LINE_MESSAGES);
        });
        let region = SharedRegion::new(&memory);
        let layout = RingLayout::new(&region, 0, LINE).unwrap();
        let mut consumer = Consumer::attach(&region, &layout).unwrap();
        let mut scratch = [0u8; 56];
        receive_in_order(&mut consumer, &mut scratch, &LINE_MESSAGES);
        producer.join().unwrap();
        assert_no_more(&mut consumer, &mut scratch);
    });
}

/// The typed record calls on a record ring of 64-byte slots (the word-atomic path: loom has no
/// 16-byte moves): a record by single push, then records by batch, through a 2-slot ring so the
/// batches meet a full ring and wrap; the consumer pops one, then batches. Every record arrives
/// once, in order, whole.
#[test]
fn records_arrive_once_in_order_untorn() {
    const RECORDS: RingSpec = RingSpec {
        slot_count: 2,
        slot_size: 64,
        format: SlotFormat::Record,
    };
    const SENT: [Record64; 4] = [
        Record64([0xa5; 64]),
        Record64([0x5a; 64]),
        Record64([0x01; 64]),
        Record64([0xa5; 64]),
    ];
    model("records", || {
        let words = (RING_CONTROL_SIZE + (RECORDS.slot_count * RECORDS.slot_size) as usize) / 8;
        let memory: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
        let producer_memory = memory.clone();
        let producer = thread::spawn(move || {
            let region = SharedRegion::new(&producer_memory);
            let layout = RingLayout::new(&region, 0, RECORDS).unwrap();
            let mut producer = Producer::attach(&region, &layout).unwrap();
            while producer.try_push_record(&SENT[0]).is_err() {
                thread::yield_now();
            }
            let mut rest: &[Record64] = &SENT[1..];
            while !rest.is_empty() {
                let pushed = producer.push_records(rest).unwrap();
                rest = &rest[pushed..];
                if !rest.is_empty() {
                    thread::yield_now();
                }
            }
        });
        let region = SharedRegion::new(&memory);
        let layout = RingLayout::new(&region, 0, RECORDS).unwrap();
        let mut consumer = Consumer::attach(&region, &layout).unwrap();
        let mut out = [Record64::ZERO; 2];
        while !consumer.try_pop_record(&mut out[0]).unwrap() {
            thread::yield_now();
        }
        assert_eq!(out[0], SENT[0]);
        let mut received = 1;
        while received < SENT.len() {
            let got = consumer.pop_records(&mut out).unwrap();
            for record in &out[..got] {
                assert_eq!(*record, SENT[received]);
                received += 1;
            }
            if got == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert!(
            !consumer.try_pop_record(&mut out[0]).unwrap(),
            "no duplicate record"
        );
    });
}
