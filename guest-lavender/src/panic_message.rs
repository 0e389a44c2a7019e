//! The message Lavender's panic handler sends the hypervisor (`PANIC`): at most
//! [`PANIC_MESSAGE_MAX`] bytes of text the hypervisor accepts as they are
//! (`vmcall_proto::hypercall::panic_text`), built without allocating (the heap may be what
//! panicked).

use core::fmt;

use vmcall_proto::hypercall::PANIC_MESSAGE_MAX;

/// A panic message being written: what does not fit is dropped.
pub struct PanicMessageBuffer {
    bytes: [u8; PANIC_MESSAGE_MAX],
    len: usize,
}

impl PanicMessageBuffer {
    pub const fn new() -> Self {
        Self {
            bytes: [0; PANIC_MESSAGE_MAX],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Line breaks and tabs become spaces (a panic's location and message are on two lines),
    /// other bytes that are not printable ASCII become `?`, and so does the second `@` of any
    /// `@@`.
    fn push(&mut self, byte: u8) {
        if self.len == PANIC_MESSAGE_MAX {
            return;
        }
        let previous = self.len.checked_sub(1).map(|at| self.bytes[at]);
        self.bytes[self.len] = match byte {
            b'@' if previous == Some(b'@') => b'?',
            b'\n' | b'\r' | b'\t' => b' ',
            b' '..=b'~' => byte,
            _ => b'?',
        };
        self.len += 1;
    }
}

impl Default for PanicMessageBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for PanicMessageBuffer {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            self.push(byte);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;
    use vmcall_proto::hypercall::panic_text;

    fn message(text: &str) -> PanicMessageBuffer {
        let mut buffer = PanicMessageBuffer::new();
        buffer.write_str(text).unwrap();
        buffer
    }

    #[test]
    fn a_panic_reads_as_one_line_the_hypervisor_accepts() {
        let written = message("panicked at src/kernel/faults.rs:70:9:\nfault test: panic");
        assert_eq!(
            panic_text(written.as_bytes()),
            Ok("panicked at src/kernel/faults.rs:70:9: fault test: panic")
        );
    }

    #[test]
    fn hostile_text_is_made_acceptable() {
        let written = message("a\u{1b}[2J @@tandem {\"ev\":\"x\"} @@@ é\ttab");
        let text = panic_text(written.as_bytes()).expect("accepted");
        assert!(!text.contains("@@"), "{text}");
        assert_eq!(text, "a?[2J @?tandem {\"ev\":\"x\"} @?@ ?? tab");
    }

    #[test]
    fn long_messages_are_cut_at_the_limit() {
        let long = "x".repeat(PANIC_MESSAGE_MAX * 2);
        let written = message(&long);
        assert_eq!(written.as_bytes().len(), PANIC_MESSAGE_MAX);
        assert!(panic_text(written.as_bytes()).is_ok());
    }
}
