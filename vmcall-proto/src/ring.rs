//! Single-producer / single-consumer ring over shared memory, with its doorbell rule.
//!
//! # Layout
//! A ring is a [`RingControl`] block (four cache lines) followed by `slot_count` slots of
//! `slot_size` bytes. Both are powers of two, fixed when the region is created.
//!
//! * `tail` (line 0) counts messages ever published; only the producer writes it.
//! * `consumer_waiting` (line 1) is the doorbell flag (see below).
//! * `head` (line 2; line 3 is padding) counts messages ever consumed; only the consumer writes it.
//!
//! Message `n` lives in slot `n % slot_count`, in one of two [`SlotFormat`]s, the same for every
//! slot of a ring:
//!
//! * **Framed** (the default): an 8-byte header word (payload length in the low 32 bits, high 32
//!   bits zero) followed by the payload, so a 64-byte slot carries messages of 0 to 56 bytes in
//!   exactly one cache line.
//! * **Record**: the whole slot is the message, with no header: every message is `slot_size`
//!   bytes (a shorter payload is zero-padded), so a 64-byte slot carries a 64-byte message. For
//!   fixed-size records whose own encoding says what they hold (the message decoders validate
//!   tag and contents). It spares the header word that a full framed slot has to merge into its
//!   payload's first 16 bytes: on the benchmark's batches of 64-byte messages, records measured
//!   up to a tenth faster than full framed slots with the machine under load, and within the
//!   noise of them (a few per cent) on a quiet one.
//!
//! The region records each ring's format in its descriptor, set from the
//! [`RingSpec`](crate::region::RingSpec) by the region's creator; a peer attaching reads it there
//! ([`RingLayout::slot_format`]) and refuses a value it does not know.
//!
//! # Ordering
//! The producer fills slots with relaxed stores, then publishes them with one release store of
//! `tail` (one per batch). The consumer acquires `tail`, reads the slots, then frees them with a
//! release store of `head`, which the producer acquires before reusing a slot. Each side keeps its
//! own index privately and a cached copy of the other's, touching the other side's cache line
//! only when the cached copy says the ring is full (producer) or empty (consumer).
//!
//! # Hostile peers
//! The peer can write anything anywhere in the ring at any time. The ring never reads its own
//! index back from shared memory; the peer's index is accepted only if it is within `slot_count`
//! of ours, and a framed slot's length only if it fits the slot. Anything else is a
//! [`RingError`]; nothing panics and no access leaves the ring's memory, which is only touched
//! through atomics, except for whole 64-byte slots (a full framed message, header word included,
//! or any record), moved by one audited volatile copy (`copy_line`, and `copy_records`, its batch
//! form for [`Record64`]s, next to it). A framed reader takes the
//! header from that one snapshot and checks it before it delivers any payload byte; any header
//! but a full payload's goes to the word-by-word path, which validates it like every other. A
//! record has nothing to validate at this level: whatever the peer wrote is delivered, always
//! exactly `slot_size` bytes, and judged by the message decoder.
//!
//! # Typed records
//! On a record ring of 64-byte slots, [`Producer::push_records`] and [`Consumer::pop_records`]
//! (and [`Producer::try_push_record`], [`Consumer::try_pop_record`]) move [`Record64`]s: fixed
//! 64-byte, 64-aligned messages. The ring is checked once per call (any other ring is a
//! [`RingError::NotRecord64Ring`]), the indices once per batch as for every batch, and then the
//! copy loop (`copy_records`, the batch form of `copy_line`) is nothing but four 16-byte moves
//! each way per record: no length to check, no format or alignment to decide per message. The
//! byte-slice calls work on the same ring; the typed ones spare the per-message checks that a
//! slice needs, which is what kept the benchmark's batches of 64-byte messages behind rtrb's
//! batches of a fixed-size type: with the slice calls, batches of 32 measured 1.01 to 1.03 times
//! rtrb's time (median per-trial ratio); with `push_records`/`pop_records`, 0.87 to 1.00 over
//! repeated rounds on a loaded two-core machine (11 instructions per record in the producer's
//! loop, against 19 for a slice).
//!
//! # Fast path
//! 64-byte slots (one cache line: 56-byte framed payloads, 64-byte records) are the common case
//! and have their own code: the slot is a fixed-size array (one bounds check, no per-word loop),
//! and a full message moves as four 16-byte moves each way, a framed one's header and payload
//! together. The stores per message matter when producer and consumer run on different cores,
//! where each store waits in the producer's store buffer until its slot's cache line has come
//! over from the consumer: a separate header store (five per slot) measured up to a third slower
//! on the benchmark's batches. Batches are
//! located as at most two contiguous runs of slots and copied in one pass, each slot written or
//! read whole before the next; indices are validated once per batch, and a poll that finds the
//! ring full (push) or empty (pop) looks at nothing but the indices. The push/pop fast paths are
//! `#[inline(always)]`, specialised per format; other slot sizes and short payloads take
//! out-of-line word-by-word paths. The wire format is the same for all.
//!
//! # Doorbell rule (no lost wake-ups)
//! A consumer about to sleep calls [`Consumer::prepare_to_sleep`]: it sets `consumer_waiting`,
//! issues a `SeqCst` fence, then looks at `tail` again, and only sleeps if the ring is still
//! empty. A producer, after publishing, calls [`Producer::wake_needed`]: a `SeqCst` fence, then it
//! takes (swaps to 0) `consumer_waiting` and rings the doorbell if it was set. The two fences
//! order "set flag; check tail" against "publish tail; check flag", so at least one side sees the
//! other: either the consumer finds the message and stays awake, or the producer finds the flag
//! and rings. The sleep must end at once if a ring lands between the consumer's check and its
//! sleep: an interrupt as the doorbell does that when the consumer sleeps with `sti; hlt` (as
//! Lavender does), and so does a doorbell device that latches a ring while it is masked (the
//! one Linux's agent waits on with `read()` of `/dev/uioN`).

use core::fmt;
use core::mem::{offset_of, size_of};

use crate::region::{RingLayout, SharedRegion, CACHE_LINE};
use crate::sync::{fence, AtomicU64, Ordering};

/// The ring's control block: `tail` and `head` each alone in a 128-byte pair of cache lines, so
/// producer and consumer never write the same line, nor lines that the adjacent-line prefetcher
/// of x86 cores fetches together. The rarely written `consumer_waiting` shares the producer's
/// pair (the producer reads it after publishing). Used for its layout; the live fields are
/// reached as region words.
#[repr(C, align(64))]
pub struct RingControl {
    /// Messages published (producer-owned).
    pub tail: u64,
    _tail_line: [u8; CACHE_LINE - 8],
    /// Non-zero while the consumer sleeps or is about to; taken by the producer.
    pub consumer_waiting: u64,
    _waiting_line: [u8; CACHE_LINE - 8],
    /// Messages consumed (consumer-owned).
    pub head: u64,
    _head_lines: [u8; 2 * CACHE_LINE - 8],
}

/// Bytes of [`RingControl`]; the slots start right after it.
pub const RING_CONTROL_SIZE: usize = size_of::<RingControl>();
const _: () = assert!(RING_CONTROL_SIZE == 4 * CACHE_LINE);
const TAIL_WORD: usize = offset_of!(RingControl, tail) / 8;
const HEAD_WORD: usize = offset_of!(RingControl, head) / 8;
const WAITING_WORD: usize = offset_of!(RingControl, consumer_waiting) / 8;
const _: () = assert!(TAIL_WORD == 0 && WAITING_WORD == 8 && HEAD_WORD == 16);

/// Bytes before the payload in every slot.
pub const SLOT_HEADER_SIZE: usize = 8;
/// High half of the slot header: reserved, must be zero.
const SLOT_HEADER_RESERVED: u64 = 0xffff_ffff_0000_0000;
// Every payload capacity lies below the reserved bits, so `header > capacity` rejects both a
// length past the slot and a reserved bit set (see `Consumer::check_header`).
const _: () = assert!(crate::region::MAX_SLOT_SIZE as u64 <= !SLOT_HEADER_RESERVED);
/// Words in a one-cache-line (64-byte) slot, the common case with its own fast path.
const LINE_WORDS: usize = CACHE_LINE / 8;
/// Payload bytes of a one-cache-line framed slot.
const LINE_PAYLOAD: usize = CACHE_LINE - SLOT_HEADER_SIZE;

/// How a ring's slots hold messages (see the module documentation), recorded in the ring's
/// descriptor, so both ends use the same. Were a peer to use another anyway, it could only produce
/// messages that fail validation: a framed reader checks every header, and a record is judged by
/// the message decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlotFormat {
    /// Header word with the payload length, then the payload: 0 to `slot_size - 8` bytes.
    #[default]
    Framed,
    /// The whole slot is the message: always `slot_size` bytes, shorter payloads zero-padded.
    Record,
}

/// A message that fills a 64-byte record slot: the element of the typed record calls
/// ([`Producer::push_records`], [`Consumer::pop_records`] and their single forms), which move
/// whole records with no length to check per message. Aligned like a slot, so a batch of them is
/// a run of whole cache lines on the private side too.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record64(pub [u8; CACHE_LINE]);
const _: () = assert!(size_of::<Record64>() == LINE_WORDS * 8);

impl Record64 {
    pub const ZERO: Self = Self([0; CACHE_LINE]);
}

impl Default for Record64 {
    fn default() -> Self {
        Self::ZERO
    }
}

impl SlotFormat {
    /// The format's value in a [`RingDescriptor`](crate::region::RingDescriptor)'s `format`
    /// field.
    pub const fn to_u32(self) -> u32 {
        match self {
            Self::Framed => 0,
            Self::Record => 1,
        }
    }

    /// The format a descriptor's `format` field names; `None` for any other value.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Framed),
            1 => Some(Self::Record),
            _ => None,
        }
    }
}

impl RingControl {
    /// Zeroes a ring's indices and flag. Only the region's creator does this, before any peer
    /// attaches.
    pub(crate) fn reset(region: &SharedRegion<'_>, layout: &RingLayout) -> Result<(), RingError> {
        let shared = RingWords::new(region, layout)?;
        for word in [shared.tail, shared.head, shared.waiting] {
            word.store(0, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A ring's shared words, located once from a validated layout.
struct RingWords<'a> {
    tail: &'a AtomicU64,
    head: &'a AtomicU64,
    waiting: &'a AtomicU64,
    slots: &'a [AtomicU64],
    slot_words: usize,
    /// `log2(slot_words)`: slot sizes are powers of two, so a shift finds a slot.
    slot_shift: u32,
    format: SlotFormat,
    /// A record ring of one-cache-line slots: the rings the [`Record64`] calls work on.
    line_records: bool,
    /// `slot_count - 1`: slot counts are powers of two, so a mask finds a slot.
    index_mask: u64,
    slot_count: u64,
}

impl<'a> RingWords<'a> {
    fn new(region: &SharedRegion<'a>, layout: &RingLayout) -> Result<Self, RingError> {
        let slot_bytes = layout.slot_count() as usize * layout.slot_size() as usize;
        let out_of_region = RingError::OutsideRegion;
        let control = region
            .words_at(layout.offset(), RING_CONTROL_SIZE)
            .ok_or(out_of_region)?;
        let slots = region
            .words_at(layout.offset() + RING_CONTROL_SIZE, slot_bytes)
            .ok_or(out_of_region)?;
        Ok(Self {
            tail: &control[TAIL_WORD],
            head: &control[HEAD_WORD],
            waiting: &control[WAITING_WORD],
            slots,
            slot_words: layout.slot_size() as usize / 8,
            slot_shift: (layout.slot_size() / 8).trailing_zeros(),
            format: layout.slot_format(),
            line_records: layout.slot_size() as usize == CACHE_LINE
                && layout.slot_format() == SlotFormat::Record,
            index_mask: u64::from(layout.slot_count()) - 1,
            slot_count: u64::from(layout.slot_count()),
        })
    }

    /// Checks a pair of indices: the producer can be at most `slot_count` ahead of the consumer.
    #[inline]
    fn check_distance(&self, head: u64, tail: u64) -> Result<u64, RingError> {
        let in_flight = tail.wrapping_sub(head);
        if in_flight > self.slot_count {
            Err(RingError::CorruptIndex { head, tail })
        } else {
            Ok(in_flight)
        }
    }

    /// The words (a framed slot's header first) of the slot message `index` lives in.
    #[inline(always)]
    fn slot(&self, index: u64) -> Result<&'a [AtomicU64], RingError> {
        let first = ((index & self.index_mask) as usize) << self.slot_shift;
        // Always present: the masked index is below `slot_count` and `slots` holds exactly
        // `slot_count * slot_words` words.
        self.slots
            .get(first..first + self.slot_words)
            .ok_or(RingError::OutsideRegion)
    }

    /// The slot of message `index` as a fixed-size array, for the one-cache-line fast path.
    /// `None` unless slots are [`LINE_WORDS`] words.
    #[inline(always)]
    fn line_slot(&self, index: u64) -> Option<&'a [AtomicU64; LINE_WORDS]> {
        let first = ((index & self.index_mask) as usize) * LINE_WORDS;
        self.slots.get(first..first + LINE_WORDS)?.try_into().ok()
    }

    /// The slots of messages `start..start + count` (`count <= slot_count`) as two runs of whole
    /// slots, split where the ring wraps (the second run is empty if it does not). A batch then
    /// needs two bounds checks rather than one per message.
    #[inline(always)]
    fn slot_runs(&self, start: u64, count: usize) -> (&'a [AtomicU64], &'a [AtomicU64]) {
        let first = (start & self.index_mask) as usize;
        let until_wrap = self.slot_count as usize - first;
        let (ahead, wrapped) = (count.min(until_wrap), count.saturating_sub(until_wrap));
        let run = |from: usize, slots: usize| {
            self.slots
                .get(from << self.slot_shift..(from + slots) << self.slot_shift)
                .unwrap_or_default()
        };
        (run(first, ahead), run(0, wrapped))
    }

    #[inline(always)]
    fn is_line_ring(&self) -> bool {
        self.slot_words == LINE_WORDS
    }

    /// Fails unless this is a record ring of 64-byte slots; the [`Record64`] calls check this
    /// once per call, leaving nothing to check per message.
    #[inline(always)]
    fn require_line_records(&self) -> Result<(), RingError> {
        if self.line_records {
            Ok(())
        } else {
            Err(not_record64_ring(self.format, self.slot_words * 8))
        }
    }

    #[inline]
    fn payload_capacity(&self) -> usize {
        match self.format {
            SlotFormat::Framed => self.slot_words * 8 - SLOT_HEADER_SIZE,
            SlotFormat::Record => self.slot_words * 8,
        }
    }
}

/// What went wrong on a ring. Errors caused by the peer leave the ring where it was; a peer that
/// produces one is broken or hostile and the channel should be torn down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The ring's layout does not fit the region it was attached to.
    OutsideRegion,
    /// The peer's index is more than `slot_count` away from ours (or behind it).
    CorruptIndex { head: u64, tail: u64 },
    /// A slot header has reserved bits set or a length beyond the slot.
    BadSlotHeader { index: u64, header: u64 },
    /// The caller's buffer is shorter than the message it should receive.
    BufferTooSmall { needed: usize, available: usize },
    /// A [`Record64`] call on a ring that is not a record ring of 64-byte slots.
    NotRecord64Ring {
        format: SlotFormat,
        slot_size: usize,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutsideRegion => f.write_str("ring does not fit its region"),
            Self::CorruptIndex { head, tail } => {
                write!(f, "corrupt ring indices: head {head}, tail {tail}")
            }
            Self::BadSlotHeader { index, header } => {
                write!(f, "bad header {header:#x} in ring slot for message {index}")
            }
            Self::BufferTooSmall { needed, available } => {
                write!(
                    f,
                    "message of {needed} bytes does not fit a {available}-byte buffer"
                )
            }
            Self::NotRecord64Ring { format, slot_size } => write!(
                f,
                "64-byte records need a record ring of 64-byte slots, not {format:?} slots of \
                 {slot_size} bytes"
            ),
        }
    }
}

impl core::error::Error for RingError {}

/// Why a push did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// No free slot; nothing was written.
    Full,
    /// The payload is longer than a slot can carry.
    TooLarge {
        len: usize,
        capacity: usize,
    },
    Ring(RingError),
}

impl From<RingError> for PushError {
    fn from(error: RingError) -> Self {
        Self::Ring(error)
    }
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("ring is full"),
            Self::TooLarge { len, capacity } => {
                write!(
                    f,
                    "payload of {len} bytes exceeds the slot capacity of {capacity}"
                )
            }
            Self::Ring(error) => write!(f, "{error}"),
        }
    }
}

impl core::error::Error for PushError {}

/// What [`Consumer::prepare_to_sleep`] found after raising the waiting flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepCheck {
    /// Messages arrived; the flag was lowered again; do not sleep.
    MessagesReady,
    /// The ring is empty and the producer will ring the doorbell for the next message.
    MaySleep,
}

/// The writing end of a ring. Exactly one may exist per ring.
pub struct Producer<'a> {
    shared: RingWords<'a>,
    /// Our index; the authoritative copy, never read back from shared memory.
    tail: u64,
    /// The consumer's index as last seen; refreshed only when the ring looks full.
    head_seen: u64,
}

impl<'a> Producer<'a> {
    /// Attaches to a ring, resuming from the indices found in it (zero for a fresh ring).
    pub fn attach(region: &SharedRegion<'a>, layout: &RingLayout) -> Result<Self, RingError> {
        let shared = RingWords::new(region, layout)?;
        let tail = shared.tail.load(Ordering::Relaxed);
        let head = shared.head.load(Ordering::Acquire);
        shared.check_distance(head, tail)?;
        Ok(Self {
            shared,
            tail,
            head_seen: head,
        })
    }

    /// Largest payload one message can carry.
    #[inline]
    pub fn payload_capacity(&self) -> usize {
        self.shared.payload_capacity()
    }

    /// Free slots, looking at the consumer's `head` only if fewer than `wanted` seem free.
    #[inline(always)]
    fn free_slots(&mut self, wanted: u64) -> Result<u64, RingError> {
        let free = self.shared.slot_count - self.tail.wrapping_sub(self.head_seen);
        if free >= wanted {
            return Ok(free);
        }
        self.refresh_head()
    }

    /// Looks at the consumer's `head`: the ring looked full. Inline: a producer facing a full
    /// ring polls this, and a poll should cost no more than the load it needs.
    #[inline]
    fn refresh_head(&mut self) -> Result<u64, RingError> {
        let head = self.shared.head.load(Ordering::Acquire);
        let in_flight = self.shared.check_distance(head, self.tail)?;
        self.head_seen = head;
        Ok(self.shared.slot_count - in_flight)
    }

    #[inline(always)]
    fn check_len(&self, payload: &[u8]) -> Result<(), PushError> {
        let capacity = self.payload_capacity();
        if payload.len() > capacity {
            return Err(too_large(payload.len(), capacity));
        }
        Ok(())
    }

    /// Fills the slot of message `index`. The caller has checked `payload` against the capacity.
    #[inline(always)]
    fn write_slot(&self, index: u64, payload: &[u8]) -> Result<(), RingError> {
        if self.shared.is_line_ring() {
            let slot = self
                .shared
                .line_slot(index)
                .ok_or(RingError::OutsideRegion)?;
            match self.shared.format {
                SlotFormat::Framed => store_line(slot, payload),
                SlotFormat::Record => store_record_line(slot, payload),
            }
            return Ok(());
        }
        self.write_slot_words(index, payload)
    }

    /// [`Producer::write_slot`] for slots other than one cache line, word by word.
    #[inline(never)]
    fn write_slot_words(&self, index: u64, payload: &[u8]) -> Result<(), RingError> {
        let slot = self.shared.slot(index)?;
        match self.shared.format {
            SlotFormat::Framed => {
                let (header, body) = slot.split_first().ok_or(RingError::OutsideRegion)?;
                header.store(payload.len() as u64, Ordering::Relaxed);
                store_words(body, payload);
            }
            SlotFormat::Record => store_record_words(slot, payload),
        }
        Ok(())
    }

    #[inline]
    fn publish(&self) {
        self.shared.tail.store(self.tail, Ordering::Release);
    }

    /// Copies `payload` into the next slot and publishes it.
    #[inline(always)]
    pub fn try_push(&mut self, payload: &[u8]) -> Result<(), PushError> {
        self.check_len(payload)?;
        if self.free_slots(1)? == 0 {
            return Err(PushError::Full);
        }
        self.write_slot(self.tail, payload)?;
        self.tail = self.tail.wrapping_add(1);
        self.publish();
        Ok(())
    }

    /// Copies as many of `payloads` as fit, in order, and publishes them with one release store.
    /// Returns how many were pushed (0 when full, having looked at nothing but the indices). A
    /// payload too large for a slot among those that fit fails the call before anything is
    /// written; payloads beyond the free slots are not looked at (they are the caller's to push
    /// again).
    #[inline]
    pub fn push_batch(&mut self, payloads: &[&[u8]]) -> Result<usize, PushError> {
        let free = self.free_slots(payloads.len() as u64)?;
        let count = payloads.len().min(free as usize);
        let batch = payloads.get(..count).unwrap_or_default();
        if batch.is_empty() {
            return Ok(0);
        }
        for payload in batch {
            self.check_len(payload)?;
        }
        let start = self.tail;
        if self.shared.is_line_ring() {
            let (ahead, wrapped) = self.shared.slot_runs(start, batch.len());
            let (first, second) = batch.split_at(batch.len().min(ahead.len() / LINE_WORDS));
            // One loop per format, so that no message decides it again.
            let written = match self.shared.format {
                SlotFormat::Framed => {
                    store_lines(ahead, first, store_line) + store_lines(wrapped, second, store_line)
                }
                SlotFormat::Record => {
                    store_lines(ahead, first, store_record_line)
                        + store_lines(wrapped, second, store_record_line)
                }
            };
            self.tail = start.wrapping_add(written as u64);
        } else {
            for payload in batch {
                self.write_slot_words(self.tail, payload)?;
                self.tail = self.tail.wrapping_add(1);
            }
        }
        if self.tail != start {
            self.publish();
        }
        Ok(self.tail.wrapping_sub(start) as usize)
    }

    /// Copies `record` into the next slot and publishes it: [`Producer::try_push`] of a full
    /// record, with nothing to check but the ring (once) and the free slots.
    #[inline(always)]
    pub fn try_push_record(&mut self, record: &Record64) -> Result<(), PushError> {
        self.shared.require_line_records()?;
        if self.free_slots(1)? == 0 {
            return Err(PushError::Full);
        }
        let slot = self
            .shared
            .line_slot(self.tail)
            .ok_or(RingError::OutsideRegion)?;
        copy_line(slot, LineCopy::WriteRecord(&record.0));
        self.tail = self.tail.wrapping_add(1);
        self.publish();
        Ok(())
    }

    /// Copies as many of `records` as fit, in order, and publishes them with one release store:
    /// [`Producer::push_batch`] of full records on a record ring of 64-byte slots (any other ring
    /// is refused before anything is written). Every record is a valid message, so the copy
    /// loop is whole 64-byte moves and nothing else. Returns how many were pushed (0 when full,
    /// having looked at nothing but the indices).
    #[inline]
    pub fn push_records(&mut self, records: &[Record64]) -> Result<usize, PushError> {
        self.shared.require_line_records()?;
        let free = self.free_slots(records.len() as u64)?;
        let batch = records
            .get(..records.len().min(free as usize))
            .unwrap_or_default();
        if batch.is_empty() {
            return Ok(0);
        }
        let start = self.tail;
        let (ahead, wrapped) = self.shared.slot_runs(start, batch.len());
        let (first, second) = batch.split_at(batch.len().min(ahead.len() / LINE_WORDS));
        let written = copy_records(ahead, RecordCopy::Write(first))
            + copy_records(wrapped, RecordCopy::Write(second));
        self.tail = start.wrapping_add(written as u64);
        self.publish();
        Ok(written)
    }

    /// The producer half of the doorbell rule; call after publishing. Returns `true` when the
    /// consumer is asleep (or about to be) and the caller must ring its doorbell. Takes the
    /// flag, so a burst of pushes rings once.
    #[inline]
    pub fn wake_needed(&self) -> bool {
        fence(Ordering::SeqCst);
        // Load before swapping: while the consumer is awake this keeps its flag's cache line
        // shared instead of pulling it over exclusively on every publish.
        self.shared.waiting.load(Ordering::Relaxed) != 0
            && self.shared.waiting.swap(0, Ordering::Relaxed) != 0
    }
}

/// The reading end of a ring. Exactly one may exist per ring.
pub struct Consumer<'a> {
    shared: RingWords<'a>,
    /// Our index; the authoritative copy, never read back from shared memory.
    head: u64,
    /// The producer's index as last seen; refreshed only when the ring looks empty.
    tail_seen: u64,
}

impl<'a> Consumer<'a> {
    /// Attaches to a ring, resuming from the indices found in it (zero for a fresh ring).
    pub fn attach(region: &SharedRegion<'a>, layout: &RingLayout) -> Result<Self, RingError> {
        let shared = RingWords::new(region, layout)?;
        let head = shared.head.load(Ordering::Relaxed);
        let tail = shared.tail.load(Ordering::Acquire);
        shared.check_distance(head, tail)?;
        Ok(Self {
            shared,
            head,
            tail_seen: tail,
        })
    }

    /// Largest payload one message can carry: a buffer this long receives any message.
    #[inline]
    pub fn payload_capacity(&self) -> usize {
        self.shared.payload_capacity()
    }

    /// Messages ready to read, looking at the producer's `tail` only if none seem ready.
    #[inline]
    pub fn available(&mut self) -> Result<u64, RingError> {
        self.ready(1)
    }

    /// Messages ready, looking at the producer's `tail` only if fewer than `wanted` seem ready.
    #[inline]
    fn ready(&mut self, wanted: u64) -> Result<u64, RingError> {
        let ready = self.tail_seen.wrapping_sub(self.head);
        if ready >= wanted {
            return Ok(ready);
        }
        self.refresh_tail()
    }

    #[inline]
    fn refresh_tail(&mut self) -> Result<u64, RingError> {
        let tail = self.shared.tail.load(Ordering::Acquire);
        let ready = self.shared.check_distance(self.head, tail)?;
        self.tail_seen = tail;
        Ok(ready)
    }

    /// Validates the slot of message `index` and copies its payload into the front of `out`.
    #[inline(always)]
    fn read_slot(&self, index: u64, out: &mut [u8]) -> Result<usize, RingError> {
        if self.shared.is_line_ring() {
            return self.read_line_slot(index, out);
        }
        self.read_slot_words(index, out)
    }

    /// [`Consumer::read_slot`] for a one-cache-line slot.
    #[inline(always)]
    fn read_line_slot(&self, index: u64, out: &mut [u8]) -> Result<usize, RingError> {
        let slot = self
            .shared
            .line_slot(index)
            .ok_or(RingError::OutsideRegion)?;
        match self.shared.format {
            SlotFormat::Framed => self.read_line(index, slot, out),
            SlotFormat::Record => self.read_record_line(index, slot, out),
        }
    }

    /// Copies the record in `slot` (holding message `index`, which a record does not need) into
    /// the front of `out`: all of it, there being nothing to validate.
    #[inline(always)]
    fn read_record_line(
        &self,
        _index: u64,
        slot: &[AtomicU64; LINE_WORDS],
        out: &mut [u8],
    ) -> Result<usize, RingError> {
        let available = out.len();
        let Some(record) = out.first_chunk_mut::<CACHE_LINE>() else {
            return Err(buffer_too_small(CACHE_LINE, available));
        };
        copy_line(slot, LineCopy::ReadRecord(record));
        Ok(CACHE_LINE)
    }

    /// Validates the framed `slot`, holding message `index`, and copies its payload into the front
    /// of `out`.
    /// A full payload into a buffer that takes it is the fast path: the slot is read whole
    /// ([`copy_line`]) and the payload delivered from that one snapshot once its header checks
    /// out. Anything else (a short message, a bad header, a small buffer) goes word by word.
    #[inline(always)]
    fn read_line(
        &self,
        index: u64,
        slot: &[AtomicU64; LINE_WORDS],
        out: &mut [u8],
    ) -> Result<usize, RingError> {
        let header = match out.first_chunk_mut::<LINE_PAYLOAD>() {
            Some(full) => match copy_line(slot, LineCopy::ReadFramed(full)) {
                FULL_LINE_HEADER => return Ok(LINE_PAYLOAD),
                header => header,
            },
            None => slot[0].load(Ordering::Relaxed),
        };
        self.read_line_words(index, header, slot, out)
    }

    /// [`Consumer::read_line`] off the fast path, given the slot's header word as read: validates
    /// it and copies the payload word by word. Out of line, keeping the inlined pop small.
    #[inline(never)]
    fn read_line_words(
        &self,
        index: u64,
        header: u64,
        slot: &[AtomicU64; LINE_WORDS],
        out: &mut [u8],
    ) -> Result<usize, RingError> {
        let len = self.check_header(index, header)?;
        let available = out.len();
        let Some(target) = out.get_mut(..len) else {
            return Err(buffer_too_small(len, available));
        };
        load_words(&slot[1..], target);
        Ok(len)
    }

    /// [`Consumer::read_slot`] for slots other than one cache line, word by word.
    #[inline(never)]
    fn read_slot_words(&self, index: u64, out: &mut [u8]) -> Result<usize, RingError> {
        let slot = self.shared.slot(index)?;
        let (len, body) = match self.shared.format {
            SlotFormat::Framed => {
                let (header, body) = slot.split_first().ok_or(RingError::OutsideRegion)?;
                (
                    self.check_header(index, header.load(Ordering::Relaxed))?,
                    body,
                )
            }
            SlotFormat::Record => (slot.len() * 8, slot),
        };
        let available = out.len();
        let Some(target) = out.get_mut(..len) else {
            return Err(buffer_too_small(len, available));
        };
        load_words(body, target);
        Ok(len)
    }

    /// Validates and delivers the messages in `run` (whole one-cache-line slots, the first holding
    /// message `index`), copying each into `scratch` first with `read` (one of the `read_*line`
    /// methods). Returns how many were delivered and the error that stopped the run early, if any.
    #[inline(always)]
    fn read_lines(
        &self,
        index: u64,
        run: &[AtomicU64],
        scratch: &mut [u8],
        deliver: &mut impl FnMut(&[u8]),
        read: impl Fn(&Self, u64, &[AtomicU64; LINE_WORDS], &mut [u8]) -> Result<usize, RingError>,
    ) -> (usize, Result<(), RingError>) {
        for (read_so_far, slot) in lines(run).enumerate() {
            match read(self, index.wrapping_add(read_so_far as u64), slot, scratch) {
                Ok(len) => deliver(scratch.get(..len).unwrap_or_default()),
                Err(error) => return (read_so_far, Err(error)),
            }
        }
        (run.len() / LINE_WORDS, Ok(()))
    }

    /// The payload length a slot header announces, if it is a valid header for this ring.
    #[inline(always)]
    fn check_header(&self, index: u64, header: u64) -> Result<usize, RingError> {
        // One comparison covers both rules: any reserved (high) bit makes the header exceed
        // every capacity, which is below 2^32.
        if header > self.payload_capacity() as u64 {
            return Err(bad_header(index, header));
        }
        Ok(header as usize)
    }

    #[inline]
    fn release(&self) {
        self.shared.head.store(self.head, Ordering::Release);
    }

    /// Copies the next message into `out` and frees its slot. `Ok(None)` when the ring is empty.
    #[inline(always)]
    pub fn try_pop(&mut self, out: &mut [u8]) -> Result<Option<usize>, RingError> {
        if self.available()? == 0 {
            return Ok(None);
        }
        let len = self.read_slot(self.head, out)?;
        self.head = self.head.wrapping_add(1);
        self.release();
        Ok(Some(len))
    }

    /// Hands up to `max` messages, in order, to `deliver`, each copied into `scratch` first, then
    /// frees all their slots with one release store. Returns how many were delivered. On an error
    /// the messages before the bad one are delivered and freed; the bad one stays.
    #[inline]
    pub fn pop_batch(
        &mut self,
        scratch: &mut [u8],
        max: usize,
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<usize, RingError> {
        let count = (self.ready(max as u64)? as usize).min(max);
        if count == 0 {
            return Ok(0);
        }
        let start = self.head;
        let end = start.wrapping_add(count as u64);
        let mut outcome = Ok(count);
        if self.shared.is_line_ring() {
            let (ahead, wrapped) = self.shared.slot_runs(start, count);
            let mut done = 0;
            for run in [ahead, wrapped] {
                let index = start.wrapping_add(done as u64);
                // One loop per format, so that no message decides it again.
                let (read, result) = match self.shared.format {
                    SlotFormat::Framed => {
                        self.read_lines(index, run, scratch, &mut deliver, Self::read_line)
                    }
                    SlotFormat::Record => {
                        self.read_lines(index, run, scratch, &mut deliver, Self::read_record_line)
                    }
                };
                done += read;
                if let Err(error) = result {
                    outcome = Err(error);
                    break;
                }
            }
            self.head = start.wrapping_add(done as u64);
        } else {
            while self.head != end {
                match self.read_slot_words(self.head, scratch) {
                    Ok(len) => deliver(scratch.get(..len).unwrap_or_default()),
                    Err(error) => {
                        outcome = Err(error);
                        break;
                    }
                }
                self.head = self.head.wrapping_add(1);
            }
        }
        if self.head != start {
            self.release();
        }
        // Normally `count`; fewer only if a slot run came up short, which a validated layout
        // rules out.
        outcome.map(|_| self.head.wrapping_sub(start) as usize)
    }

    /// Copies the next record into `out` and frees its slot; `Ok(false)` when the ring is empty.
    /// [`Consumer::try_pop`] on a record ring of 64-byte slots (any other ring is refused).
    #[inline(always)]
    pub fn try_pop_record(&mut self, out: &mut Record64) -> Result<bool, RingError> {
        self.shared.require_line_records()?;
        if self.available()? == 0 {
            return Ok(false);
        }
        let slot = self
            .shared
            .line_slot(self.head)
            .ok_or(RingError::OutsideRegion)?;
        copy_line(slot, LineCopy::ReadRecord(&mut out.0));
        self.head = self.head.wrapping_add(1);
        self.release();
        Ok(true)
    }

    /// Copies up to `out.len()` records, in order, into the front of `out`, then frees their
    /// slots with one release store. Returns how many were copied. A record ring of 64-byte slots
    /// only (any other ring is refused before anything is read): a record has nothing to
    /// validate at this level, so the copy loop is whole 64-byte moves and nothing else.
    #[inline]
    pub fn pop_records(&mut self, out: &mut [Record64]) -> Result<usize, RingError> {
        self.shared.require_line_records()?;
        let count = (self.ready(out.len() as u64)? as usize).min(out.len());
        let batch = out.get_mut(..count).unwrap_or_default();
        if batch.is_empty() {
            return Ok(0);
        }
        let start = self.head;
        let (ahead, wrapped) = self.shared.slot_runs(start, count);
        let (first, second) = batch.split_at_mut(count.min(ahead.len() / LINE_WORDS));
        let read = copy_records(ahead, RecordCopy::Read(first))
            + copy_records(wrapped, RecordCopy::Read(second));
        self.head = start.wrapping_add(read as u64);
        self.release();
        Ok(read)
    }

    /// The consumer half of the doorbell rule: raise the waiting flag, fence, look again.
    /// On [`SleepCheck::MaySleep`] the caller sleeps until its doorbell's interrupt (`sti; hlt`,
    /// or a blocking `read()` of the doorbell device) and calls [`Consumer::woke`] afterwards.
    pub fn prepare_to_sleep(&mut self) -> Result<SleepCheck, RingError> {
        self.shared.waiting.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.refresh_tail()? > 0 {
            self.shared.waiting.store(0, Ordering::Relaxed);
            return Ok(SleepCheck::MessagesReady);
        }
        Ok(SleepCheck::MaySleep)
    }

    /// Lowers the waiting flag after a sleep, however it ended (doorbell, timeout, interrupt).
    pub fn woke(&self) {
        self.shared.waiting.store(0, Ordering::Relaxed);
    }

    /// Waits until a message is ready: polls `spins` times (cheap when the producer is active),
    /// then follows the doorbell rule and calls `sleep` until a message arrives.
    pub fn wait_for_message(
        &mut self,
        spins: u32,
        mut sleep: impl FnMut(),
    ) -> Result<(), RingError> {
        for _ in 0..spins {
            if self.available()? > 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        loop {
            if self.available()? > 0 {
                return Ok(());
            }
            if self.prepare_to_sleep()? == SleepCheck::MessagesReady {
                return Ok(());
            }
            sleep();
            self.woke();
        }
    }
}

#[cold]
fn buffer_too_small(needed: usize, available: usize) -> RingError {
    RingError::BufferTooSmall { needed, available }
}

#[cold]
fn bad_header(index: u64, header: u64) -> RingError {
    RingError::BadSlotHeader { index, header }
}

#[cold]
fn not_record64_ring(format: SlotFormat, slot_size: usize) -> RingError {
    RingError::NotRecord64Ring { format, slot_size }
}

#[cold]
fn too_large(len: usize, capacity: usize) -> PushError {
    PushError::TooLarge { len, capacity }
}

/// [`store_words`] out of line: the short-message case of [`store_line`].
#[inline(never)]
fn store_words_outlined(words: &[AtomicU64], bytes: &[u8]) {
    store_words(words, bytes);
}

/// The one-cache-line slots of a run of whole slots.
#[inline(always)]
fn lines(run: &[AtomicU64]) -> impl Iterator<Item = &[AtomicU64; LINE_WORDS]> {
    run.chunks_exact(LINE_WORDS)
        .filter_map(|slot| <&[AtomicU64; LINE_WORDS]>::try_from(slot).ok())
}

/// Writes `payloads` (each checked against the capacity) into the one-cache-line slots of `run`
/// with `store` ([`store_line`] or [`store_record_line`]), in order, as far as both go. Returns
/// how many were written.
#[inline(always)]
fn store_lines(
    run: &[AtomicU64],
    payloads: &[&[u8]],
    store: impl Fn(&[AtomicU64; LINE_WORDS], &[u8]),
) -> usize {
    for (slot, payload) in lines(run).zip(payloads) {
        store(slot, payload);
    }
    payloads.len().min(run.len() / LINE_WORDS)
}

/// Writes a one-cache-line framed slot: header word, then the payload (at most [`LINE_PAYLOAD`]
/// bytes, checked by the caller). A full payload, the common case, is written whole by
/// [`copy_line`].
#[inline(always)]
fn store_line(slot: &[AtomicU64; LINE_WORDS], payload: &[u8]) {
    if let Ok(full) = <&[u8; LINE_PAYLOAD]>::try_from(payload) {
        copy_line(slot, LineCopy::WriteFramed(full));
        return;
    }
    slot[0].store(payload.len() as u64, Ordering::Relaxed);
    store_words_outlined(&slot[1..], payload);
}

/// Writes a one-cache-line record slot: the payload (at most [`CACHE_LINE`] bytes, checked by the
/// caller), zero-padded. A full record, the common case, is written whole by [`copy_line`].
#[inline(always)]
fn store_record_line(slot: &[AtomicU64; LINE_WORDS], payload: &[u8]) {
    if let Ok(full) = <&[u8; CACHE_LINE]>::try_from(payload) {
        copy_line(slot, LineCopy::WriteRecord(full));
        return;
    }
    store_record_words(slot, payload);
}

/// Writes a record slot word by word: `bytes` (at most the slot, checked by the caller), then
/// zeroes up to the slot's end, so that a short record carries no stale bytes of an older one.
/// Out of line: the short-record case of [`store_record_line`], and the slots other than one
/// cache line.
#[inline(never)]
fn store_record_words(words: &[AtomicU64], bytes: &[u8]) {
    store_words(words, bytes);
    for word in words.iter().skip(bytes.len().div_ceil(8)) {
        word.store(0, Ordering::Relaxed);
    }
}

/// The header word of a framed slot carrying a full [`LINE_PAYLOAD`]-byte payload.
const FULL_LINE_HEADER: u64 = LINE_PAYLOAD as u64;

/// Direction, slot format and private end of a [`copy_line`].
enum LineCopy<'p> {
    /// Read a framed slot; copy its payload here only if its header announces a full payload.
    ReadFramed(&'p mut [u8; LINE_PAYLOAD]),
    /// Write this full payload and its header.
    WriteFramed(&'p [u8; LINE_PAYLOAD]),
    /// Read a record slot, all of it.
    ReadRecord(&'p mut [u8; CACHE_LINE]),
    /// Write this record.
    WriteRecord(&'p [u8; CACHE_LINE]),
}

/// Moves a whole one-cache-line slot (a framed one's header word included) as four 16-byte moves:
/// a full message in four instructions each way where word atomics take eight, and four stores
/// per message on the producer, which is what its throughput depends on when the consumer is on
/// another core (see the module documentation). Reading takes one snapshot of the slot: a framed
/// slot's header is taken from it and checked before any payload byte is copied out, so header
/// and payload are one consistent read.
///
/// Returns a framed slot's header word as read (the payload is copied out only if it is
/// [`FULL_LINE_HEADER`]) or written, and 0 for a record, which has none. Where there is no SSE2 (the bare-metal
/// target), under loom, or if the region is not 16-byte aligned, the same is done with word
/// atomics (header first). The 16-byte moves are the only access to region memory that is not an
/// `AtomicU64` operation.
#[inline(always)]
fn copy_line(slot: &[AtomicU64; LINE_WORDS], private: LineCopy<'_>) -> u64 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom)))]
    {
        use core::arch::x86_64::{__m128i, _mm_cvtsi128_si64, _mm_set_epi64x, _mm_unpackhi_epi64};
        use core::ptr::{read_volatile, write_volatile};
        // `AtomicU64` is an `UnsafeCell<u64>`, so the region may be written through this pointer.
        let shared = slot.as_ptr().cast::<__m128i>().cast_mut();
        if shared.is_aligned() {
            // SAFETY:
            // * In bounds and live: `slot` is a reference to 64 bytes of the region, so
            //   `shared.add(0..4)` are four in-bounds 16-byte locations, aligned as just checked.
            //   The private side is an array reference: of 56 bytes for a framed slot, where the
            //   8-byte access at offset 0 and the 16-byte ones at 8, 24 and 40 end at 56 at most,
            //   or of 64 bytes for a record, where the 16-byte accesses at 0, 16, 32 and 48 end at
            //   64 at most; they are unaligned accesses.
            // * No invalid values: `__m128i`, `i64` and `u8` accept every bit pattern, so whatever
            //   the peer wrote is a valid value. Of a framed slot only the header half of the
            //   first load is interpreted, and only after the load: the payload is copied out only
            //   if that value is exactly `FULL_LINE_HEADER`, and the caller validates any other
            //   value. A record is not interpreted here at all.
            // * Races: the memory is shared with the peer, which may write it at any moment. An
            //   honest peer never does while we copy: the consumer copies a slot only after
            //   acquiring a `tail` released after the slot was written, and the producer writes
            //   a slot only after acquiring a `head` released after the consumer's copy. A
            //   hostile peer is another guest or the hypervisor, outside this program; its
            //   writes are external modifications of the memory, as a device's would be. The
            //   accesses are volatile, so each happens exactly once, as one 16-byte `movdqa`
            //   (which the hardware performs as atomic 8-byte halves, like the `AtomicU64`
            //   operations everywhere else); the compiler may neither re-read the region nor
            //   assume what it holds. A racing write can only change which bytes are copied:
            //   the message is garbage, never undefined behaviour.
            let header = unsafe {
                match private {
                    LineCopy::ReadFramed(bytes) => {
                        let line = [
                            read_volatile(shared),
                            read_volatile(shared.add(1)),
                            read_volatile(shared.add(2)),
                            read_volatile(shared.add(3)),
                        ];
                        let header = _mm_cvtsi128_si64(line[0]) as u64;
                        if header == FULL_LINE_HEADER {
                            let private = bytes.as_mut_ptr();
                            let first = _mm_cvtsi128_si64(_mm_unpackhi_epi64(line[0], line[0]));
                            private.cast::<i64>().write_unaligned(first);
                            for (chunk, value) in line.iter().enumerate().skip(1) {
                                private
                                    .add(16 * chunk - 8)
                                    .cast::<__m128i>()
                                    .write_unaligned(*value);
                            }
                        }
                        header
                    }
                    LineCopy::WriteFramed(bytes) => {
                        let private = bytes.as_ptr();
                        let first = private.cast::<i64>().read_unaligned();
                        write_volatile(shared, _mm_set_epi64x(first, FULL_LINE_HEADER as i64));
                        for chunk in 1..4 {
                            let value = private
                                .add(16 * chunk - 8)
                                .cast::<__m128i>()
                                .read_unaligned();
                            write_volatile(shared.add(chunk), value);
                        }
                        FULL_LINE_HEADER
                    }
                    LineCopy::ReadRecord(bytes) => {
                        let private = bytes.as_mut_ptr().cast::<__m128i>();
                        for chunk in 0..4 {
                            private
                                .add(chunk)
                                .write_unaligned(read_volatile(shared.add(chunk)));
                        }
                        0
                    }
                    LineCopy::WriteRecord(bytes) => {
                        let private = bytes.as_ptr().cast::<__m128i>();
                        for chunk in 0..4 {
                            write_volatile(shared.add(chunk), private.add(chunk).read_unaligned());
                        }
                        0
                    }
                }
            };
            return header;
        }
    }
    let [header, payload @ ..] = slot;
    match private {
        LineCopy::ReadRecord(bytes) => {
            load_words(slot, bytes);
            0
        }
        LineCopy::WriteRecord(bytes) => {
            store_words(slot, bytes);
            0
        }
        LineCopy::ReadFramed(bytes) => {
            let value = header.load(Ordering::Relaxed);
            if value == FULL_LINE_HEADER {
                load_words(payload, bytes);
            }
            value
        }
        LineCopy::WriteFramed(bytes) => {
            header.store(FULL_LINE_HEADER, Ordering::Relaxed);
            store_words(payload, bytes);
            FULL_LINE_HEADER
        }
    }
}

/// Direction and private end of a [`copy_records`].
enum RecordCopy<'p> {
    /// Read record slots into these records.
    Read(&'p mut [Record64]),
    /// Write these records into record slots.
    Write(&'p [Record64]),
}

/// [`copy_line`] of records for a whole batch: moves records between the one-cache-line record
/// slots of `run` and private [`Record64`]s, in order, as far as both go, and returns how many.
/// Each record is four 16-byte moves each way, and nothing is decided per record: the alignment
/// of the run is checked once (slots are 64 bytes, so every slot of an aligned run is aligned),
/// and a record has no header to interpret. Where there is no SSE2, under loom, or on a region
/// not 16-byte aligned, the same is done with word atomics.
#[inline(always)]
fn copy_records(run: &[AtomicU64], private: RecordCopy<'_>) -> usize {
    let slots = run.len() / LINE_WORDS;
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom)))]
    {
        use core::arch::x86_64::__m128i;
        use core::ptr::{read_volatile, write_volatile};
        // `AtomicU64` is an `UnsafeCell<u64>`, so the region may be written through this pointer.
        let shared = run.as_ptr().cast::<__m128i>().cast_mut();
        if shared.is_aligned() {
            let count = match &private {
                RecordCopy::Read(records) => records.len().min(slots),
                RecordCopy::Write(records) => records.len().min(slots),
            };
            // SAFETY: as for `copy_line`, whose argument this repeats per record:
            // * In bounds and live: `run` is a reference to `slots * 64` bytes of the region and
            //   `count <= slots`, so `shared.add(0..4 * count)` are in-bounds 16-byte locations,
            //   aligned as just checked (the run's start is, and every offset is a multiple of
            //   16). The private side is `count` or more `Record64`s, contiguous, each 64 bytes
            //   and 64-byte aligned, so `private.add(0..4 * count)` are in-bounds, aligned
            //   16-byte locations too.
            // * No invalid values: `__m128i` and `u8` accept every bit pattern, so whatever the
            //   peer wrote is a valid record; nothing here interprets it.
            // * Races: as for `copy_line`: an honest peer never writes a slot while we copy it
            //   (the release/acquire of `tail` and `head` orders the copies), and a hostile one's
            //   writes are external modifications that volatile 16-byte accesses (performed as
            //   atomic 8-byte halves) turn into garbage records, never undefined behaviour.
            unsafe {
                match private {
                    RecordCopy::Read(records) => {
                        let private = records.as_mut_ptr().cast::<__m128i>();
                        for chunk in 0..4 * count {
                            private.add(chunk).write(read_volatile(shared.add(chunk)));
                        }
                    }
                    RecordCopy::Write(records) => {
                        let private = records.as_ptr().cast::<__m128i>();
                        for chunk in 0..4 * count {
                            write_volatile(shared.add(chunk), private.add(chunk).read());
                        }
                    }
                }
            }
            return count;
        }
    }
    match private {
        RecordCopy::Read(records) => {
            for (slot, record) in lines(run).zip(records.iter_mut()) {
                load_words(slot, &mut record.0);
            }
            records.len().min(slots)
        }
        RecordCopy::Write(records) => {
            for (slot, record) in lines(run).zip(records) {
                store_words(slot, &record.0);
            }
            records.len().min(slots)
        }
    }
}

/// Copies `bytes` into `words` (little-endian), zero-padding the last word. Whole words go
/// through a fixed-size path (plain 8-byte moves); only a final partial word is assembled.
#[inline(always)]
fn store_words(words: &[AtomicU64], bytes: &[u8]) {
    let mut chunks = bytes.chunks_exact(8);
    let mut targets = words.iter();
    // `chunks` first: `zip` stops on it without taking a word the remainder needs.
    for (chunk, target) in (&mut chunks).zip(&mut targets) {
        let mut value = [0u8; 8];
        value.copy_from_slice(chunk);
        target.store(u64::from_le_bytes(value), Ordering::Relaxed);
    }
    let rest = chunks.remainder();
    if let Some(target) = targets.next().filter(|_| !rest.is_empty()) {
        let mut value = [0u8; 8];
        value[..rest.len()].copy_from_slice(rest);
        target.store(u64::from_le_bytes(value), Ordering::Relaxed);
    }
}

/// Fills `bytes` from `words` (little-endian), the same way round as [`store_words`].
#[inline(always)]
fn load_words(words: &[AtomicU64], bytes: &mut [u8]) {
    let mut chunks = bytes.chunks_exact_mut(8);
    let mut sources = words.iter();
    for (chunk, source) in (&mut chunks).zip(&mut sources) {
        chunk.copy_from_slice(&source.load(Ordering::Relaxed).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if let Some(source) = sources.next().filter(|_| !rest.is_empty()) {
        let value = source.load(Ordering::Relaxed).to_le_bytes();
        rest.copy_from_slice(&value[..rest.len()]);
    }
}
