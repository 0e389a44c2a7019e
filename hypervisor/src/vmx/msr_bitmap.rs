//! MSR bitmaps: which RDMSR/WRMSR exit (Intel SDM Vol. 3C §25.6.9). Four 1 KiB bitmaps
//! in one page: reads of 0..0x1fff, reads of 0xc0000000..0xc0001fff, then the same two
//! for writes. A set bit makes the access exit; MSRs outside both ranges always exit.

pub const BITMAP_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    Read,
    Write,
}

/// Byte index and bit of `msr` for `access`, or `None` for MSRs outside the ranges.
fn position(msr: u32, access: MsrAccess) -> Option<(usize, u8)> {
    let (base, index) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
        _ => return None,
    };
    let base = base + if access == MsrAccess::Write { 2048 } else { 0 };
    Some((base + (index / 8) as usize, (index % 8) as u8))
}

/// A bitmap that makes every access exit.
pub fn intercept_all() -> [u8; BITMAP_SIZE] {
    [0xff; BITMAP_SIZE]
}

/// Lets the guest access `msr` directly for `access`.
pub fn pass_through(bitmap: &mut [u8; BITMAP_SIZE], msr: u32, access: MsrAccess) {
    if let Some((byte, bit)) = position(msr, access) {
        bitmap[byte] &= !(1 << bit);
    }
}

pub fn intercepts(bitmap: &[u8; BITMAP_SIZE], msr: u32, access: MsrAccess) -> bool {
    position(msr, access).is_none_or(|(byte, bit)| bitmap[byte] & (1 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_clears_exactly_one_bit() {
        let mut bitmap = intercept_all();
        pass_through(&mut bitmap, 0x830, MsrAccess::Read);
        pass_through(&mut bitmap, 0xc000_0100, MsrAccess::Write);
        assert!(!intercepts(&bitmap, 0x830, MsrAccess::Read));
        assert!(intercepts(&bitmap, 0x830, MsrAccess::Write));
        assert!(intercepts(&bitmap, 0x831, MsrAccess::Read));
        assert!(!intercepts(&bitmap, 0xc000_0100, MsrAccess::Write));
        assert!(intercepts(&bitmap, 0xc000_0100, MsrAccess::Read));
        assert_eq!(bitmap.iter().filter(|b| **b != 0xff).count(), 2);
        // Outside both ranges: always intercepted, and pass_through is a no-op.
        pass_through(&mut bitmap, 0x4000_0000, MsrAccess::Read);
        assert!(intercepts(&bitmap, 0x4000_0000, MsrAccess::Read));
    }

    #[test]
    fn layout_matches_the_sdm() {
        let mut bitmap = intercept_all();
        pass_through(&mut bitmap, 0x10, MsrAccess::Write); // write-low starts at 2048
        assert_eq!(bitmap[2048 + 2], !1);
        pass_through(&mut bitmap, 0xc000_0008, MsrAccess::Read); // read-high starts at 1024
        assert_eq!(bitmap[1025], !1);
    }
}
