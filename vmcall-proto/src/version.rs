//! ABI version: one number that both sides of every channel must agree on.

use core::fmt;

/// Version of the paravirtual ABI described by this crate.
///
/// `major` changes whenever a layout, a hypercall number or a message encoding changes
/// incompatibly; `minor` counts compatible additions. Shared regions and the boot-info page
/// refuse a peer whose version is not exactly [`ABI_VERSION`]: every side is built from one tree,
/// so any difference means a stale binary, and failing loudly beats misreading memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbiVersion {
    pub major: u16,
    pub minor: u16,
}

/// The ABI version this build speaks.
pub const ABI_VERSION: AbiVersion = AbiVersion {
    major: 2,
    minor: 13,
};

impl AbiVersion {
    /// The version as stored in shared memory and returned by `HELLO`: `major << 16 | minor`.
    pub const fn to_u32(self) -> u32 {
        (self.major as u32) << 16 | self.minor as u32
    }

    pub const fn from_u32(packed: u32) -> Self {
        Self {
            major: (packed >> 16) as u16,
            minor: packed as u16,
        }
    }

    /// Accepts `peer` only if it is exactly this build's version.
    pub fn require_same(peer: AbiVersion) -> Result<(), VersionMismatch> {
        if peer == ABI_VERSION {
            Ok(())
        } else {
            Err(VersionMismatch {
                ours: ABI_VERSION,
                theirs: peer,
            })
        }
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A peer (or a page written by one) was built for another ABI version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionMismatch {
    pub ours: AbiVersion,
    pub theirs: AbiVersion,
}

impl fmt::Display for VersionMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer speaks vmcall ABI {} but this side speaks {}",
            self.theirs, self.ours
        )
    }
}

impl core::error::Error for VersionMismatch {}
