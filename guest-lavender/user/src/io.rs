//! Console output. Text goes to the kernel a line at a time through `write` (the kernel tags
//! each line with the process); [`LineWriter`] collects a line in a fixed buffer so formatting
//! needs no allocator.

use core::fmt;

/// Bytes a line can hold before it is sent in pieces.
const LINE_BYTES: usize = 240;

/// Collects formatted text and hands out complete lines (or full buffers) to `sink`.
pub struct LineWriter<F: FnMut(&[u8])> {
    buffer: [u8; LINE_BYTES],
    used: usize,
    sink: F,
}

impl<F: FnMut(&[u8])> LineWriter<F> {
    pub fn new(sink: F) -> Self {
        Self {
            buffer: [0; LINE_BYTES],
            used: 0,
            sink,
        }
    }

    /// Sends what is buffered, if anything.
    pub fn flush(&mut self) {
        if self.used > 0 {
            (self.sink)(&self.buffer[..self.used]);
            self.used = 0;
        }
    }
}

impl<F: FnMut(&[u8])> fmt::Write for LineWriter<F> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for &byte in text.as_bytes() {
            self.buffer[self.used] = byte;
            self.used += 1;
            if byte == b'\n' || self.used == LINE_BYTES {
                self.flush();
            }
        }
        Ok(())
    }
}

impl<F: FnMut(&[u8])> Drop for LineWriter<F> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Formats `args` to standard output (stream 1).
#[cfg(target_os = "none")]
pub fn print(args: fmt::Arguments<'_>) {
    let mut writer = LineWriter::new(|bytes| {
        // Output is best effort: a failed write has nowhere to be reported.
        let _ = crate::sys::write(1, bytes);
    });
    let _ = fmt::Write::write_fmt(&mut writer, args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::io::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::io::print(format_args!("{}\n", format_args!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn lines_are_sent_whole_and_long_ones_in_pieces() {
        let mut sent: Vec<Vec<u8>> = Vec::new();
        {
            let mut writer = LineWriter::new(|bytes: &[u8]| sent.push(bytes.to_vec()));
            write!(writer, "round {}: ok\nrest", 3).unwrap();
            writer.write_str(&"x".repeat(LINE_BYTES)).unwrap();
        }
        assert_eq!(sent[0], b"round 3: ok\n");
        assert_eq!(sent[1].len(), LINE_BYTES);
        assert!(sent[1].starts_with(b"rest"));
        assert_eq!(
            sent[2],
            "x".repeat(4).as_bytes(),
            "the remainder, sent on drop"
        );
    }
}
