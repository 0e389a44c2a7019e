//! Arbitrary bytes into every decoder, and into a shared region whose rings are then used from
//! both ends. Nothing may panic or read outside the region.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcall_proto::bootinfo::BootInfo;
use vmcall_proto::delegation::{
    addressed_to, dir_entries, request_slot, FileStat, ServiceLiveness, WindowPlan, CONNECTIONS,
    SERVICE_BYTES,
};
use vmcall_proto::hypercall::{
    panic_text, ConsoleChunk, CoreOwnership, ForcedState, ForcedStateRequest, Hypercall,
    PanicMessage, Status, FORCED_STATE_BYTES,
};
use vmcall_proto::message::{
    CoreEvent, GuestEvent, HypervisorEvent, LoadReport, Message, Notification, ProcessCommand,
    ProcessListEntry, Reply, SyscallRequest,
};
use vmcall_proto::region::{CacheLine, RingSpec, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, Record64, SlotFormat};

fuzz_target!(|data: &[u8]| {
    let window = data.first().map_or(0, |byte| u64::from(*byte) << 8);
    decode_everything(data, window);
    fuzz_region(data);
});

fn decode_everything(data: &[u8], window: u64) {
    if let Ok(message) = Message::decode(data, window) {
        // Whatever decodes must re-encode to the same bytes, followed by nothing but the zero
        // padding the decoders accept.
        let mut again = [0u8; 512];
        let len = message.encode(&mut again).expect("decoded messages encode");
        assert_eq!(&again[..len], &data[..len]);
        assert!(data[len..].iter().all(|&byte| byte == 0));
    }
    let _ = LoadReport::decode(data);
    let _ = CoreEvent::decode(data);
    let _ = GuestEvent::decode(data);
    if let Ok(event) = HypervisorEvent::decode(data) {
        let mut again = [0u8; 64];
        let len = event.encode(&mut again).expect("decoded events encode");
        assert_eq!(&again[..len], &data[..len]);
    }
    let _ = SyscallRequest::decode(data, window);
    let _ = Reply::decode(data);
    let _ = Notification::decode(data);
    let _ = ProcessCommand::decode(data, window);
    let _ = ProcessListEntry::decode(data);
    let _ = BootInfo::read(data);
    decode_delegation_records(data, window);
    let mut words = [0u64; 6];
    for (word, chunk) in words.iter_mut().zip(data.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_le_bytes(bytes);
    }
    let _ = Hypercall::try_from(words[0]);
    let _ = Status::try_from(words[0]);
    let _ = CoreOwnership::from_u64(words[0]);
    let _ = ConsoleChunk::from_args([words[1], words[2], words[3], words[4], words[5]]);
    let args = [words[1], words[2], words[3], words[4], words[5]];
    if let Ok(message) = PanicMessage::from_args(args) {
        assert_eq!(message.to_args(), args);
    }
    if let Ok(request) = ForcedStateRequest::from_args(args) {
        assert_eq!(request.to_args(), args);
    }
    // Accepted panic text holds nothing that could start a line or a marker.
    if let Ok(text) = panic_text(data) {
        assert!(!text.contains("@@") && !text.contains(['\n', '\r']));
    }
    if let Some(bytes) = data.get(..FORCED_STATE_BYTES) {
        let bytes: &[u8; FORCED_STATE_BYTES] = bytes.try_into().expect("sliced to size");
        assert_eq!(&ForcedState::from_bytes(bytes).to_bytes(), bytes);
    }
}

/// The records a delegated call's output holds: whatever decodes re-encodes to the same
/// bytes; and a buffer the plan assigns to a connection lies inside the window.
fn decode_delegation_records(data: &[u8], window: u64) {
    if let Some(stat) = data.get(..FileStat::ENCODED_LEN).and_then(FileStat::decode) {
        assert_eq!(&stat.encode()[..], &data[..FileStat::ENCODED_LEN]);
    }
    let mut again = vec![0u8; data.len()];
    let mut used = 0;
    for entry in dir_entries(data) {
        let Ok(entry) = entry else { break };
        used += entry
            .encode(&mut again[used..])
            .expect("decoded entries encode");
    }
    assert_eq!(&again[..used], &data[..used]);
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(data.chunks(4)) {
        let mut bytes = [0u8; 4];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_le_bytes(bytes);
    }
    if let Some(plan) = WindowPlan::new(u64::from(words[3] & 0x1ff8), window << 8) {
        let buffer = vmcall_proto::region::BufferRef {
            offset: words[1],
            len: words[2],
        };
        if plan.belongs_to(words[0] % (CONNECTIONS + 1), buffer) {
            assert!(buffer.validate(window << 8).is_ok());
            // The empty buffer (offset 0, length 0) means "no buffer" and belongs to every
            // connection; any buffer with bytes in it must lie past the liveness words.
            assert!(
                buffer.len == 0 || buffer.offset >= SERVICE_BYTES,
                "the liveness words are no call's"
            );
        }
    }
    // A peer's request id and liveness words, whatever they hold: a slot index in range of
    // the id's byte, an epoch check that is a plain comparison, and reads that never fail.
    let id = u64::from(words[0]) | u64::from(words[1]) << 32;
    let _ = request_slot(id);
    assert!(addressed_to(id, id >> 8));
    let cells: Vec<std::sync::atomic::AtomicU64> = [id, u64::from(words[2])]
        .into_iter()
        .map(std::sync::atomic::AtomicU64::new)
        .collect();
    let liveness = ServiceLiveness::new(&cells).expect("two words suffice");
    let _ = (liveness.epoch(), liveness.heartbeat());
}

/// Half the time the region starts from a valid layout and the input overwrites it from some
/// offset on, so the fuzzer reaches the ring code and not only the header checks.
fn fuzz_region(data: &[u8]) {
    let lines: Vec<CacheLine> = (0..64).map(|_| CacheLine::default()).collect();
    let region = SharedRegion::from_cache_lines(&lines);
    let (skip, bytes) = match data.split_first() {
        Some((&selector, rest)) if selector & 1 == 1 => {
            let specs = [
                RingSpec {
                    slot_count: 4,
                    slot_size: 64,
                    format: SlotFormat::Record,
                },
                RingSpec {
                    slot_count: 2,
                    slot_size: 128,
                    format: SlotFormat::Framed,
                },
            ];
            region.initialize(&specs, 1).expect("fits 4 KiB");
            (usize::from(selector >> 1) * 8, rest)
        }
        _ => (0, data),
    };
    let words = lines.iter().flat_map(|line| line.0.iter()).skip(skip);
    for (word, chunk) in words.zip(bytes.chunks(8)) {
        let mut value = [0u8; 8];
        value[..chunk.len()].copy_from_slice(chunk);
        word.store(
            u64::from_le_bytes(value),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let Ok(view) = region.attach() else { return };
    let window = view.data_window();
    let mut scratch = [0u8; 4096];
    for index in 0..view.header().ring_count {
        let Ok(layout) = view.ring(index) else {
            continue;
        };
        if let Ok(mut consumer) = Consumer::attach(&region, &layout) {
            for _ in 0..4 {
                if let Ok(Some(len)) = consumer.try_pop(&mut scratch) {
                    let _ = Message::decode(&scratch[..len], window.len_bytes());
                }
            }
            let _ = consumer.pop_batch(&mut scratch, 8, |payload| {
                let _ = Message::decode(payload, window.len_bytes());
            });
            let mut records = [Record64::ZERO; 4];
            let _ = consumer.pop_records(&mut records);
            for record in &records {
                let _ = Message::decode(&record.0, window.len_bytes());
            }
            let _ = consumer.prepare_to_sleep();
        }
        if let Ok(mut producer) = Producer::attach(&region, &layout) {
            let _ = producer.try_push(b"fuzz");
            let _ = producer.push_batch(&[b"a", b"bcdefghij"]);
            let _ = producer.push_records(&[Record64([0x5a; 64]); 2]);
            let _ = producer.wake_needed();
        }
    }
}
