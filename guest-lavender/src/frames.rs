//! The physical frame allocator: one bit per 4 KiB frame of guest-physical memory.
//!
//! A bitmap (rather than a free list threaded through the free frames) needs no access to the
//! frames themselves, so it works before Lavender's own page tables exist and is tested on the
//! host as is. Its storage is fixed at build time: `WORDS * 64` frames from address 0 upwards.
//! Memory above that is reported as untracked and left unused.

/// Frames are 4 KiB, the smallest page (Intel SDM Vol. 3A §4.5).
pub const FRAME_SIZE: u64 = 4096;

/// A free-frame bitmap covering guest-physical `0..WORDS * 64 * FRAME_SIZE`. Bit set = free.
pub struct FrameBitmap<const WORDS: usize> {
    free: [u64; WORDS],
    free_count: usize,
    /// Where the next search starts: allocation is next-fit, so a run of allocations does not
    /// rescan the words it has just emptied.
    next_word: usize,
}

/// Why a frame could not be freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    Misaligned(u64),
    /// Outside the tracked range, or frame 0, which is never handed out.
    NotTracked(u64),
    AlreadyFree(u64),
}

impl<const WORDS: usize> Default for FrameBitmap<WORDS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const WORDS: usize> FrameBitmap<WORDS> {
    /// Bytes of guest-physical memory the bitmap can track.
    pub const COVERED_BYTES: u64 = WORDS as u64 * 64 * FRAME_SIZE;

    /// An allocator with no free frame.
    pub const fn new() -> Self {
        Self {
            free: [0; WORDS],
            free_count: 0,
            next_word: 0,
        }
    }

    /// Marks the whole frames inside `start..end` free. Returns the bytes of the range it could
    /// not track (above [`Self::COVERED_BYTES`]). Frame 0 is never made free: physical address 0
    /// doubles as the null pointer once memory is identity-mapped.
    pub fn add_free(&mut self, start: u64, end: u64) -> u64 {
        let first = start.div_ceil(FRAME_SIZE).max(1);
        let last = (end / FRAME_SIZE).min(Self::COVERED_BYTES / FRAME_SIZE);
        for frame in first..last.max(first) {
            self.set_free(frame as usize, true);
        }
        end.saturating_sub(start.max(Self::COVERED_BYTES))
    }

    /// Marks every frame touching `start..end` used (for memory found taken after `add_free`).
    pub fn reserve(&mut self, start: u64, end: u64) {
        let first = start / FRAME_SIZE;
        let last = end
            .div_ceil(FRAME_SIZE)
            .min(Self::COVERED_BYTES / FRAME_SIZE);
        for frame in first..last.max(first) {
            self.set_free(frame as usize, false);
        }
    }

    /// Takes a free frame and returns its guest-physical address.
    pub fn allocate(&mut self) -> Option<u64> {
        let start = self.next_word;
        let word = (start..WORDS)
            .chain(0..start)
            .find(|index| self.free[*index] != 0)?;
        self.next_word = word;
        let frame = word * 64 + self.free[word].trailing_zeros() as usize;
        self.set_free(frame, false);
        Some(frame as u64 * FRAME_SIZE)
    }

    /// Takes `count` free frames in a row (the kernel heap) and returns the first one's address.
    /// First fit from the bottom; `count` of 0 takes nothing.
    pub fn allocate_contiguous(&mut self, count: usize) -> Option<u64> {
        if count == 0 {
            return None;
        }
        let mut run_start = 0;
        let mut run = 0;
        for frame in 0..WORDS * 64 {
            if self.is_free(frame) {
                if run == 0 {
                    run_start = frame;
                }
                run += 1;
                if run == count {
                    for taken in run_start..run_start + count {
                        self.set_free(taken, false);
                    }
                    return Some(run_start as u64 * FRAME_SIZE);
                }
            } else {
                run = 0;
            }
        }
        None
    }

    /// Returns a frame that [`Self::allocate`] handed out.
    pub fn free(&mut self, address: u64) -> Result<(), FreeError> {
        if address % FRAME_SIZE != 0 {
            return Err(FreeError::Misaligned(address));
        }
        if address == 0 || address >= Self::COVERED_BYTES {
            return Err(FreeError::NotTracked(address));
        }
        let frame = (address / FRAME_SIZE) as usize;
        if self.is_free(frame) {
            return Err(FreeError::AlreadyFree(address));
        }
        self.set_free(frame, true);
        Ok(())
    }

    pub fn free_count(&self) -> usize {
        self.free_count
    }

    fn is_free(&self, frame: usize) -> bool {
        self.free[frame / 64] & 1 << (frame % 64) != 0
    }

    fn set_free(&mut self, frame: usize, free: bool) {
        if self.is_free(frame) == free {
            return;
        }
        let bit = 1 << (frame % 64);
        if free {
            self.free[frame / 64] |= bit;
            self.free_count += 1;
        } else {
            self.free[frame / 64] &= !bit;
            self.free_count -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 words = 128 frames = 512 KiB tracked.
    type Small = FrameBitmap<2>;

    #[test]
    fn allocates_only_whole_frames_inside_free_ranges() {
        let mut frames = Small::new();
        assert_eq!(frames.add_free(0x1800, 0x4800), 0);
        assert_eq!(frames.free_count(), 2); // 0x2000 and 0x3000
        assert_eq!(frames.allocate(), Some(0x2000));
        assert_eq!(frames.allocate(), Some(0x3000));
        assert_eq!(frames.allocate(), None);
    }

    #[test]
    fn frame_zero_is_never_handed_out() {
        let mut frames = Small::new();
        frames.add_free(0, 0x2000);
        assert_eq!(frames.allocate(), Some(0x1000));
        assert_eq!(frames.allocate(), None);
        assert_eq!(frames.free(0), Err(FreeError::NotTracked(0)));
    }

    #[test]
    fn memory_above_the_bitmap_is_reported_untracked() {
        let mut frames = Small::new();
        let covered = Small::COVERED_BYTES;
        assert_eq!(frames.add_free(covered - 0x2000, covered + 0x5000), 0x5000);
        assert_eq!(frames.free_count(), 2);
        assert_eq!(frames.add_free(covered + 0x1000, covered + 0x3000), 0x2000);
        assert_eq!(frames.free_count(), 2);
    }

    #[test]
    fn reserve_takes_partly_covered_frames_too() {
        let mut frames = Small::new();
        frames.add_free(0x1000, 0x10000);
        frames.reserve(0x2800, 0x4001);
        assert_eq!(frames.free_count(), 15 - 3);
        let mut handed_out = Vec::new();
        while let Some(frame) = frames.allocate() {
            handed_out.push(frame);
        }
        assert!(!handed_out
            .iter()
            .any(|frame| (0x2000..0x5000).contains(frame)));
        assert_eq!(handed_out.len(), 12);
    }

    #[test]
    fn freed_frames_come_back_and_double_frees_are_refused() {
        let mut frames = Small::new();
        frames.add_free(0x1000, Small::COVERED_BYTES);
        let all: Vec<u64> = core::iter::from_fn(|| frames.allocate()).collect();
        assert_eq!(all.len(), 127);
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len(), "a frame was handed out twice");

        assert_eq!(frames.free(0x7000), Ok(()));
        assert_eq!(frames.free(0x7000), Err(FreeError::AlreadyFree(0x7000)));
        assert_eq!(frames.free(0x7001), Err(FreeError::Misaligned(0x7001)));
        assert_eq!(
            frames.free(Small::COVERED_BYTES),
            Err(FreeError::NotTracked(Small::COVERED_BYTES))
        );
        assert_eq!(frames.free_count(), 1);
        assert_eq!(frames.allocate(), Some(0x7000));
    }

    #[test]
    fn contiguous_runs_skip_holes() {
        let mut frames = Small::new();
        frames.add_free(0x1000, 0x10000);
        frames.reserve(0x3000, 0x4000);
        assert_eq!(frames.allocate_contiguous(3), Some(0x4000));
        assert_eq!(frames.allocate_contiguous(2), Some(0x1000));
        assert_eq!(frames.allocate_contiguous(0), None);
        assert_eq!(frames.allocate_contiguous(100), None);
        assert_eq!(frames.free_count(), 15 - 1 - 5);
    }

    #[test]
    fn empty_and_inverted_ranges_add_nothing() {
        let mut frames = Small::new();
        assert_eq!(frames.add_free(0x5000, 0x5000), 0);
        assert_eq!(frames.add_free(0x9000, 0x5000), 0);
        frames.reserve(0x9000, 0x5000);
        assert_eq!(frames.free_count(), 0);
    }
}
