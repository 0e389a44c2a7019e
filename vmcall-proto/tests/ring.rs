//! Ring, region and data-window tests, including hostile shared memory (proptest).
#![cfg(not(loom))]

use proptest::prelude::*;
use vmcall_proto::region::{
    BufferRef, CacheLine, LayoutError, RingLayout, RingSpec, SharedRegion, WindowError,
    REGION_MAGIC,
};
use vmcall_proto::ring::{
    Consumer, PushError, Record64, RingError, SleepCheck, SlotFormat, RING_CONTROL_SIZE,
};
use vmcall_proto::{AbiVersion, ABI_VERSION};

use std::sync::atomic::AtomicU64;

fn memory(bytes: usize) -> Vec<CacheLine> {
    (0..bytes.div_ceil(64))
        .map(|_| CacheLine::default())
        .collect()
}

const SPECS: [RingSpec; 2] = [
    spec(8, 64, SlotFormat::Record),
    spec(4, 128, SlotFormat::Framed),
];

#[test]
fn region_round_trips_its_layout() {
    let lines = memory(8192);
    let region = SharedRegion::from_cache_lines(&lines);
    let written = region.initialize(&SPECS, 0x1234).unwrap();
    let view = region.attach().unwrap();
    assert_eq!(*view.header(), written);
    assert_eq!(view.ring(0).unwrap().slot_count(), 8);
    assert_eq!(view.ring(1).unwrap().slot_size(), 128);
    // The slot format comes from the descriptor, as the creator's spec gave it.
    assert_eq!(view.ring(0).unwrap().slot_format(), SlotFormat::Record);
    assert_eq!(view.ring(1).unwrap().slot_format(), SlotFormat::Framed);
    assert!(matches!(
        view.ring(2),
        Err(LayoutError::NoSuchRing {
            index: 2,
            ring_count: 2
        })
    ));
    assert_eq!(view.data_window().len_bytes(), written.data_window_size);
    assert!(written.data_window_size > 0 && written.data_window_offset % 64 == 0);
}

/// A ring descriptor is two little-endian words: `offset u32 | format u32 << 32`, then
/// `slot_count u32 | slot_size u32 << 32`. A format value other than 0 (framed) or 1 (record),
/// including any higher bit, is refused when the region is attached, naming the value.
#[test]
fn ring_descriptor_records_the_slot_format_and_refuses_unknown_ones() {
    let lines = memory(8192);
    let region = SharedRegion::from_cache_lines(&lines);
    region.initialize(&SPECS, 0).unwrap();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    // The ring table is line 1: ring 0's descriptor in words 0 and 1, ring 1's in 2 and 3.
    let placement = &lines[1].0[0];
    let ring_offset = region.attach().unwrap().ring(0).unwrap().offset() as u64;
    assert_eq!(placement.load(relaxed), ring_offset | 1 << 32, "record");
    assert_eq!(lines[1].0[1].load(relaxed), 8 | 64 << 32);
    assert_eq!(lines[1].0[2].load(relaxed) >> 32, 0, "framed");
    for bad in [2u32, 0x100, 0x8000_0001, u32::MAX] {
        placement.store(ring_offset | u64::from(bad) << 32, relaxed);
        let error = region.attach().err().expect("refused");
        assert_eq!(error, LayoutError::BadSlotFormat(bad));
        assert!(error.to_string().contains(&format!("{bad:#x}")), "{error}");
    }
    placement.store(ring_offset, relaxed);
    let view = region.attach().unwrap();
    assert_eq!(view.ring(0).unwrap().slot_format(), SlotFormat::Framed);
}

#[test]
fn region_of_another_abi_version_is_refused_naming_both() {
    let lines = memory(4096);
    let region = SharedRegion::from_cache_lines(&lines);
    region.initialize(&SPECS[..1], 0).unwrap();
    let other = AbiVersion {
        major: ABI_VERSION.major + 1,
        minor: 3,
    };
    // Word 1 holds abi_version (low half) and header_size (high half).
    let word = &lines[0].0[1];
    let header_size = word.load(std::sync::atomic::Ordering::Relaxed) >> 32;
    word.store(
        u64::from(other.to_u32()) | header_size << 32,
        std::sync::atomic::Ordering::Relaxed,
    );
    let error = region.attach().err().expect("refused");
    let text = error.to_string();
    assert!(
        text.contains(&other.to_string()) && text.contains(&ABI_VERSION.to_string()),
        "{text}"
    );
}

#[test]
fn region_rejects_bad_magic_and_too_small_memory() {
    let lines = memory(256);
    let region = SharedRegion::from_cache_lines(&lines);
    assert_eq!(region.attach().err(), Some(LayoutError::BadMagic(0)));
    assert!(region.initialize(&SPECS, 0).is_err());
    assert_ne!(REGION_MAGIC, 0);
}

/// A ring geometry: `slot_count` slots of `slot_size` bytes in `format`.
const fn spec(slot_count: u32, slot_size: u32, format: SlotFormat) -> RingSpec {
    RingSpec {
        slot_count,
        slot_size,
        format,
    }
}

fn ring_pair(
    lines: &[CacheLine],
    spec: RingSpec,
) -> (vmcall_proto::ring::Producer<'_>, Consumer<'_>) {
    let region = SharedRegion::from_cache_lines(lines);
    let layout = RingLayout::new(&region, 0, spec).unwrap();
    (
        vmcall_proto::ring::Producer::attach(&region, &layout).unwrap(),
        Consumer::attach(&region, &layout).unwrap(),
    )
}

#[test]
fn ring_fills_wraps_and_delivers_in_order() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let (mut producer, mut consumer) = ring_pair(&lines, spec(4, 64, SlotFormat::Framed));
    let mut out = [0u8; 56];
    for round in 0u8..10 {
        for index in 0..4u8 {
            producer.try_push(&[round, index, 7]).unwrap();
        }
        assert_eq!(producer.try_push(b"x"), Err(PushError::Full));
        for index in 0..4u8 {
            let len = consumer.try_pop(&mut out).unwrap().unwrap();
            assert_eq!(&out[..len], &[round, index, 7]);
        }
        assert_eq!(consumer.try_pop(&mut out).unwrap(), None);
    }
}

#[test]
fn batches_stop_at_capacity_and_reject_oversized_payloads() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let (mut producer, mut consumer) = ring_pair(&lines, spec(4, 64, SlotFormat::Framed));
    let big = [0u8; 57];
    assert_eq!(
        producer.push_batch(&[b"a", &big]),
        Err(PushError::TooLarge {
            len: 57,
            capacity: 56
        })
    );
    let payloads: Vec<&[u8]> = vec![b"one", b"two", b"three", b"four", b"five", b"six"];
    assert_eq!(producer.push_batch(&payloads).unwrap(), 4);
    // Full: nothing but the indices is looked at, so a too-large payload waiting behind is not
    // an error yet.
    assert_eq!(producer.push_batch(&[&big]).unwrap(), 0);
    let mut scratch = [0u8; 56];
    let mut seen = Vec::new();
    assert_eq!(
        consumer
            .pop_batch(&mut scratch, 3, |m| seen.push(m.to_vec()))
            .unwrap(),
        3
    );
    assert_eq!(producer.push_batch(&payloads[4..]).unwrap(), 2);
    assert_eq!(
        consumer
            .pop_batch(&mut scratch, 10, |m| seen.push(m.to_vec()))
            .unwrap(),
        3
    );
    let expected: Vec<&[u8]> = vec![b"one", b"two", b"three", b"four", b"five", b"six"];
    assert_eq!(seen, expected);
}

/// Batches of every size, of full (56-byte framed, 64-byte record) and short messages, through a
/// 64-byte-slot ring for many laps, some rounds by single push and pop: every batch boundary meets
/// the wrap somewhere, so both slot runs of a batch are exercised, and each message arrives once,
/// in order, intact (a short record zero-padded to the slot). In both slot formats, once on
/// cache-line memory (on x86-64, full slots move whole as 16-byte copies) and once on a region
/// only 8-byte aligned, which takes the word-atomic path the bare-metal target always uses.
#[test]
fn batches_of_full_and_short_messages_wrap_in_order() {
    for format in [SlotFormat::Framed, SlotFormat::Record] {
        wrap_in_order_both_alignments(format);
    }
}

fn wrap_in_order_both_alignments(format: SlotFormat) {
    on_both_alignments(|region| wrap_in_order(region, format));
}

/// Runs `test` on a region of the wrap tests' size that is cache-line aligned, then on one
/// that is 8 mod 16 bytes aligned (so every slot is too), which takes the word-atomic path.
fn on_both_alignments(test: impl Fn(&SharedRegion<'_>)) {
    let bytes = RING_CONTROL_SIZE + WRAP_SLOTS as usize * 64;
    let lines = memory(bytes);
    test(&SharedRegion::from_cache_lines(&lines));
    let words: Vec<AtomicU64> = (0..bytes / 8 + 1).map(|_| AtomicU64::new(0)).collect();
    let skip = usize::from(words.as_ptr() as usize % 16 == 0);
    let shifted = &words[skip..skip + words.len() - 1];
    assert_eq!(
        shifted.as_ptr() as usize % 16,
        8,
        "takes the word-atomic path"
    );
    test(&SharedRegion::new(shifted));
}

const WRAP_SLOTS: u32 = 8;

fn wrap_in_order(region: &SharedRegion<'_>, format: SlotFormat) {
    const SLOTS: u32 = WRAP_SLOTS;
    let layout = RingLayout::new(
        region,
        0,
        RingSpec {
            slot_count: SLOTS,
            slot_size: 64,
            format,
        },
    )
    .unwrap();
    let mut producer = vmcall_proto::ring::Producer::attach(region, &layout).unwrap();
    let mut consumer = Consumer::attach(region, &layout).unwrap();
    let full = producer.payload_capacity();
    assert_eq!(full, consumer.payload_capacity());
    assert_eq!(
        full,
        match format {
            SlotFormat::Framed => 56,
            SlotFormat::Record => 64,
        }
    );
    // Payload n: `full` bytes counting up from n's low byte for most n, a short one
    // (n % `full` bytes) for every fifth. Short and full ones alternate in each slot, so a short
    // record is written over a full one and must not deliver its stale bytes.
    let payload = |n: u32| -> Vec<u8> {
        let len = if n % 5 == 0 { n as usize % full } else { full };
        (0..len).map(|i| (n as u8).wrapping_add(i as u8)).collect()
    };
    // Message n as delivered: a record always fills its slot.
    let message = |n: u32| -> Vec<u8> {
        let mut bytes = payload(n);
        if format == SlotFormat::Record {
            bytes.resize(64, 0);
        }
        bytes
    };
    let (mut sent, mut received) = (0u32, 0u32);
    let mut scratch = [0u8; 64];
    for round in 0..200u32 {
        let want = 1 + round % SLOTS;
        let owned: Vec<Vec<u8>> = (sent..sent + want).map(payload).collect();
        let batch: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        // Every third round goes through the single-message calls instead, on both sides.
        if round % 3 == 0 {
            for payload in &batch {
                if producer.try_push(payload) == Err(PushError::Full) {
                    break;
                }
                sent += 1;
            }
            let mut out = [0u8; 64];
            while let Some(len) = consumer.try_pop(&mut out).unwrap() {
                assert_eq!(
                    &out[..len],
                    message(received).as_slice(),
                    "message {received}"
                );
                received += 1;
            }
            continue;
        }
        sent += producer.push_batch(&batch).unwrap() as u32;
        let max = 1 + (round * 3) as usize % SLOTS as usize;
        let got = consumer
            .pop_batch(&mut scratch, max, |payload| {
                assert_eq!(payload, message(received).as_slice(), "message {received}");
                received += 1;
            })
            .unwrap();
        assert!(got <= max);
    }
    while received < sent {
        consumer
            .pop_batch(&mut scratch, SLOTS as usize, |payload| {
                assert_eq!(payload, message(received).as_slice());
                received += 1;
            })
            .unwrap();
    }
    assert!(sent > 4 * SLOTS, "the ring wrapped several times");
    assert_eq!(consumer.try_pop(&mut scratch).unwrap(), None);
}

/// A batch pop that meets a bad slot delivers and frees the messages before it, reports the bad
/// one and leaves it in place; so does one whose buffer is too small for a message.
#[test]
fn batch_pop_stops_at_a_bad_slot_or_a_too_small_buffer() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let (mut producer, mut consumer) = ring_pair(&lines, spec(4, 64, SlotFormat::Framed));
    let full = [0x5a; 56];
    assert_eq!(producer.push_batch(&[b"one", &full, b"three"]).unwrap(), 3);
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    // Slot 1's header (control block: lines 0..4, then one line per slot).
    let header = &lines[5].0[0];
    header.store(57, relaxed);
    let mut scratch = [0u8; 56];
    let mut seen = Vec::new();
    assert_eq!(
        consumer.pop_batch(&mut scratch, 4, |m| seen.push(m.to_vec())),
        Err(RingError::BadSlotHeader {
            index: 1,
            header: 57
        })
    );
    assert_eq!(seen, [b"one".to_vec()]);
    // The first slot was freed, the bad one was not: two pushes fit, a third does not.
    assert_eq!(producer.push_batch(&[b"four", b"five"]).unwrap(), 2);
    assert_eq!(producer.try_push(b"six"), Err(PushError::Full));
    header.store(56, relaxed);
    // A buffer too small for the full message: nothing delivered, nothing freed.
    let mut small = [0u8; 8];
    assert_eq!(
        consumer.pop_batch(&mut small, 4, |m| seen.push(m.to_vec())),
        Err(RingError::BufferTooSmall {
            needed: 56,
            available: 8
        })
    );
    assert_eq!(seen.len(), 1);
    assert_eq!(
        consumer
            .pop_batch(&mut scratch, 4, |m| seen.push(m.to_vec()))
            .unwrap(),
        4
    );
    let expected: [&[u8]; 5] = [b"one", &full, b"three", b"four", b"five"];
    assert_eq!(seen, expected);
}

#[test]
fn doorbell_flag_is_taken_once_and_cleared_by_data() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let (mut producer, mut consumer) = ring_pair(&lines, spec(4, 64, SlotFormat::Framed));
    assert!(!producer.wake_needed(), "nobody waits yet");
    assert_eq!(consumer.prepare_to_sleep().unwrap(), SleepCheck::MaySleep);
    producer.try_push(b"wake").unwrap();
    assert!(producer.wake_needed());
    assert!(!producer.wake_needed(), "one doorbell per sleep");
    consumer.woke();
    assert_eq!(
        consumer.prepare_to_sleep().unwrap(),
        SleepCheck::MessagesReady
    );
    assert!(
        !producer.wake_needed(),
        "flag lowered when messages were found"
    );
    let mut sleeps = 0;
    consumer.wait_for_message(4, || sleeps += 1).unwrap();
    assert_eq!(sleeps, 0);
}

#[test]
fn hostile_indices_and_slot_headers_are_typed_errors() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let (mut producer, mut consumer) = ring_pair(&lines, spec(4, 64, SlotFormat::Framed));
    let tail = &lines[0].0[0];
    let head = &lines[2].0[0];
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    tail.store(1000, relaxed);
    let mut out = [0u8; 56];
    assert_eq!(
        consumer.try_pop(&mut out),
        Err(RingError::CorruptIndex {
            head: 0,
            tail: 1000
        })
    );
    tail.store(1, relaxed);
    // Slot 0 header (first word after the 4-line control block): length beyond the slot.
    lines[4].0[0].store(4096, relaxed);
    assert!(matches!(
        consumer.try_pop(&mut out),
        Err(RingError::BadSlotHeader { .. })
    ));
    lines[4].0[0].store(1 << 40, relaxed);
    assert!(matches!(
        consumer.try_pop(&mut out),
        Err(RingError::BadSlotHeader { .. })
    ));
    // Fill the producer's view so it must reload head, then corrupt head.
    for _ in 0..4 {
        producer.try_push(b"p").unwrap();
    }
    head.store(u64::MAX, relaxed);
    assert!(matches!(
        producer.try_push(b"p"),
        Err(PushError::Ring(RingError::CorruptIndex { .. }))
    ));
}

/// A record ring: the whole slot is the message, in every slot size (64 bytes has its own path,
/// 128 bytes goes word by word). Capacity is the slot; a longer payload is refused, a shorter one
/// zero-padded; the buffer must take a whole slot.
#[test]
fn records_fill_their_slot_and_pad_short_payloads_with_zeros() {
    for slot_size in [64u32, 128] {
        let lines = memory(RING_CONTROL_SIZE + 2 * slot_size as usize);
        let region = SharedRegion::from_cache_lines(&lines);
        let spec = RingSpec {
            slot_count: 2,
            slot_size,
            format: SlotFormat::Record,
        };
        let layout = RingLayout::new(&region, 0, spec).unwrap();
        assert_eq!(layout.slot_format(), SlotFormat::Record);
        let mut producer = vmcall_proto::ring::Producer::attach(&region, &layout).unwrap();
        let mut consumer = Consumer::attach(&region, &layout).unwrap();
        let size = slot_size as usize;
        assert_eq!(producer.payload_capacity(), size);
        let too_big = vec![1u8; size + 1];
        assert_eq!(
            producer.try_push(&too_big),
            Err(PushError::TooLarge {
                len: size + 1,
                capacity: size
            })
        );
        let full: Vec<u8> = (0..size).map(|i| i as u8 | 0x80).collect();
        let mut out = vec![0u8; size];
        // Two laps over slot 0: a full record, then a short one over it.
        producer.try_push(&full).unwrap();
        assert_eq!(consumer.try_pop(&mut out).unwrap(), Some(size));
        assert_eq!(out, full);
        producer.try_push(&full).unwrap();
        assert_eq!(consumer.try_pop(&mut out).unwrap(), Some(size));
        producer.push_batch(&[b"abc"]).unwrap();
        let mut expected = b"abc".to_vec();
        expected.resize(size, 0);
        let mut seen = Vec::new();
        let mut small = vec![0u8; size - 1];
        assert_eq!(
            consumer.pop_batch(&mut small, 1, |m| seen.push(m.to_vec())),
            Err(RingError::BufferTooSmall {
                needed: size,
                available: size - 1
            })
        );
        assert_eq!(
            consumer
                .pop_batch(&mut out, 1, |m| seen.push(m.to_vec()))
                .unwrap(),
            1
        );
        assert_eq!(seen, [expected]);
    }
}

/// The typed 64-byte record calls: batches and single records through a record ring of 64-byte
/// slots for many laps (every batch size meets the wrap), each record arriving once, in order,
/// intact, on cache-line memory and on memory only 8-byte aligned (the word-atomic path); they
/// interoperate with the byte-slice calls on the same ring. Any other ring is refused before
/// anything moves.
#[test]
fn record64_batches_wrap_in_order_and_other_rings_are_refused() {
    on_both_alignments(records_wrap_in_order);

    for (slot_size, format) in [(64, SlotFormat::Framed), (128, SlotFormat::Record)] {
        let lines = memory(RING_CONTROL_SIZE + 4 * slot_size as usize);
        let region = SharedRegion::from_cache_lines(&lines);
        let spec = RingSpec {
            slot_count: 4,
            slot_size,
            format,
        };
        let layout = RingLayout::new(&region, 0, spec).unwrap();
        let mut producer = vmcall_proto::ring::Producer::attach(&region, &layout).unwrap();
        let mut consumer = Consumer::attach(&region, &layout).unwrap();
        let refused = RingError::NotRecord64Ring {
            format,
            slot_size: slot_size as usize,
        };
        let mut out = [Record64::ZERO; 2];
        assert_eq!(producer.push_records(&out), Err(PushError::Ring(refused)));
        assert_eq!(
            producer.try_push_record(&out[0]),
            Err(PushError::Ring(refused))
        );
        producer.try_push(b"still usable").unwrap();
        assert_eq!(consumer.pop_records(&mut out), Err(refused));
        assert_eq!(consumer.try_pop_record(&mut out[0]), Err(refused));
        assert_eq!(consumer.available().unwrap(), 1, "nothing was consumed");
    }
}

fn records_wrap_in_order(region: &SharedRegion<'_>) {
    let layout = RingLayout::new(region, 0, spec(WRAP_SLOTS, 64, SlotFormat::Record)).unwrap();
    let mut producer = vmcall_proto::ring::Producer::attach(region, &layout).unwrap();
    let mut consumer = Consumer::attach(region, &layout).unwrap();
    let record = |n: u32| {
        Record64(core::array::from_fn(|i| {
            (n as u8).wrapping_mul(3) ^ i as u8
        }))
    };
    let (mut sent, mut received) = (0u32, 0u32);
    let mut out = [Record64::ZERO; WRAP_SLOTS as usize];
    for round in 0..200u32 {
        let batch: Vec<Record64> = (sent..sent + 1 + round % WRAP_SLOTS).map(record).collect();
        match round % 4 {
            // Single records and byte-slice calls on the same ring, now and then.
            0 => {
                while producer.try_push_record(&record(sent)).is_ok() {
                    sent += 1;
                }
                let mut one = Record64::ZERO;
                while consumer.try_pop_record(&mut one).unwrap() {
                    assert_eq!(one, record(received), "record {received}");
                    received += 1;
                }
            }
            1 => {
                if producer.try_push(&record(sent).0).is_ok() {
                    sent += 1;
                }
                let mut bytes = [0u8; 64];
                while let Some(len) = consumer.try_pop(&mut bytes).unwrap() {
                    assert_eq!(&bytes[..len], &record(received).0[..]);
                    received += 1;
                }
            }
            _ => {
                sent += producer.push_records(&batch).unwrap() as u32;
                let max = 1 + (round * 3) as usize % WRAP_SLOTS as usize;
                let got = consumer.pop_records(&mut out[..max]).unwrap();
                for record_in in &out[..got] {
                    assert_eq!(*record_in, record(received), "record {received}");
                    received += 1;
                }
            }
        }
    }
    while received < sent {
        let got = consumer.pop_records(&mut out).unwrap();
        for record_in in &out[..got] {
            assert_eq!(*record_in, record(received));
            received += 1;
        }
    }
    assert!(sent > 4 * WRAP_SLOTS, "the ring wrapped several times");
    assert_eq!(consumer.pop_records(&mut out).unwrap(), 0);
    // A full ring takes nothing and changes nothing.
    let full = [Record64::ZERO; WRAP_SLOTS as usize + 3];
    assert_eq!(producer.push_records(&full).unwrap(), WRAP_SLOTS as usize);
    assert_eq!(producer.push_records(&full).unwrap(), 0);
    assert_eq!(producer.try_push_record(&full[0]), Err(PushError::Full));
}

/// A record carries no header, so whatever a peer writes in a slot is delivered as it is (the
/// message decoder judges it), always exactly one slot long; the indices are still checked.
#[test]
fn hostile_records_are_delivered_verbatim_and_indices_still_checked() {
    let lines = memory(RING_CONTROL_SIZE + 4 * 64);
    let region = SharedRegion::from_cache_lines(&lines);
    let spec = spec(4, 64, SlotFormat::Record);
    let layout = RingLayout::new(&region, 0, spec).unwrap();
    let mut consumer = Consumer::attach(&region, &layout).unwrap();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let tail = &lines[0].0[0];
    // Slot 0 (line 4): a word that a framed reader would refuse as a header, then garbage.
    for (index, word) in lines[4].0.iter().enumerate() {
        word.store(u64::MAX - index as u64, relaxed);
    }
    lines[4].0[0].store(1 << 40, relaxed);
    tail.store(1, relaxed);
    let mut out = [0u8; 64];
    assert_eq!(consumer.try_pop(&mut out).unwrap(), Some(64));
    assert_eq!(out[..8], (1u64 << 40).to_le_bytes());
    assert_eq!(out[56..], (u64::MAX - 7).to_le_bytes());
    tail.store(6, relaxed);
    assert_eq!(
        consumer.try_pop(&mut out),
        Err(RingError::CorruptIndex { head: 1, tail: 6 })
    );
}

#[test]
fn data_window_reads_back_writes_and_checks_bounds() {
    let lines = memory(128);
    let window = vmcall_proto::region::DataWindow::new(&lines[0].0);
    let buffer = window.write(8, b"hello, world").unwrap();
    assert_eq!(buffer, BufferRef { offset: 8, len: 12 });
    let mut out = [0u8; 12];
    window.read(buffer, &mut out).unwrap();
    assert_eq!(&out, b"hello, world");
    assert_eq!(
        window.write(4, b"x"),
        Err(WindowError::Misaligned { offset: 4 })
    );
    assert!(matches!(
        window.write(56, b"0123456789"),
        Err(WindowError::OutOfBounds { .. })
    ));
    assert!(matches!(
        window.read(buffer, &mut [0u8; 3]),
        Err(WindowError::DestinationTooSmall { .. })
    ));
}

#[test]
fn data_window_copies_every_length_and_pads_only_its_last_word() {
    let lines = memory(128);
    let window = vmcall_proto::region::DataWindow::new(&lines[0].0);
    let words = &lines[0].0;
    for len in 0..=40usize {
        for word in words.iter() {
            word.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        }
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
        let buffer = window.write(8, &data).unwrap();
        let mut out = vec![0u8; len];
        window.read(buffer, &mut out).unwrap();
        assert_eq!(out, data, "length {len}");
        // The buffer is words 1..=used.
        let used = len.div_ceil(8);
        if len % 8 != 0 {
            // The last word's bytes after the data are zero.
            let last = words[used].load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(last >> (8 * (len % 8)), 0, "length {len}");
        }
        // The word after the buffer and the one before it are untouched.
        let after = words[1 + used].load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after, u64::MAX, "length {len}");
        assert_eq!(
            words[0].load(std::sync::atomic::Ordering::Relaxed),
            u64::MAX
        );
    }
}

/// Writes `bytes` over a cache-line region, word by word.
fn fill(lines: &[CacheLine], bytes: &[u8]) {
    let words = lines.iter().flat_map(|line| line.0.iter());
    for (word, chunk) in words.zip(bytes.chunks(8)) {
        let mut value = [0u8; 8];
        value[..chunk.len()].copy_from_slice(chunk);
        word.store(
            u64::from_le_bytes(value),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any bytes in a region: attaching and using every ring it describes never panics.
    #[test]
    fn arbitrary_region_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                          keep_header in any::<bool>()) {
        let lines = memory(4096);
        let region = SharedRegion::from_cache_lines(&lines);
        if keep_header {
            // Start from a valid layout so the ring code (not only the header check) sees garbage.
            region.initialize(&SPECS, 7).unwrap();
            fill(&lines[1..], &bytes);
        } else {
            fill(&lines, &bytes);
        }
        if let Ok(view) = region.attach() {
            for index in 0..view.header().ring_count {
                if let Ok(layout) = view.ring(index) {
                    exercise_ring(&region, &layout);
                }
            }
        }
    }

    /// Any value in a ring descriptor's format field: known formats attach as that format,
    /// every other value is refused with `BadSlotFormat`, whatever the rest of the region.
    #[test]
    fn descriptor_format_field_is_validated(format in prop_oneof![0..4u32, any::<u32>()],
                                            ring in 0..2usize) {
        let lines = memory(8192);
        let region = SharedRegion::from_cache_lines(&lines);
        region.initialize(&SPECS, 0).unwrap();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let placement = &lines[1].0[2 * ring];
        let offset = placement.load(relaxed) & 0xffff_ffff;
        placement.store(offset | u64::from(format) << 32, relaxed);
        match (SlotFormat::from_u32(format), region.attach()) {
            (Some(known), Ok(view)) => {
                prop_assert_eq!(known.to_u32(), format);
                prop_assert_eq!(view.ring(ring as u32).unwrap().slot_format(), known);
            }
            (None, Err(error)) => prop_assert_eq!(error, LayoutError::BadSlotFormat(format)),
            (known, attached) => prop_assert!(false, "{known:?} but {:?}", attached.err()),
        }
    }

    /// Any values in head, tail and slots of a valid ring, in either slot format: typed errors,
    /// no panic, no overrun.
    #[test]
    fn arbitrary_ring_contents_never_panic(words in proptest::collection::vec(any::<u64>(), 0..80),
                                           record in any::<bool>()) {
        let lines = memory(RING_CONTROL_SIZE + 4 * 64);
        let region = SharedRegion::from_cache_lines(&lines);
        let format = if record { SlotFormat::Record } else { SlotFormat::Framed };
        let layout = RingLayout::new(&region, 0, RingSpec { slot_count: 4, slot_size: 64, format })
            .unwrap();
        let all = lines.iter().flat_map(|line| line.0.iter());
        for (word, value) in all.zip(words) {
            word.store(value, std::sync::atomic::Ordering::Relaxed);
        }
        exercise_ring(&region, &layout);
    }
}

fn exercise_ring(region: &SharedRegion<'_>, layout: &RingLayout) {
    let mut scratch = vec![0u8; layout.slot_size() as usize];
    if let Ok(mut consumer) = Consumer::attach(region, layout) {
        for _ in 0..layout.slot_count() + 1 {
            let _ = consumer.try_pop(&mut scratch);
        }
        let _ = consumer.pop_batch(&mut scratch, 8, |payload| match layout.slot_format() {
            SlotFormat::Framed => assert!(payload.len() <= layout.slot_size() as usize - 8),
            SlotFormat::Record => assert_eq!(payload.len(), layout.slot_size() as usize),
        });
        let mut records = [Record64::ZERO; 4];
        let _ = consumer.try_pop_record(&mut records[0]);
        let _ = consumer.pop_records(&mut records);
        let _ = consumer.prepare_to_sleep();
    }
    if let Ok(mut producer) = vmcall_proto::ring::Producer::attach(region, layout) {
        let records = [Record64([0x5a; 64]); 4];
        let _ = producer.try_push_record(&records[0]);
        let _ = producer.push_records(&records);
        for _ in 0..layout.slot_count() + 1 {
            let _ = producer.try_push(b"probe");
        }
        let _ = producer.push_batch(&[b"a", b"bc"]);
        let _ = producer.wake_needed();
    }
}
