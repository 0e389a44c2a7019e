//! Physical core identifiers and sets of them, as every message and hypercall names cores.

use core::fmt;

/// Most physical cores ABI 1 can name: core sets are one 64-bit mask.
pub const MAX_CORES: usize = 64;

/// A physical core number, `0..MAX_CORES`. The hypervisor's numbering, the same for every guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId(u8);

impl CoreId {
    pub const ZERO: CoreId = CoreId(0);

    pub const fn new(index: u64) -> Option<Self> {
        if index < MAX_CORES as u64 {
            Some(Self(index as u8))
        } else {
            None
        }
    }

    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "core {}", self.0)
    }
}

/// A set of cores, bit `n` for core `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CoreSet(pub u64);

impl CoreSet {
    pub const EMPTY: CoreSet = CoreSet(0);

    pub const fn contains(self, core: CoreId) -> bool {
        self.0 & (1 << core.0) != 0
    }

    pub const fn with(self, core: CoreId) -> Self {
        Self(self.0 | 1 << core.0)
    }

    pub const fn is_subset_of(self, other: CoreSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub const fn len(self) -> u32 {
        self.0.count_ones()
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The cores in ascending order.
    pub fn iter(self) -> impl Iterator<Item = CoreId> {
        (0..MAX_CORES as u8)
            .map(CoreId)
            .filter(move |core| self.contains(*core))
    }
}
