//! The core manager: the only writer of who owns each physical core and in which state
//! of a move it is (`Owned -> Releasing -> Parked -> Granted -> Owned`). One atomic word
//! per core (`word`), changed by compare-and-swap, so every check-then-act (a STARTUP IPI
//! against a withdrawn grant, a start request against a new owner) is one atomic step;
//! and a record per core of the current move (`record`). The single source of truth for
//! IPI filtering, INIT/SIPI emulation, `QUERY_CORE` and the core test.
//!
//! Pure logic, host-tested (`cargo test -p hypervisor`, and `tests/loom_cores.rs` under
//! `--cfg loom`); the callers pass the time (TSC) of each stage.

mod ipi_senders;
mod record;
mod sync;
mod wake;
mod word;

pub use ipi_senders::IpiSenders;
pub use record::{MoveRecord, Reason, Requester, Stage};
pub use wake::WakeFlag;
pub use word::{CoreWord, Move, Refused};

use record::Record;
use sync::{AtomicU64, Ordering};
use vmcall_proto::hypercall::CoreState;

use crate::platform::MAX_CPUS;

/// Ownership of `N` cores (the machine's table is [`CORES`]).
pub struct CoreManager<const N: usize = MAX_CPUS> {
    words: [AtomicU64; N],
    records: [Record; N],
}

/// The machine's cores.
#[cfg(not(loom))]
pub static CORES: CoreManager = CoreManager::new();

impl<const N: usize> Default for CoreManager<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> CoreManager<N> {
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            words: [const { AtomicU64::new(CoreWord::PARKED.to_u64()) }; N],
            records: [const { Record::new() }; N],
        }
    }

    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            words: core::array::from_fn(|_| AtomicU64::new(CoreWord::PARKED.to_u64())),
            records: core::array::from_fn(|_| Record::new()),
        }
    }

    /// The word of `core` (parked for a core that does not exist).
    #[inline]
    pub fn word(&self, core: usize) -> CoreWord {
        self.words.get(core).map_or(CoreWord::PARKED, |w| {
            CoreWord::from_u64(w.load(Ordering::Acquire))
        })
    }

    /// The guest owning `core`, `None` while the hypervisor holds it.
    pub fn owner(&self, core: usize) -> Option<u8> {
        self.word(core).owner
    }

    pub fn state(&self, core: usize) -> CoreState {
        self.word(core).state
    }

    pub fn record(&self, core: usize) -> Option<MoveRecord> {
        self.records.get(core).map(Record::read)
    }

    /// The TSC of `stage` in the record of `core` (0: not reached), without a copy of the
    /// whole record (a core that parks reads its own on its way to the grant).
    pub fn stamp_of(&self, core: usize, stage: Stage) -> u64 {
        self.records.get(core).map_or(0, |r| r.at(stage))
    }

    /// Applies `mv` to `core` with compare-and-swap (retried while other moves of the same
    /// core land in between): the new word, or why the move does not apply.
    pub fn apply(&self, core: usize, mv: Move) -> Result<CoreWord, Refused> {
        self.apply_encoded(core, mv).map(CoreWord::from_u64)
    }

    /// [`Self::apply`], giving the new word encoded. Inlined into each move below, where
    /// `mv` is known, so that the moves on a guest's path are a load, a few bit operations
    /// and the compare-and-swap.
    #[inline(always)]
    fn apply_encoded(&self, core: usize, mv: Move) -> Result<u64, Refused> {
        let word = self.words.get(core).ok_or(Refused::NoCore)?;
        let mut current = word.load(Ordering::Acquire);
        loop {
            let next = word::apply_raw(current, mv)?;
            match word.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(next),
                Err(seen) => current = seen,
            }
        }
    }

    /// Grants parked `core` to `guest`; its generation, which the start request carries.
    pub fn grant(
        &self,
        core: usize,
        guest: u8,
        by: Requester,
        why: Reason,
        now: u64,
    ) -> Result<u32, Refused> {
        let generation = word::generation(self.apply_encoded(core, Move::Grant { guest })?);
        self.records[core].begin(generation, by, why, now);
        Ok(generation)
    }

    /// Takes back a grant `guest` has not started.
    pub fn withdraw(
        &self,
        core: usize,
        guest: u8,
        by: Requester,
        why: Reason,
        now: u64,
    ) -> Result<(), Refused> {
        self.end(core, Move::Withdraw { guest }, by, why, now)
    }

    /// The vCPU of `guest` enters `core` for the grant of `generation`: refused if the
    /// grant was withdrawn meanwhile.
    #[inline]
    pub fn enter(&self, core: usize, guest: u8, generation: u32, now: u64) -> Result<(), Refused> {
        self.apply_encoded(core, Move::Enter { guest, generation })?;
        self.records[core].stamp(Stage::Entered, now);
        Ok(())
    }

    /// Asks `guest` to give `core` back (it is told so by its control channel).
    pub fn revoke(&self, core: usize, guest: u8, by: Requester, now: u64) -> Result<(), Refused> {
        let word = self.apply_encoded(core, Move::Revoke { guest })?;
        let record = &self.records[core];
        record.note(word::generation(word), by, Reason::Revoke);
        record.stamp(Stage::Revoked, now);
        Ok(())
    }

    /// The release deadline of `core` passed: its vCPU leaves at its next exit (the caller
    /// makes it exit with an NMI) and never enters again.
    pub fn force(&self, core: usize, guest: u8, by: Requester) -> Result<(), Refused> {
        let word = self.apply_encoded(core, Move::Force { guest })?;
        self.records[core].note(word::generation(word), by, Reason::Deadline);
        Ok(())
    }

    /// Calls off the revoke of `core`: it stays `guest`'s (`Owned` again).
    pub fn cancel(&self, core: usize, guest: u8, by: Requester) -> Result<(), Refused> {
        let word = self.apply(core, Move::Cancel { guest })?;
        self.records[core].note(word.generation, by, Reason::Cancelled);
        Ok(())
    }

    /// Whether a vCPU of `guest` runs on `core` ([`CoreWord::runs`], on the encoded word).
    #[inline]
    pub fn runs(&self, core: usize, guest: u8) -> bool {
        self.words
            .get(core)
            .is_some_and(|w| word::runs_raw(w.load(Ordering::Acquire), guest))
    }

    /// Whether the vCPU on `core` must leave now (checked before every VM entry).
    #[inline]
    pub fn force_requested(&self, core: usize) -> bool {
        self.words
            .get(core)
            .is_some_and(|w| w.load(Ordering::Acquire) & word::FORCE != 0)
    }

    /// The vCPU of `guest` on `core` ended: the core is the hypervisor's.
    pub fn park(
        &self,
        core: usize,
        guest: u8,
        by: Requester,
        why: Reason,
        now: u64,
    ) -> Result<(), Refused> {
        self.end(core, Move::Park { guest }, by, why, now)
    }

    /// A move that ends the core's current move (withdraw, park): the record is closed.
    /// Inlined into each, so that the move's bit operations are the known move's only.
    #[inline(always)]
    fn end(
        &self,
        core: usize,
        mv: Move,
        by: Requester,
        why: Reason,
        now: u64,
    ) -> Result<(), Refused> {
        let word = self.apply_encoded(core, mv)?;
        self.finish(core, word::generation(word), by, why, now);
        Ok(())
    }

    /// The vCPU of `guest` on `core` went offline: the core stays granted to it.
    pub fn offline(&self, core: usize, guest: u8) -> Result<(), Refused> {
        let word = self.apply_encoded(core, Move::Offline { guest })?;
        self.records[core].note(word::generation(word), Requester::Guest, Reason::Halted);
        Ok(())
    }

    /// An INIT IPI from `guest` to `core`, which it was granted: the core awaits a STARTUP
    /// IPI (again).
    #[inline]
    pub fn init(&self, core: usize, guest: u8) -> Result<(), Refused> {
        self.apply_encoded(core, Move::Init { guest }).map(|_| ())
    }

    /// A STARTUP IPI from `guest` to `core`: taken if the core awaits one (it was granted,
    /// offlined or sent an INIT since its last STARTUP), in the same step as it checks the
    /// grant still holds. The generation the start request carries.
    #[inline]
    pub fn startup(&self, core: usize, guest: u8, now: u64) -> Result<u32, Refused> {
        let word = self.apply_encoded(core, Move::Startup { guest })?;
        self.records[core].stamp(Stage::Startup, now);
        Ok(word::generation(word))
    }

    /// Stamps a stage that is not a change of state (the mailbox taken, a release call).
    pub fn stamp(&self, core: usize, stage: Stage, now: u64) {
        if let Some(record) = self.records.get(core) {
            record.stamp(stage, now);
        }
    }

    fn finish(&self, core: usize, generation: u32, by: Requester, why: Reason, now: u64) {
        let record = &self.records[core];
        record.note(generation, by, why);
        record.stamp(Stage::Parked, now);
    }

    /// The encoded words, for the scans below: they test a few bits of each word rather
    /// than decode it (the core test's doorbell waits on `first_owned`).
    fn raw_words(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .enumerate()
    }

    fn mask(&self, keep: impl Fn(u64) -> bool) -> u64 {
        self.raw_words()
            .filter(|&(_, raw)| keep(raw))
            .fold(0, |mask, (c, _)| mask | 1 << c)
    }

    /// Bit mask of the cores `guest` holds in any state (granted, owned, releasing).
    pub fn cores_of(&self, guest: u8) -> u64 {
        self.mask(|raw| word::held_by(raw, guest))
    }

    /// Bit mask of the cores `guest`'s vCPUs run on (owned or releasing).
    pub fn running_cores(&self, guest: u8) -> u64 {
        self.mask(|raw| word::runs_raw(raw, guest))
    }

    /// The lowest core `guest` runs on and keeps (`Owned`): where it hears of new grants.
    pub fn first_owned(&self, guest: u8) -> Option<usize> {
        self.raw_words()
            .find(|&(_, raw)| word::is(raw, CoreState::Owned, guest))
            .map(|(c, _)| c)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
