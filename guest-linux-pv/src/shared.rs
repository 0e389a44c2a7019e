//! Attaching the shared regions named on the command line: map, then validate the header.

use std::fmt;

use vmcall_proto::region::{LayoutError, RegionHeader};

use crate::cmdline::SharedSpec;
use crate::devmem::{MapError, Mapping};

/// A mapped region whose header passed `vmcall_proto::region` validation.
pub struct Attached {
    /// Mapped for the agent's lifetime: the delegation service's threads work on it.
    pub mapping: &'static Mapping,
    pub header: RegionHeader,
    /// Its guest-physical base (what `DOORBELL` names it by).
    pub phys: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    Map(MapError),
    Layout(LayoutError),
}

impl AttachError {
    /// Stable identifier for markers.
    pub fn code(self) -> &'static str {
        match self {
            Self::Map(e) => e.code(),
            Self::Layout(LayoutError::BadMagic(_)) => "bad_magic",
            Self::Layout(LayoutError::Version(_)) => "abi_version",
            Self::Layout(_) => "bad_layout",
        }
    }
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Map(e) => e.fmt(f),
            // An all-zero header is what a region nobody initialised looks like.
            Self::Layout(LayoutError::BadMagic(0)) => {
                f.write_str("region magic is zero: the hypervisor has not initialised it")
            }
            Self::Layout(e) => e.fmt(f),
        }
    }
}

/// Maps `spec` and validates its header (magic, ABI version, layout).
pub fn attach(spec: &SharedSpec) -> Result<Attached, AttachError> {
    let mapping = Mapping::new(spec.phys, spec.size).map_err(AttachError::Map)?;
    let header = *mapping
        .region()
        .and_then(|region| region.attach())
        .map_err(AttachError::Layout)?
        .header();
    Ok(Attached {
        mapping: Box::leak(Box::new(mapping)),
        header,
        phys: spec.phys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use vmcall_proto::{AbiVersion, VersionMismatch};

    #[test]
    fn codes_tell_missing_uninitialised_and_mismatched_apart() {
        assert_eq!(
            AttachError::Map(MapError::Map(Errno::EPERM)).code(),
            "devmem_map"
        );
        assert_eq!(
            AttachError::Layout(LayoutError::BadMagic(0)).code(),
            "bad_magic"
        );
        let mismatch = VersionMismatch {
            ours: AbiVersion::from_u32(0x0001_0000),
            theirs: AbiVersion::from_u32(0x0002_0000),
        };
        assert_eq!(
            AttachError::Layout(LayoutError::Version(mismatch)).code(),
            "abi_version"
        );
        assert_eq!(
            AttachError::Layout(LayoutError::ReservedNotZero).code(),
            "bad_layout"
        );
        assert!(AttachError::Layout(LayoutError::BadMagic(0))
            .to_string()
            .contains("not initialised"));
    }
}
