//! One core's ownership packed in one 64-bit word, and the moves between its states. Pure:
//! [`CoreWord::apply`] says what a move makes of a word, or why it is refused; the table
//! (`super::table`) installs the result with one compare-and-swap.
//!
//! Layout: bits 0..8 state, 8..16 owner (0xff: the hypervisor), bit 16 the core awaits a
//! STARTUP IPI, bit 17 a forced release is asked for, bits 32..64 the generation. The
//! generation counts grants: a start request carries the generation it was made for, so a
//! grant withdrawn and given again is never confused with the old one.
//!
//! A granted core has never run for its owner, or has halted for good (an offlined CPU): it
//! is modelled as an application processor just out of reset or INIT, in the wait-for-SIPI
//! state, where a STARTUP IPI alone starts it and one to a processor not in that state is
//! ignored (Intel SDM Vol. 3A §9.4, MP initialization; §11.6.1, the Start-Up delivery
//! mode). So a guest may start the core with STARTUP alone, or with the INIT, STARTUP,
//! STARTUP of the MP protocol (Linux), whose second STARTUP finds the core started.

use vmcall_proto::hypercall::CoreState;

const NO_OWNER: u8 = u8::MAX;
const AWAITS_STARTUP: u64 = 1 << 16;
pub(super) const FORCE: u64 = 1 << 17;

/// A decoded core word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreWord {
    pub state: CoreState,
    /// The guest id holding the core; `None` exactly when `Parked`.
    pub owner: Option<u8>,
    /// The core waits for a STARTUP IPI (only while `Granted`, from the grant, an offline
    /// or an INIT until the STARTUP): the next one from the owner starts it.
    pub awaits_startup: bool,
    /// The owner missed its release deadline (only while `Releasing`): the vCPU leaves
    /// at its next exit and never enters again.
    pub force: bool,
    pub generation: u32,
}

/// A change of one core's ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// `Parked -> Granted`: the core is given to `guest` (a new generation).
    Grant { guest: u8 },
    /// `Granted -> Parked`: a grant the guest has not started is taken back.
    Withdraw { guest: u8 },
    /// `Granted -> Owned`: the vCPU of `guest` enters on the core, for the grant of
    /// `generation`.
    Enter { guest: u8, generation: u32 },
    /// `Owned -> Releasing`: the guest is asked to give the core back.
    Revoke { guest: u8 },
    /// `Releasing`: the deadline passed; the core is taken at the vCPU's next exit.
    Force { guest: u8 },
    /// `Releasing -> Owned`: the revoke is called off (a guest that is never forced could
    /// not give the core back in time, or refused); not once a release was forced.
    Cancel { guest: u8 },
    /// `Owned | Releasing | Granted -> Parked`: the vCPU of `guest` ended (released,
    /// forced off, halted, stopped, or never started) and the core is the hypervisor's.
    Park { guest: u8 },
    /// `Owned -> Granted`: the vCPU halted for good while others of its guest run (an
    /// offlined CPU); the core stays the guest's, awaiting a STARTUP IPI again.
    Offline { guest: u8 },
    /// `Granted`: an INIT IPI from the owner; the core awaits a STARTUP IPI (again).
    Init { guest: u8 },
    /// `Granted` and awaiting a STARTUP IPI: one from the owner starts the core.
    Startup { guest: u8 },
}

/// Why a move was refused; the word is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The core is not the asking guest's (or, for a grant, it is someone's).
    NotOwner,
    /// The core is in a state the move does not start from.
    WrongState(CoreState),
    /// A STARTUP IPI to a core that awaits none: it was started already (the second
    /// STARTUP of the MP protocol), and no INIT came since.
    NotAwaitingStartup,
    /// A start for a grant that was withdrawn (and maybe granted again) since.
    StaleGrant,
    /// 0xff is the hypervisor's, not a guest id.
    BadGuest,
    /// No such core.
    NoCore,
}

impl CoreWord {
    /// A core the hypervisor holds, before any grant.
    pub const PARKED: Self = Self {
        state: CoreState::Parked,
        owner: None,
        awaits_startup: false,
        force: false,
        generation: 0,
    };

    #[inline]
    pub const fn to_u64(self) -> u64 {
        let owner = match self.owner {
            Some(guest) => guest,
            None => NO_OWNER,
        };
        let mut raw = self.state as u64 | (owner as u64) << 8 | (self.generation as u64) << 32;
        if self.awaits_startup {
            raw |= AWAITS_STARTUP;
        }
        if self.force {
            raw |= FORCE;
        }
        raw
    }

    /// Decodes a word written by [`Self::to_u64`] (the table never holds anything else).
    #[inline]
    pub fn from_u64(raw: u64) -> Self {
        let state = match raw & 0xff {
            1 => CoreState::Owned,
            2 => CoreState::Releasing,
            4 => CoreState::Granted,
            _ => CoreState::Parked,
        };
        let owner = (raw >> 8) as u8;
        Self {
            state,
            owner: (owner != NO_OWNER).then_some(owner),
            awaits_startup: raw & AWAITS_STARTUP != 0,
            force: raw & FORCE != 0,
            generation: (raw >> 32) as u32,
        }
    }

    /// Whether the word is one the moves can produce: an owner exactly when not parked,
    /// the STARTUP flag only while granted, the force flag only while releasing.
    pub fn is_consistent(self) -> bool {
        (self.state == CoreState::Parked) == self.owner.is_none()
            && (!self.awaits_startup || self.state == CoreState::Granted)
            && (!self.force || self.state == CoreState::Releasing)
            && self.owner != Some(NO_OWNER)
    }

    /// Whether `guest`'s vCPU runs on the core (it may be asked to leave).
    #[inline]
    pub fn runs(self, guest: u8) -> bool {
        self.owner == Some(guest) && matches!(self.state, CoreState::Owned | CoreState::Releasing)
    }

    /// The word after `mv`, or why `mv` does not apply to this word.
    #[inline]
    pub fn apply(self, mv: Move) -> Result<Self, Refused> {
        use CoreState::*;
        let guest = match mv {
            Move::Grant { guest }
            | Move::Withdraw { guest }
            | Move::Enter { guest, .. }
            | Move::Revoke { guest }
            | Move::Force { guest }
            | Move::Cancel { guest }
            | Move::Park { guest }
            | Move::Offline { guest }
            | Move::Init { guest }
            | Move::Startup { guest } => guest,
        };
        if guest == NO_OWNER {
            return Err(Refused::BadGuest);
        }
        if let Move::Grant { .. } = mv {
            return match self.state {
                Parked => Ok(Self {
                    state: Granted,
                    owner: Some(guest),
                    awaits_startup: true,
                    force: false,
                    generation: self.generation.wrapping_add(1),
                }),
                _ => Err(Refused::NotOwner),
            };
        }
        if self.owner != Some(guest) {
            return Err(Refused::NotOwner);
        }
        let parked = Self {
            generation: self.generation,
            ..Self::PARKED
        };
        match (mv, self.state) {
            (Move::Withdraw { .. }, Granted) => Ok(parked),
            (Move::Enter { generation, .. }, Granted) if generation == self.generation => {
                Ok(Self {
                    state: Owned,
                    awaits_startup: false,
                    ..self
                })
            }
            (Move::Enter { .. }, Granted) => Err(Refused::StaleGrant),
            (Move::Revoke { .. }, Owned) => Ok(Self {
                state: Releasing,
                ..self
            }),
            (Move::Force { .. }, Releasing) => Ok(Self {
                force: true,
                ..self
            }),
            (Move::Cancel { .. }, Releasing) if !self.force => Ok(Self {
                state: Owned,
                ..self
            }),
            (Move::Park { .. }, Owned | Releasing | Granted) => Ok(parked),
            (Move::Offline { .. }, Owned) => Ok(Self {
                state: Granted,
                awaits_startup: true,
                ..self
            }),
            (Move::Init { .. }, Granted) => Ok(Self {
                awaits_startup: true,
                ..self
            }),
            (Move::Startup { .. }, Granted) if self.awaits_startup => Ok(Self {
                awaits_startup: false,
                ..self
            }),
            (Move::Startup { .. }, Granted) => Err(Refused::NotAwaitingStartup),
            (_, state) => Err(Refused::WrongState(state)),
        }
    }
}

/// The low half of a word: state and owner.
const STATE_OWNER: u64 = 0xffff;
const GENERATION: u64 = 0xffff_ffff << 32;

/// `state` and `guest` as the low half of a word.
const fn held(state: CoreState, guest: u8) -> u64 {
    state as u64 | (guest as u64) << 8
}

/// The low half of a parked word.
const PARKED_LOW: u64 = held(CoreState::Parked, NO_OWNER);

/// The generation of an encoded word.
#[inline(always)]
pub(super) const fn generation(raw: u64) -> u32 {
    (raw >> 32) as u32
}

/// Whether the encoded word says `guest` holds the core, in any state (the decoded word's
/// `owner == Some(guest)`; 0xff is never an owner).
#[inline(always)]
pub(super) fn held_by(raw: u64, guest: u8) -> bool {
    guest != NO_OWNER && (raw >> 8) as u8 == guest
}

/// Whether the encoded word is `state` held by `guest` (0xff never matches: a word with no
/// owner is `Parked`, which no caller asks for).
#[inline(always)]
pub(super) fn is(raw: u64, state: CoreState, guest: u8) -> bool {
    raw & STATE_OWNER == held(state, guest)
}

/// [`CoreWord::runs`] on the encoded word.
#[inline(always)]
pub(super) fn runs_raw(raw: u64, guest: u8) -> bool {
    is(raw, CoreState::Owned, guest) || is(raw, CoreState::Releasing, guest)
}

/// [`CoreWord::apply`] on the encoded word. The moves on the paths a guest waits on (grant,
/// INIT, STARTUP, entry, revoke, park) are a few bit operations, inlined where the move is
/// known, so that each is a handful of instructions (a VM exit's bookkeeping is counted in
/// microseconds under Bochs); anything else, and every refusal, goes through the decoded
/// word, out of line. The two agree on every consistent word (tested).
#[inline(always)]
pub fn apply_raw(raw: u64, mv: Move) -> Result<u64, Refused> {
    use CoreState::*;
    let fast = match mv {
        // A parked word has no owner and no flags; the generation counts the grant, and the
        // granted core awaits a STARTUP IPI.
        Move::Grant { guest } if guest != NO_OWNER && raw & STATE_OWNER == PARKED_LOW => {
            Some((raw & GENERATION).wrapping_add(1 << 32) | held(Granted, guest) | AWAITS_STARTUP)
        }
        Move::Init { guest } if raw & STATE_OWNER == held(Granted, guest) => {
            Some(raw | AWAITS_STARTUP)
        }
        Move::Startup { guest }
            if raw & (STATE_OWNER | AWAITS_STARTUP) == held(Granted, guest) | AWAITS_STARTUP =>
        {
            Some(raw & !AWAITS_STARTUP)
        }
        Move::Enter { guest, generation }
            if raw & STATE_OWNER == held(Granted, guest) && (raw >> 32) as u32 == generation =>
        {
            Some(raw & GENERATION | held(Owned, guest))
        }
        Move::Revoke { guest } if raw & STATE_OWNER == held(Owned, guest) => {
            Some(raw & GENERATION | held(Releasing, guest))
        }
        Move::Park { guest }
            if raw & STATE_OWNER == held(Owned, guest)
                || raw & STATE_OWNER == held(Releasing, guest) =>
        {
            Some(raw & GENERATION | held(Parked, NO_OWNER))
        }
        _ => None,
    };
    match fast {
        // 0xff never passes these checks as a guest: a word never holds it as an owner
        // with a state other than `Parked`.
        Some(next) => Ok(next),
        None => apply_decoded(raw, mv),
    }
}

/// The moves and refusals [`apply_raw`] leaves to the decoded word.
#[cold]
#[inline(never)]
fn apply_decoded(raw: u64, mv: Move) -> Result<u64, Refused> {
    CoreWord::from_u64(raw).apply(mv).map(CoreWord::to_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_move_round_trips_through_the_encoding() {
        let mut word = CoreWord::PARKED;
        for mv in [
            Move::Grant { guest: 1 },
            Move::Startup { guest: 1 },
            Move::Enter {
                guest: 1,
                generation: 1,
            },
            Move::Offline { guest: 1 },
            Move::Init { guest: 1 },
            Move::Startup { guest: 1 },
            Move::Enter {
                guest: 1,
                generation: 1,
            },
            Move::Revoke { guest: 1 },
            Move::Force { guest: 1 },
            Move::Park { guest: 1 },
        ] {
            word = word.apply(mv).unwrap();
            assert!(word.is_consistent(), "{mv:?} -> {word:?}");
            assert_eq!(CoreWord::from_u64(word.to_u64()), word);
        }
        assert_eq!(word.state, CoreState::Parked);
        assert_eq!(word.generation, 1);
    }

    /// Every consistent word (all states, owners 0, 1 and none, both flags, two generations)
    /// under every move (guests 0, 1 and 0xff, two generations): the bit-level path gives what
    /// the decoded one does.
    #[test]
    fn the_fast_path_agrees_with_the_decoded_word() {
        let states = [
            CoreState::Owned,
            CoreState::Releasing,
            CoreState::Parked,
            CoreState::Granted,
        ];
        let mut words = std::vec::Vec::new();
        for state in states {
            for owner in [Some(0), Some(1), None] {
                for (awaits_startup, force) in [(false, false), (true, false), (false, true)] {
                    for generation in [0, 1, u32::MAX] {
                        let word = CoreWord {
                            state,
                            owner,
                            awaits_startup,
                            force,
                            generation,
                        };
                        if word.is_consistent() {
                            words.push(word);
                        }
                    }
                }
            }
        }
        for &word in &words {
            for guest in [0, 1, 0xff] {
                let raw = word.to_u64();
                assert_eq!(held_by(raw, guest), word.owner == Some(guest), "{word:?}");
                assert_eq!(runs_raw(raw, guest), word.runs(guest), "{word:?}");
                for state in states {
                    assert_eq!(
                        is(raw, state, guest) && state != CoreState::Parked,
                        word.owner == Some(guest)
                            && word.state == state
                            && state != CoreState::Parked,
                        "{word:?} {state:?}"
                    );
                }
                assert_eq!(generation(raw), word.generation);
            }
        }
        for word in words {
            for guest in [0, 1, 0xff] {
                for generation in [0, 1, u32::MAX] {
                    for mv in [
                        Move::Grant { guest },
                        Move::Withdraw { guest },
                        Move::Enter { guest, generation },
                        Move::Revoke { guest },
                        Move::Force { guest },
                        Move::Park { guest },
                        Move::Offline { guest },
                        Move::Init { guest },
                        Move::Startup { guest },
                    ] {
                        assert_eq!(
                            apply_raw(word.to_u64(), mv),
                            word.apply(mv).map(CoreWord::to_u64),
                            "{word:?} {mv:?}"
                        );
                    }
                }
            }
        }
    }

    /// A granted core, and an offlined one, await a STARTUP IPI: one alone starts it, a
    /// second is refused until an INIT (Linux's INIT, STARTUP, STARTUP; or STARTUP alone).
    #[test]
    fn a_granted_or_offlined_core_awaits_one_startup() {
        let granted = CoreWord::PARKED.apply(Move::Grant { guest: 0 }).unwrap();
        assert!(granted.awaits_startup);
        let started = granted.apply(Move::Startup { guest: 0 }).unwrap();
        assert_eq!(
            (started.state, started.awaits_startup),
            (CoreState::Granted, false)
        );
        assert_eq!(
            started.apply(Move::Startup { guest: 0 }),
            Err(Refused::NotAwaitingStartup)
        );
        let init_again = started.apply(Move::Init { guest: 0 }).unwrap();
        assert_eq!(init_again, granted);
        // INIT before the first STARTUP changes nothing: the core awaits one already.
        assert_eq!(granted.apply(Move::Init { guest: 0 }), Ok(granted));
        let offline = started
            .apply(Move::Enter {
                guest: 0,
                generation: granted.generation,
            })
            .and_then(|w| w.apply(Move::Offline { guest: 0 }))
            .unwrap();
        assert_eq!(offline, granted);
        assert!(offline.apply(Move::Startup { guest: 0 }).is_ok());
    }

    #[test]
    fn refusals() {
        let granted = CoreWord::PARKED.apply(Move::Grant { guest: 0 }).unwrap();
        assert_eq!(
            granted.apply(Move::Grant { guest: 1 }),
            Err(Refused::NotOwner)
        );
        assert_eq!(
            granted.apply(Move::Withdraw { guest: 1 }),
            Err(Refused::NotOwner)
        );
        assert_eq!(
            granted.apply(Move::Startup { guest: 1 }),
            Err(Refused::NotOwner)
        );
        assert_eq!(
            granted.apply(Move::Enter {
                guest: 0,
                generation: 7
            }),
            Err(Refused::StaleGrant)
        );
        assert_eq!(
            granted.apply(Move::Revoke { guest: 0 }),
            Err(Refused::WrongState(CoreState::Granted))
        );
        // A cancelled revoke leaves the core with its owner; a forced one cannot be cancelled.
        let owned = granted
            .apply(Move::Startup { guest: 0 })
            .and_then(|w| {
                w.apply(Move::Enter {
                    guest: 0,
                    generation: granted.generation,
                })
            })
            .unwrap();
        let releasing = owned.apply(Move::Revoke { guest: 0 }).unwrap();
        assert_eq!(releasing.apply(Move::Cancel { guest: 0 }), Ok(owned));
        assert_eq!(
            releasing.apply(Move::Cancel { guest: 1 }),
            Err(Refused::NotOwner)
        );
        let forced = releasing.apply(Move::Force { guest: 0 }).unwrap();
        assert_eq!(
            forced.apply(Move::Cancel { guest: 0 }),
            Err(Refused::WrongState(CoreState::Releasing))
        );
        assert_eq!(
            CoreWord::PARKED.apply(Move::Grant { guest: 0xff }),
            Err(Refused::BadGuest)
        );
        // A grant withdrawn and given again: a start made for the first is stale.
        let again = granted
            .apply(Move::Withdraw { guest: 0 })
            .and_then(|w| w.apply(Move::Grant { guest: 0 }))
            .unwrap();
        assert_eq!(
            again.apply(Move::Enter {
                guest: 0,
                generation: granted.generation
            }),
            Err(Refused::StaleGrant)
        );
    }
}
