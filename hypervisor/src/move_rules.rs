//! Which cross-guest core moves a holder may ask for (`CORE_MOVE`): pure rules, host-tested;
//! `moves` runs the moves that pass.

use vmcall_proto::hypercall::Status;

/// What the rules need to know of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCores {
    /// Cores the guest may ever hold (bit mask).
    pub allowed: u64,
    /// The core the guest booted on, which it keeps.
    pub boot_core: usize,
}

/// Why a move is refused before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveRefused {
    /// No such core on this machine.
    NoCore,
    /// No such guest.
    NoGuest,
    /// The target may not hold the core (not in its `allowed_cores`).
    NotAllowed,
    /// The core is its owner's boot core.
    BootCore,
    /// The target holds the core already.
    AlreadyThere,
}

impl MoveRefused {
    /// The status `CORE_MOVE` returns.
    pub fn status(self) -> Status {
        match self {
            Self::NoCore => Status::InvalidCore,
            Self::NoGuest | Self::NotAllowed | Self::BootCore | Self::AlreadyThere => {
                Status::InvalidArgument
            }
        }
    }
}

/// Checks a request to move `core` (of `cores` on the machine), now held by `owner`, to
/// guest `to`: the core index and guest id as they came in registers.
pub fn check(
    core: u64,
    to: u64,
    guests: &[GuestCores],
    cores: usize,
    owner: Option<u8>,
) -> Result<(usize, u8), MoveRefused> {
    let core = usize::try_from(core)
        .ok()
        .filter(|&c| c < cores && c < 64)
        .ok_or(MoveRefused::NoCore)?;
    let to = u8::try_from(to)
        .ok()
        .filter(|&g| usize::from(g) < guests.len())
        .ok_or(MoveRefused::NoGuest)?;
    if guests[usize::from(to)].allowed & (1 << core) == 0 {
        return Err(MoveRefused::NotAllowed);
    }
    if owner == Some(to) {
        return Err(MoveRefused::AlreadyThere);
    }
    if let Some(owner) = owner.and_then(|o| guests.get(usize::from(o))) {
        if owner.boot_core == core {
            return Err(MoveRefused::BootCore);
        }
    }
    Ok((core, to))
}

/// What becomes of a revoke when the wait for its owner ends (the owner answered, or the
/// deadline passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeEnd {
    /// The core is parked: the move goes on.
    Proceed,
    /// The revoke is called off and the core stays the owner's: Linux is never forced (it
    /// could not offline the CPU in time), and an owner that declined keeps the core
    /// (`refused`).
    CallOff { refused: bool },
    /// The owner (Lavender) missed the deadline: the core is taken by force.
    Force,
}

/// The end of a revoke's wait: `linux` whether the owner is Linux, `answer` what the wait
/// saw (`Some(true)`: the core parked, and for Linux the agent reported it offline;
/// `Some(false)`: the owner declined; `None`: the deadline passed first), `parked`
/// whether the core is parked now (it may have parked just after the deadline).
pub fn revoke_end(linux: bool, answer: Option<bool>, parked: bool) -> RevokeEnd {
    if answer == Some(true) || parked {
        RevokeEnd::Proceed
    } else if linux || answer == Some(false) {
        RevokeEnd::CallOff {
            refused: answer == Some(false),
        }
    } else {
        RevokeEnd::Force
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_that_cannot_offline_in_time_keeps_the_core_and_lavender_is_forced() {
        // Linux's CPU did not go offline by the deadline: the move is called off, never forced.
        assert_eq!(
            revoke_end(true, None, false),
            RevokeEnd::CallOff { refused: false }
        );
        // The agent kept the CPU (it declined).
        assert_eq!(
            revoke_end(true, Some(false), false),
            RevokeEnd::CallOff { refused: true }
        );
        // Lavender missed the deadline: taken by force; if it declined, called off.
        assert_eq!(revoke_end(false, None, false), RevokeEnd::Force);
        assert_eq!(
            revoke_end(false, Some(false), false),
            RevokeEnd::CallOff { refused: true }
        );
        // Released in time, or parked right after the deadline: the move goes on.
        for linux in [true, false] {
            assert_eq!(revoke_end(linux, Some(true), true), RevokeEnd::Proceed);
            assert_eq!(revoke_end(linux, None, true), RevokeEnd::Proceed);
        }
    }

    /// The default configuration: Lavender (boot 2, may hold 2, 3), Linux (boot 1, 1 and 3).
    const GUESTS: [GuestCores; 2] = [
        GuestCores {
            allowed: 0b1100,
            boot_core: 2,
        },
        GuestCores {
            allowed: 0b1010,
            boot_core: 1,
        },
    ];

    #[test]
    fn the_shared_core_moves_both_ways() {
        assert_eq!(check(3, 0, &GUESTS, 4, Some(1)), Ok((3, 0)));
        assert_eq!(check(3, 1, &GUESTS, 4, Some(0)), Ok((3, 1)));
        // A parked core can be given too.
        assert_eq!(check(3, 1, &GUESTS, 4, None), Ok((3, 1)));
    }

    #[test]
    fn bad_requests_are_refused_with_their_reason() {
        assert_eq!(check(4, 0, &GUESTS, 4, None), Err(MoveRefused::NoCore));
        assert_eq!(
            check(u64::MAX, 0, &GUESTS, 4, None),
            Err(MoveRefused::NoCore)
        );
        assert_eq!(check(3, 2, &GUESTS, 4, Some(1)), Err(MoveRefused::NoGuest));
        assert_eq!(
            check(3, 1 << 40, &GUESTS, 4, Some(1)),
            Err(MoveRefused::NoGuest)
        );
        assert_eq!(check(0, 0, &GUESTS, 4, None), Err(MoveRefused::NotAllowed));
        assert_eq!(
            check(1, 0, &GUESTS, 4, Some(1)),
            Err(MoveRefused::NotAllowed)
        );
        assert_eq!(
            check(3, 1, &GUESTS, 4, Some(1)),
            Err(MoveRefused::AlreadyThere)
        );
        // Linux's boot core would be refused even if Lavender were allowed it.
        let mut guests = GUESTS;
        guests[0].allowed |= 0b10;
        assert_eq!(check(1, 0, &guests, 4, Some(1)), Err(MoveRefused::BootCore));
        assert_eq!(MoveRefused::NoCore.status(), Status::InvalidCore);
        assert_eq!(MoveRefused::BootCore.status(), Status::InvalidArgument);
    }
}
