//! The load history: the last load reports the hypervisor received from every guest, each
//! stamped with its arrival in hypervisor time, kept in the last quarter of a control region's
//! data window (see [`crate::status_page::pages`]). A holder that wants a guest's load over
//! time (the policy benchmark) reads it a few times a second instead of having the hypervisor
//! print every report on its console, which would cost the BSP a serial line per report.
//!
//! One writer (the hypervisor's BSP), any number of readers. Layout, 8-byte words:
//!
//! ```text
//! word 0          records written so far (the number of the next record)
//! word 1 + 4k ..  slot k of (words - 1) / 4: record n lives in slot n % slots
//!   +0  stamp: 0 never written, 2n + 1 while record n is written, 2n + 2 once it holds it
//!   +1  at_us: when the hypervisor drained the report (its TSC time since boot)
//!   +2  runnable u32 | mean busy per-mille u16 << 32 | cores reported u8 << 48 | guest id << 56
//!   +3  requested core delta i16 (as u16) | workload hint u8 << 16 | final offer u8 << 24
//!       (1: the report's `final_offer`, else 0) | zero
//! ```
//!
//! The writer stamps the slot odd, writes the record, stamps it even (release), then bumps
//! word 0 (release). A reader keeps a record only when its stamp is `2n + 2` before and after
//! the copy, so a record the writer overwrote meanwhile is counted lost, never misread. Every
//! access is atomic.

use crate::sync::{fence, AtomicU64, Ordering};

const HEADER_WORDS: usize = 1;
const RECORD_WORDS: usize = 4;
/// The most records a history keeps (32 KiB of them): at one report per millisecond from
/// each of two guests, half a second.
pub const MAX_RECORDS: usize = 1024;

/// One load report as the hypervisor received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadRecord {
    /// The record's number: 0 for the first report since boot.
    pub number: u64,
    pub at_us: u64,
    pub guest: u8,
    pub runnable: u32,
    /// The mean of the reported cores' busy per-mille.
    pub busy_permille: u16,
    pub cores_reported: u8,
    pub requested_delta: i16,
    /// `message::WorkloadHint`'s wire value (0 unknown, 1 compute, 2 I/O-bound).
    pub hint: u8,
    /// `message::LoadReport::final_offer`: no live work of the guest can use the cores it
    /// offers.
    pub final_offer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryError {
    /// The window holds no history (too small for one record).
    None,
    /// The reader's cursor is past what was written: a hostile or stale cursor.
    CursorAhead { cursor: u64, written: u64 },
}

/// Words the history takes at the end of a data window of `window_words` words: a quarter of
/// it, at most [`MAX_RECORDS`] records' worth, none when that is not one record.
pub fn words_for(window_words: usize) -> usize {
    let records = ((window_words / 4).saturating_sub(HEADER_WORDS) / RECORD_WORDS).min(MAX_RECORDS);
    if records == 0 {
        0
    } else {
        HEADER_WORDS + records * RECORD_WORDS
    }
}

/// Records a history over `words` holds.
pub fn capacity(words: &[AtomicU64]) -> usize {
    words.len().saturating_sub(HEADER_WORDS) / RECORD_WORDS
}

fn slot(words: &[AtomicU64], number: u64) -> &[AtomicU64] {
    let index = (number % capacity(words) as u64) as usize;
    let start = HEADER_WORDS + index * RECORD_WORDS;
    &words[start..start + RECORD_WORDS]
}

/// Appends `record` (its `number` is ignored: the history numbers them). The hypervisor, the
/// history's only writer; a history too small for a record keeps nothing.
pub fn append(words: &[AtomicU64], record: &LoadRecord) {
    if capacity(words) == 0 {
        return;
    }
    let number = words[0].load(Ordering::Relaxed);
    let slot = slot(words, number);
    slot[0].store(2 * number + 1, Ordering::Relaxed);
    // The odd stamp is visible before any word of the record changes.
    fence(Ordering::Release);
    slot[1].store(record.at_us, Ordering::Relaxed);
    slot[2].store(
        u64::from(record.runnable)
            | u64::from(record.busy_permille) << 32
            | u64::from(record.cores_reported) << 48
            | u64::from(record.guest) << 56,
        Ordering::Relaxed,
    );
    slot[3].store(
        u64::from(record.requested_delta as u16)
            | u64::from(record.hint) << 16
            | u64::from(record.final_offer) << 24,
        Ordering::Relaxed,
    );
    slot[0].store(2 * number + 2, Ordering::Release);
    words[0].store(number + 1, Ordering::Release);
}

/// Records written so far: the cursor from which [`read_since`] returns only what comes next.
pub fn written(words: &[AtomicU64]) -> Result<u64, HistoryError> {
    if capacity(words) == 0 {
        return Err(HistoryError::None);
    }
    Ok(words[0].load(Ordering::Acquire))
}

/// Hands `each` every record numbered `cursor` or later that is still held, oldest first;
/// returns the cursor for the next call and how many records since `cursor` were lost
/// (overwritten before they were read).
pub fn read_since(
    words: &[AtomicU64],
    cursor: u64,
    mut each: impl FnMut(LoadRecord),
) -> Result<(u64, u64), HistoryError> {
    let written = written(words)?;
    if cursor > written {
        return Err(HistoryError::CursorAhead { cursor, written });
    }
    let oldest = written.saturating_sub(capacity(words) as u64);
    let mut lost = oldest.saturating_sub(cursor);
    for number in cursor.max(oldest)..written {
        let slot = slot(words, number);
        let stamp = slot[0].load(Ordering::Acquire);
        if stamp != 2 * number + 2 {
            lost += 1;
            continue;
        }
        let at_us = slot[1].load(Ordering::Relaxed);
        let packed = slot[2].load(Ordering::Relaxed);
        let more = slot[3].load(Ordering::Relaxed);
        // The copy is done before the stamp is read again.
        fence(Ordering::Acquire);
        if slot[0].load(Ordering::Relaxed) != stamp {
            lost += 1;
            continue;
        }
        each(LoadRecord {
            number,
            at_us,
            runnable: packed as u32,
            busy_permille: (packed >> 32) as u16,
            cores_reported: (packed >> 48) as u8,
            guest: (packed >> 56) as u8,
            requested_delta: more as u16 as i16,
            hint: (more >> 16) as u8,
            final_offer: (more >> 24) as u8 & 1 != 0,
        });
    }
    Ok((written, lost))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    fn history(records: usize) -> Vec<AtomicU64> {
        (0..HEADER_WORDS + records * RECORD_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    fn record(at_us: u64, guest: u8, runnable: u32) -> LoadRecord {
        LoadRecord {
            number: 0,
            at_us,
            guest,
            runnable,
            busy_permille: 999,
            cores_reported: 2,
            requested_delta: -1,
            hint: 2,
            // Both values of the flag go through `records_come_back_in_order_with_every_field`.
            final_offer: guest == 1,
        }
    }

    fn read(words: &[AtomicU64], cursor: u64) -> (Vec<LoadRecord>, u64, u64) {
        let mut out = Vec::new();
        let (next, lost) = read_since(words, cursor, |r| out.push(r)).unwrap();
        (out, next, lost)
    }

    #[test]
    fn records_come_back_in_order_with_every_field() {
        let words = history(8);
        assert_eq!(read(&words, 0), (Vec::new(), 0, 0));
        append(&words, &record(10, 1, 3));
        append(&words, &record(20, 0, u32::MAX));
        let (got, next, lost) = read(&words, 0);
        assert_eq!((next, lost), (2, 0));
        assert_eq!(
            got,
            [
                LoadRecord {
                    number: 0,
                    ..record(10, 1, 3)
                },
                LoadRecord {
                    number: 1,
                    ..record(20, 0, u32::MAX)
                }
            ]
        );
        // From the cursor on, only what is new.
        append(&words, &record(30, 1, 0));
        let (got, next, lost) = read(&words, next);
        assert_eq!((got.len(), got[0].at_us, next, lost), (1, 30, 3, 0));
    }

    #[test]
    fn a_slow_reader_is_told_what_it_lost() {
        let words = history(4);
        for t in 0..10 {
            append(&words, &record(t, 0, 1));
        }
        let (got, next, lost) = read(&words, 3);
        assert_eq!(
            got.iter().map(|r| r.at_us).collect::<Vec<_>>(),
            [6, 7, 8, 9]
        );
        assert_eq!((next, lost), (10, 3));
    }

    #[test]
    fn a_record_being_written_or_overwritten_is_not_read() {
        let words = history(4);
        append(&words, &record(1, 0, 1));
        append(&words, &record(2, 0, 1));
        // The writer is in the middle of overwriting record 0's slot with record 4.
        slot(&words, 0)[0].store(2 * 4 + 1, Ordering::Relaxed);
        let (got, next, lost) = read(&words, 0);
        assert_eq!((got.len(), got[0].at_us, next, lost), (1, 2, 2, 1));
    }

    #[test]
    fn bad_cursors_and_windows_without_room_are_refused() {
        let words = history(4);
        append(&words, &record(1, 0, 1));
        assert_eq!(
            read_since(&words, 5, |_| {}),
            Err(HistoryError::CursorAhead {
                cursor: 5,
                written: 1
            })
        );
        let tiny = history(0);
        append(&tiny, &record(1, 0, 1));
        assert_eq!(written(&tiny), Err(HistoryError::None));
        assert_eq!(words_for(7), 0);
        assert_eq!(words_for(4 * (1 + 4)), 5);
        assert_eq!(
            words_for(1 << 20),
            HEADER_WORDS + MAX_RECORDS * RECORD_WORDS
        );
    }
}
