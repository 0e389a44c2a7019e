//! Guest RAM as a `Vec`, for the unit tests of code that writes guest memory through
//! [`GuestPhysicalMemory`] (the kernel loaders).

use core::cell::RefCell;
use std::vec::Vec;

use super::{GuestPhysicalMemory, OutsideGuest};

/// Guest-physical 0..len, filled with `fill` so untouched bytes are recognizable.
pub struct FakeRam(RefCell<Vec<u8>>);

impl FakeRam {
    pub fn new(len: usize, fill: u8) -> Self {
        Self(RefCell::new(std::vec![fill; len]))
    }

    /// All of it, for tests that look at many places.
    pub fn bytes(&self) -> core::cell::Ref<'_, Vec<u8>> {
        self.0.borrow()
    }

    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        self.0.borrow()[at as usize..at as usize + len].to_vec()
    }

    pub fn u32(&self, at: u64) -> u32 {
        u32::from_le_bytes(self.read(at, 4).try_into().unwrap())
    }

    pub fn u64(&self, at: u64) -> u64 {
        u64::from_le_bytes(self.read(at, 8).try_into().unwrap())
    }
}

impl GuestPhysicalMemory for FakeRam {
    fn write(&self, at: u64, bytes: &[u8]) -> Result<(), OutsideGuest> {
        let outside = OutsideGuest {
            guest_physical: at,
            len: bytes.len() as u64,
        };
        let mut ram = self.0.borrow_mut();
        let range = ram
            .get_mut(at as usize..at as usize + bytes.len())
            .ok_or(outside)?;
        range.copy_from_slice(bytes);
        Ok(())
    }

    fn zero(&self, at: u64, len: u64) -> Result<(), OutsideGuest> {
        self.write(at, &std::vec![0; len as usize])
    }
}
