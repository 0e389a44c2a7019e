//! Assembles console output into lines and cuts each line into `ConsoleWrite` chunks.
//!
//! Every `ConsoleWrite` hypercall is a VM exit, so output is collected until a line is complete
//! and then sent in as few full 32-byte chunks as possible. The `'\n'` travels with the last
//! chunk: the hypervisor prints what it receives line by line and needs to see where lines end.

use vmcall_proto::hypercall::{ConsoleChunk, CONSOLE_CHUNK_MAX};

/// Bytes of one console line kept before sending; a longer line is sent in several pieces
/// (the hypervisor joins them until the `'\n'`). Eight full chunks.
pub const LINE_CAPACITY: usize = 8 * CONSOLE_CHUNK_MAX;

/// A partly written console line.
pub struct LineBuffer {
    bytes: [u8; LINE_CAPACITY],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    pub const fn new() -> Self {
        Self {
            bytes: [0; LINE_CAPACITY],
            len: 0,
        }
    }

    /// Appends `text`, handing `send` the chunks of every line it completes (and of a full buffer).
    pub fn write(&mut self, text: &[u8], send: &mut impl FnMut(ConsoleChunk)) {
        for &byte in text {
            self.bytes[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == LINE_CAPACITY {
                self.flush(send);
            }
        }
    }

    /// Sends whatever is buffered, even without a `'\n'`.
    pub fn flush(&mut self, send: &mut impl FnMut(ConsoleChunk)) {
        for piece in self.bytes[..self.len].chunks(CONSOLE_CHUNK_MAX) {
            send(ConsoleChunk::new(piece));
        }
        self.len = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(writes: &[&str]) -> Vec<Vec<u8>> {
        let mut buffer = LineBuffer::new();
        let mut chunks = Vec::new();
        for text in writes {
            buffer.write(text.as_bytes(), &mut |chunk| {
                chunks.push(chunk.as_bytes().to_vec())
            });
        }
        chunks
    }

    #[test]
    fn nothing_is_sent_before_the_line_ends() {
        let mut buffer = LineBuffer::new();
        buffer.write(b"partial", &mut |_| panic!("sent too early"));
        assert!(!buffer.is_empty());
        let mut chunks = Vec::new();
        buffer.flush(&mut |chunk| chunks.push(chunk.as_bytes().to_vec()));
        assert_eq!(chunks, vec![b"partial".to_vec()]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_line_from_many_writes_goes_out_in_full_chunks() {
        let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\n"; // 64 bytes
        let (first, rest) = line.split_at(7);
        let chunks = sent(&[first, rest]);
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|chunk| chunk.len() == CONSOLE_CHUNK_MAX));
        assert_eq!(chunks.concat(), line.as_bytes());
    }

    #[test]
    fn each_line_is_sent_separately_with_its_newline() {
        let chunks = sent(&["one\ntwo\n", "three"]);
        assert_eq!(chunks, vec![b"one\n".to_vec(), b"two\n".to_vec()]);
    }

    #[test]
    fn a_line_longer_than_the_buffer_is_sent_in_pieces() {
        let long = "x".repeat(LINE_CAPACITY + 5) + "\n";
        let chunks = sent(&[&long]);
        assert_eq!(chunks.len(), LINE_CAPACITY / CONSOLE_CHUNK_MAX + 1);
        assert_eq!(chunks.concat(), long.as_bytes());
        assert_eq!(chunks.last().unwrap(), b"xxxxx\n");
    }
}
