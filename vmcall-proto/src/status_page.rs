//! The status and stats pages: documents the hypervisor publishes for one guest in the data
//! window of that guest's control region, read by the guest's holder (the Linux PV agent, for
//! `vmctl`). The window is cut in three ([`pages`]): the *load history* takes its last quarter
//! ([`crate::load_history`]), and the rest is cut in two halves, the *status page* (who owns
//! each core, each guest's cores and load, the last core moves) and the *stats page* (VM exits
//! per guest, core and reason with the time spent handling them, move counts and stage
//! medians).
//!
//! Each document is UTF-8 JSON; its fields are listed in `ABI.md` ("Status page", "Stats
//! page"). Each page has one writer (the hypervisor's BSP), any number of readers, and a
//! sequence lock of its own:
//!
//! ```text
//! word 0  sequence (odd while the writer is in the middle of an update)
//! word 1  length in bytes
//! word 2.. the bytes, 8 per word, little-endian
//! ```
//!
//! The writer makes the sequence odd, writes, then makes it even again (release); a reader
//! copies between two reads of the sequence and keeps the copy only when both are the same
//! even number. Every access is atomic, so a torn copy is detected, never undefined.

use crate::sync::{fence, AtomicU64, Ordering};

const HEADER_WORDS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusError {
    /// The document does not fit in the window.
    TooLarge { len: usize, capacity: usize },
    /// Nothing was published yet.
    Empty,
    /// The writer kept changing the page while it was read.
    Torn,
    /// The length word is past the window or the reader's buffer.
    BadLength(u64),
}

/// The three parts of a control region's data window.
pub struct Pages<'a> {
    pub status: &'a [AtomicU64],
    pub stats: &'a [AtomicU64],
    pub load_history: &'a [AtomicU64],
}

/// The load history at the end of the window ([`crate::load_history::words_for`]), the status
/// page in the first half of what comes before it and the stats page in the second.
pub fn pages(window: &[AtomicU64]) -> Pages<'_> {
    let history = crate::load_history::words_for(window.len());
    let (pages, load_history) = window.split_at(window.len() - history);
    let (status, stats) = pages.split_at(pages.len() / 2);
    Pages {
        status,
        stats,
        load_history,
    }
}

/// Bytes a page over `words` can hold.
pub fn capacity(words: &[AtomicU64]) -> usize {
    words.len().saturating_sub(HEADER_WORDS) * 8
}

/// Publishes `document` (the hypervisor, the page's only writer).
pub fn write(words: &[AtomicU64], document: &[u8]) -> Result<(), StatusError> {
    let capacity = capacity(words);
    if document.len() > capacity {
        return Err(StatusError::TooLarge {
            len: document.len(),
            capacity,
        });
    }
    let sequence = words[0].load(Ordering::Relaxed);
    words[0].store(sequence | 1, Ordering::Relaxed);
    // The odd sequence is visible before any byte changes.
    fence(Ordering::Release);
    words[1].store(document.len() as u64, Ordering::Relaxed);
    for (chunk, word) in document.chunks(8).zip(&words[HEADER_WORDS..]) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
    }
    words[0].store((sequence | 1).wrapping_add(1), Ordering::Release);
    Ok(())
}

/// Copies the current document into `out`: its length and sequence number. Retries a few
/// times while the writer is busy.
pub fn read(words: &[AtomicU64], out: &mut [u8]) -> Result<(usize, u64), StatusError> {
    if words.len() < HEADER_WORDS {
        return Err(StatusError::Empty);
    }
    for _ in 0..64 {
        let before = words[0].load(Ordering::Acquire);
        if before == 0 {
            return Err(StatusError::Empty);
        }
        if before & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        let len = words[1].load(Ordering::Relaxed);
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= capacity(words) && n <= out.len())
            .ok_or(StatusError::BadLength(len))?;
        for (chunk, word) in out[..n].chunks_mut(8).zip(&words[HEADER_WORDS..]) {
            let bytes = word.load(Ordering::Relaxed).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        // The copy is done before the sequence is read again.
        fence(Ordering::Acquire);
        if words[0].load(Ordering::Relaxed) == before {
            return Ok((n, before / 2));
        }
    }
    Err(StatusError::Torn)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn page<const N: usize>() -> [AtomicU64; N] {
        core::array::from_fn(|_| AtomicU64::new(0))
    }

    #[test]
    fn round_trip_and_sequence() {
        let words = page::<8>();
        let mut out = [0u8; 64];
        assert_eq!(read(&words, &mut out), Err(StatusError::Empty));
        write(&words, b"{\"a\":1}").unwrap();
        let (n, first) = read(&words, &mut out).unwrap();
        assert_eq!(&out[..n], b"{\"a\":1}");
        write(&words, b"{}").unwrap();
        let (n, second) = read(&words, &mut out).unwrap();
        assert_eq!(&out[..n], b"{}");
        assert_eq!(second, first + 1);
    }

    #[test]
    fn oversized_documents_and_lengths_are_refused() {
        let words = page::<4>();
        assert_eq!(
            write(&words, &[b'x'; 17]),
            Err(StatusError::TooLarge {
                len: 17,
                capacity: 16
            })
        );
        write(&words, b"0123456789").unwrap();
        let mut small = [0u8; 4];
        assert_eq!(read(&words, &mut small), Err(StatusError::BadLength(10)));
        // A hostile length word.
        words[1].store(u64::MAX, Ordering::Relaxed);
        let mut out = [0u8; 64];
        assert_eq!(
            read(&words, &mut out),
            Err(StatusError::BadLength(u64::MAX))
        );
    }

    #[test]
    fn the_pages_do_not_overlap() {
        let window = page::<9>();
        let Pages {
            status,
            stats,
            load_history,
        } = pages(&window);
        assert_eq!((status.len(), stats.len(), load_history.len()), (4, 5, 0));
        write(status, b"status").unwrap();
        write(stats, b"stats!").unwrap();
        let mut out = [0u8; 16];
        let (n, _) = read(status, &mut out).unwrap();
        assert_eq!(&out[..n], b"status");
        let (n, _) = read(stats, &mut out).unwrap();
        assert_eq!(&out[..n], b"stats!");
        // A window with room for a history: its last quarter, after the stats page.
        let window = page::<44>();
        let parts = pages(&window);
        assert_eq!(
            (
                parts.status.len(),
                parts.stats.len(),
                parts.load_history.len()
            ),
            (17, 18, 9)
        );
        write(parts.status, b"status").unwrap();
        write(parts.stats, b"stats!").unwrap();
        crate::load_history::append(
            parts.load_history,
            &crate::load_history::LoadRecord {
                number: 0,
                at_us: u64::MAX,
                guest: 0xff,
                runnable: u32::MAX,
                busy_permille: u16::MAX,
                cores_reported: 0xff,
                requested_delta: -1,
                hint: 0xff,
                final_offer: true,
            },
        );
        let (n, _) = read(parts.status, &mut out).unwrap();
        assert_eq!(&out[..n], b"status");
        let (n, _) = read(parts.stats, &mut out).unwrap();
        assert_eq!(&out[..n], b"stats!");
        assert_eq!(crate::load_history::written(parts.load_history), Ok(1));
    }

    #[test]
    fn a_page_in_the_middle_of_an_update_is_not_read() {
        let words = page::<4>();
        write(&words, b"ok").unwrap();
        words[0].fetch_add(1, Ordering::Relaxed);
        let mut out = [0u8; 16];
        assert_eq!(read(&words, &mut out), Err(StatusError::Torn));
    }
}
