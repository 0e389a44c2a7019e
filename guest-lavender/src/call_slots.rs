//! The in-flight table of one delegation connection: a slot per call that may wait for Linux
//! at once. A slot is free, waiting for its reply, answered, or abandoned by a caller that
//! stopped waiting (its bound ran out). An abandoned slot stays taken until its late reply
//! arrives, because Linux may still write the slot's part of the data window.
//!
//! Any thread may deliver a reply (whoever holds the reply ring; deliveries of one table are
//! serialised by that ring's lock); only the slot's caller takes, abandons and releases it. A request id carries its slot in the low byte, so a reply finds
//! its slot without a search, and a stale or forged id (the slot has moved on) is refused.

use core::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};

const FREE: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;
const ABANDONED: u8 = 3;
/// A reply is being written into the slot (between `WAITING` and `DONE`).
const DELIVERING: u8 = 4;

struct Slot {
    state: AtomicU8,
    request_id: AtomicU64,
    outcome: AtomicI64,
}

/// What became of a reply handed to [`CallSlots::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Its caller will find the outcome.
    Answered,
    /// Its caller had given up; the slot is free again.
    LateFreed,
    /// No slot waits for this id (malformed, stale or duplicate).
    Unknown,
}

pub struct CallSlots<const N: usize> {
    slots: [Slot; N],
    next_sequence: AtomicU64,
}

impl<const N: usize> Default for CallSlots<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> CallSlots<N> {
    pub const fn new() -> Self {
        const {
            assert!(
                N > 0 && N <= 256,
                "the slot must fit the request id's low byte"
            )
        };
        Self {
            slots: [const {
                Slot {
                    state: AtomicU8::new(FREE),
                    request_id: AtomicU64::new(0),
                    outcome: AtomicI64::new(0),
                }
            }; N],
            next_sequence: AtomicU64::new(1),
        }
    }

    /// Takes a free slot for a new call: its index, or `None` if all are in flight.
    pub fn take(&self) -> Option<usize> {
        self.slots.iter().position(|slot| {
            slot.state
                .compare_exchange(FREE, WAITING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// A fresh request id for the call in `slot` (taken by the caller), recorded so its reply
    /// can be matched. Called before the request is sent.
    pub fn arm(&self, slot: usize) -> u64 {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let request_id = sequence << 8 | slot as u64;
        self.slots[slot]
            .request_id
            .store(request_id, Ordering::Release);
        request_id
    }

    /// Hands a reply to the slot its id names.
    pub fn deliver(&self, request_id: u64, outcome: i64) -> Delivery {
        let Some(slot) = self.slots.get((request_id & 0xff) as usize) else {
            return Delivery::Unknown;
        };
        if slot.request_id.load(Ordering::Acquire) != request_id {
            return Delivery::Unknown;
        }
        match slot
            .state
            .compare_exchange(WAITING, DELIVERING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                slot.outcome.store(outcome, Ordering::Relaxed);
                slot.state.store(DONE, Ordering::Release);
                Delivery::Answered
            }
            Err(ABANDONED) => {
                // Forget the id first: a duplicate of this reply must not free the slot again
                // after a new caller took it.
                slot.request_id.store(0, Ordering::Relaxed);
                slot.state.store(FREE, Ordering::Release);
                Delivery::LateFreed
            }
            Err(_) => Delivery::Unknown,
        }
    }

    /// The outcome of the call in `slot`, once answered.
    pub fn outcome(&self, slot: usize) -> Option<i64> {
        let slot = &self.slots[slot];
        (slot.state.load(Ordering::Acquire) == DONE).then(|| slot.outcome.load(Ordering::Relaxed))
    }

    /// The caller stops waiting. `false` if the reply came first: then the outcome is there
    /// and the caller still owns the slot.
    pub fn abandon(&self, slot: usize) -> bool {
        self.slots[slot]
            .state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The caller is done with `slot` (answered, or never sent).
    pub fn release(&self, slot: usize) {
        let slot = &self.slots[slot];
        slot.request_id.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }

    /// Slots not free (waiting, answered but not yet released, or abandoned).
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.state.load(Ordering::Acquire) != FREE)
            .count()
    }
}

/// Whether Linux's server looks dead: a caller gave up on it and no reply came since. While
/// it does, new calls get a short bound, so they fail fast (`EIO`) instead of each waiting
/// the full one; any reply (a late one included) ends the suspicion.
pub struct Liveness {
    suspect: core::sync::atomic::AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    pub const fn new() -> Self {
        Self {
            suspect: core::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The bound for a new call: `normal`, or `fast` while the server looks dead.
    pub fn bound(&self, normal: u64, fast: u64) -> u64 {
        if self.suspect.load(Ordering::Acquire) {
            fast
        } else {
            normal
        }
    }

    pub fn gave_up(&self) {
        self.suspect.store(true, Ordering::Release);
    }

    pub fn replied(&self) {
        self.suspect.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_server_makes_new_calls_fail_fast_until_it_answers() {
        let liveness = Liveness::new();
        assert_eq!(liveness.bound(10_000, 200), 10_000);
        liveness.gave_up();
        assert_eq!(liveness.bound(10_000, 200), 200);
        liveness.replied();
        assert_eq!(liveness.bound(10_000, 200), 10_000);
    }

    #[test]
    fn a_reply_reaches_its_caller_once() {
        let slots = CallSlots::<4>::new();
        let slot = slots.take().unwrap();
        let id = slots.arm(slot);
        assert_eq!(id & 0xff, slot as u64);
        assert_eq!(slots.outcome(slot), None);
        assert_eq!(slots.deliver(id, 42), Delivery::Answered);
        assert_eq!(slots.outcome(slot), Some(42));
        assert_eq!(slots.deliver(id, 43), Delivery::Unknown, "a duplicate");
        assert_eq!(slots.outcome(slot), Some(42));
        slots.release(slot);
        assert_eq!(slots.in_flight(), 0);
        assert_eq!(slots.deliver(id, 44), Delivery::Unknown, "after release");
    }

    #[test]
    fn every_slot_in_flight_means_none_to_take() {
        let slots = CallSlots::<4>::new();
        let taken: Vec<usize> = (0..4).map(|_| slots.take().unwrap()).collect();
        assert_eq!(taken, [0, 1, 2, 3]);
        assert_eq!(slots.take(), None);
        assert_eq!(slots.in_flight(), 4);
        slots.release(2);
        assert_eq!(slots.take(), Some(2));
    }

    #[test]
    fn forged_and_stale_ids_are_refused() {
        let slots = CallSlots::<4>::new();
        let slot = slots.take().unwrap();
        let id = slots.arm(slot);
        assert_eq!(
            slots.deliver(id + 256, 1),
            Delivery::Unknown,
            "another sequence"
        );
        assert_eq!(
            slots.deliver(id | 0xff, 1),
            Delivery::Unknown,
            "no such slot"
        );
        assert_eq!(slots.deliver(id ^ 1, 1), Delivery::Unknown, "a free slot");
        assert_eq!(slots.outcome(slot), None);
    }

    #[test]
    fn an_abandoned_slot_waits_for_its_late_reply() {
        let slots = CallSlots::<2>::new();
        let slot = slots.take().unwrap();
        let id = slots.arm(slot);
        assert!(slots.abandon(slot));
        assert_eq!(slots.in_flight(), 1, "Linux may still write the slice");
        assert_eq!(slots.take(), Some(1), "the other slot is still usable");
        assert_eq!(slots.take(), None);
        assert_eq!(slots.deliver(id, -5), Delivery::LateFreed);
        assert_eq!(slots.take(), Some(slot));
        assert_eq!(
            slots.deliver(id, -5),
            Delivery::Unknown,
            "a duplicate late reply"
        );
    }

    #[test]
    fn abandoning_after_the_reply_keeps_the_outcome() {
        let slots = CallSlots::<1>::new();
        let slot = slots.take().unwrap();
        let id = slots.arm(slot);
        assert_eq!(slots.deliver(id, 7), Delivery::Answered);
        assert!(!slots.abandon(slot));
        assert_eq!(slots.outcome(slot), Some(7));
    }

    #[test]
    fn concurrent_callers_each_get_their_own_reply() {
        let slots = std::sync::Arc::new(CallSlots::<4>::new());
        let (sender, replies) = std::sync::mpsc::channel::<(u64, i64)>();
        let server = {
            let slots = slots.clone();
            std::thread::spawn(move || {
                for (id, value) in replies {
                    assert_eq!(slots.deliver(id, value), Delivery::Answered);
                }
            })
        };
        let callers: Vec<_> = (0..4i64)
            .map(|caller| {
                let (slots, sender) = (slots.clone(), sender.clone());
                std::thread::spawn(move || {
                    for call in 0..500i64 {
                        let slot = loop {
                            if let Some(slot) = slots.take() {
                                break slot;
                            }
                            std::thread::yield_now();
                        };
                        let id = slots.arm(slot);
                        let value = caller * 1_000_000 + call;
                        sender.send((id, value)).unwrap();
                        let outcome = loop {
                            if let Some(outcome) = slots.outcome(slot) {
                                break outcome;
                            }
                            std::thread::yield_now();
                        };
                        assert_eq!(outcome, value);
                        slots.release(slot);
                    }
                })
            })
            .collect();
        drop(sender);
        for caller in callers {
            caller.join().unwrap();
        }
        server.join().unwrap();
        assert_eq!(slots.in_flight(), 0);
    }
}
