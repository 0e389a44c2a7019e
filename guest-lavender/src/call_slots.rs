//! The in-flight table of one delegation connection: a slot per call that may wait for Linux
//! at once. A slot is free, waiting for its reply, answered, or abandoned by a caller that
//! stopped waiting (the server died). An abandoned slot stays taken until its late reply
//! arrives, because Linux may still write the slot's part of the data window, or until
//! another server epoch begins: the server it was sent to is gone then, and its successor
//! refuses requests of other epochs without touching their buffers.
//!
//! Any thread may deliver a reply (whoever holds the reply ring; deliveries of one table are
//! serialised by that ring's lock); only the slot's caller takes, abandons and releases it.
//! A request id carries its slot in the low byte (`vmcall_proto::delegation::request_id`),
//! so a reply finds its slot without a search, and a stale or forged id (the slot has moved
//! on) is refused.
//!
//! [`AgentWatch`] judges from the server's heartbeat, and from what the hypervisor says of
//! the server's guest, whether it is alive.

use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};

use vmcall_proto::delegation::{request_id, request_slot};

const FREE: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;
const ABANDONED: u8 = 3;
/// A reply is being written into the slot (between `WAITING` and `DONE`).
const DELIVERING: u8 = 4;

struct Slot {
    state: AtomicU8,
    request_id: AtomicU64,
    /// The server epoch the call was sent to.
    epoch: AtomicU64,
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
                    epoch: AtomicU64::new(0),
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

    /// A fresh request id for the call in `slot` (taken by the caller) to the server of
    /// `epoch`, recorded so its reply can be matched. Called before the request is sent.
    pub fn arm(&self, slot: usize, epoch: u64) -> u64 {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let request_id = request_id(sequence, epoch, slot as u8);
        let slot = &self.slots[slot];
        slot.epoch.store(epoch, Ordering::Relaxed);
        slot.request_id.store(request_id, Ordering::Release);
        request_id
    }

    /// The server epoch the call in `slot` was sent to.
    pub fn epoch(&self, slot: usize) -> u64 {
        self.slots[slot].epoch.load(Ordering::Relaxed)
    }

    /// Hands a reply to the slot its id names.
    pub fn deliver(&self, request_id: u64, outcome: i64) -> Delivery {
        let Some(slot) = self.slots.get(usize::from(request_slot(request_id))) else {
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
            Err(ABANDONED) if Self::free_abandoned(slot) => Delivery::LateFreed,
            Err(_) => Delivery::Unknown,
        }
    }

    /// Frees abandoned slots whose calls went to a server epoch other than `current`: that
    /// server is gone, so nothing will write their slices any more. Returns how many.
    pub fn reclaim(&self, current: u64) -> usize {
        self.slots
            .iter()
            .filter(|slot| {
                slot.state.load(Ordering::Acquire) == ABANDONED
                    && slot.epoch.load(Ordering::Relaxed) != current
                    && Self::free_abandoned(slot)
            })
            .count()
    }

    /// Abandoned -> free, once: a late reply and a reclaim may race for it.
    fn free_abandoned(slot: &Slot) -> bool {
        if slot
            .state
            .compare_exchange(ABANDONED, DELIVERING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // Forget the id first: a duplicate of the late reply must not free the slot again
        // after a new caller took it.
        slot.request_id.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
        true
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

    /// Calls whose callers wait for their replies.
    pub fn waiting(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.state.load(Ordering::Acquire) == WAITING)
            .count()
    }

    /// Slots not free (waiting, answered but not yet released, or abandoned).
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.state.load(Ordering::Acquire) != FREE)
            .count()
    }
}

/// Whether Linux's server is alive, judged from its heartbeat (a counter it advances at least
/// every `vmcall_proto::delegation::HEARTBEAT_PERIOD_MS`): it is dead once every look for
/// `silence` found the same value. Only changes seen by our own looks count, so a server that
/// died long before anyone looked is dead at the first look after `silence` of ours, and a
/// beat seen late only makes the server look alive longer, never dead sooner. Any thread may
/// look; times are the caller's clock ticks (monotonic across cores). Once the hypervisor
/// says the server's guest is down ([`AgentWatch::guest_down`]) it is dead for good, whatever
/// its words say.
pub struct AgentWatch {
    beat: AtomicU64,
    changed_at: AtomicU64,
    down: AtomicBool,
}

impl Default for AgentWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentWatch {
    pub const fn new() -> Self {
        Self {
            beat: AtomicU64::new(0),
            changed_at: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// The guest the server runs in is down: the server will never beat or answer again.
    pub fn guest_down(&self) {
        self.down.store(true, Ordering::Release);
    }

    /// A look at heartbeat `beat` at time `now`: whether the server is alive.
    pub fn alive(&self, beat: u64, now: u64, silence: u64) -> bool {
        if self.down.load(Ordering::Acquire) {
            return false;
        }
        if self.beat.swap(beat, Ordering::AcqRel) != beat {
            self.changed_at.fetch_max(now, Ordering::AcqRel);
            return true;
        }
        now.saturating_sub(self.changed_at.load(Ordering::Acquire)) < silence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_dead_after_a_silence_of_our_looks() {
        let watch = AgentWatch::new();
        assert!(watch.alive(0, 0, 100), "no look yet: not silent");
        assert!(watch.alive(7, 50, 100), "a change");
        assert!(watch.alive(7, 149, 100));
        assert!(!watch.alive(7, 150, 100), "unchanged for the whole silence");
        assert!(!watch.alive(7, 10_000, 100), "dead stays dead");
        assert!(watch.alive(8, 10_001, 100), "a beat brings it back");
        assert!(watch.alive(8, 10_100, 100));
        // A long gap between looks while the server beats is no silence.
        assert!(watch.alive(900, 50_000, 100));
        // A never-started server (beat 0 from the start) is dead after the silence.
        let never = AgentWatch::new();
        assert!(never.alive(0, 99, 100));
        assert!(!never.alive(0, 100, 100));
    }

    #[test]
    fn a_server_whose_guest_is_down_is_dead_at_once_and_for_good() {
        let watch = AgentWatch::new();
        assert!(watch.alive(7, 1_000, 100));
        watch.guest_down();
        assert!(!watch.alive(7, 1_001, 100), "no silence needed");
        assert!(
            !watch.alive(8, 1_002, 100),
            "a word changing later is no beat"
        );
        assert!(!watch.alive(9, 50_000, 100));
    }

    #[test]
    fn a_stale_beat_seen_late_never_makes_it_look_dead_sooner() {
        let watch = AgentWatch::new();
        assert!(watch.alive(5, 1_000, 100));
        // Another core read the beat before it changed and looks after.
        assert!(watch.alive(4, 1_010, 100));
        assert!(watch.alive(5, 1_050, 100));
        assert!(watch.alive(5, 1_149, 100));
        assert!(!watch.alive(5, 1_150, 100));
    }

    #[test]
    fn only_calls_whose_callers_still_wait_count_as_waiting() {
        let slots = CallSlots::<4>::new();
        let answered = slots.take().unwrap();
        let answered_id = slots.arm(answered, 1);
        let abandoned = slots.take().unwrap();
        slots.arm(abandoned, 1);
        let waiting = slots.take().unwrap();
        slots.arm(waiting, 1);
        assert_eq!(slots.waiting(), 3);
        assert_eq!(slots.deliver(answered_id, 0), Delivery::Answered);
        assert!(slots.abandon(abandoned));
        assert_eq!((slots.waiting(), slots.in_flight()), (1, 3));
        slots.release(answered);
        assert_eq!((slots.waiting(), slots.in_flight()), (1, 2));
    }

    #[test]
    fn a_new_epoch_frees_the_calls_its_predecessor_took_with_it() {
        let slots = CallSlots::<4>::new();
        let dead = slots.take().unwrap();
        let dead_id = slots.arm(dead, 1);
        assert_eq!(slots.epoch(dead), 1);
        assert!(slots.abandon(dead));
        assert_eq!(slots.reclaim(1), 0, "the same epoch may still answer");
        let late = slots.take().unwrap();
        let late_id = slots.arm(late, 2);
        assert!(slots.abandon(late));
        assert_eq!(slots.reclaim(2), 1, "epoch 1's server is gone");
        assert_eq!(slots.in_flight(), 1);
        assert_eq!(
            slots.deliver(dead_id, -5),
            Delivery::Unknown,
            "a stale reply for a reclaimed slot"
        );
        assert_eq!(slots.deliver(late_id, 3), Delivery::LateFreed);
        assert_eq!(slots.reclaim(3), 0, "freed once");
        assert_eq!(slots.in_flight(), 0);
        let waiting = slots.take().unwrap();
        slots.arm(waiting, 2);
        assert_eq!(slots.reclaim(3), 0, "only abandoned calls are reclaimed");
    }

    #[test]
    fn a_reply_reaches_its_caller_once() {
        let slots = CallSlots::<4>::new();
        let slot = slots.take().unwrap();
        let id = slots.arm(slot, 1);
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
        let id = slots.arm(slot, 1);
        assert_eq!(
            slots.deliver(id + (1 << 16), 1),
            Delivery::Unknown,
            "another sequence"
        );
        assert_eq!(
            slots.deliver(id + 256, 1),
            Delivery::Unknown,
            "another epoch"
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
        let id = slots.arm(slot, 1);
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
        let id = slots.arm(slot, 1);
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
                        let id = slots.arm(slot, 1);
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
