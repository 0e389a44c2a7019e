//! A guest's console as the hypervisor mediates it: bytes arrive by `CONSOLE_WRITE`
//! hypercalls and are printed on the hypervisor console one line at a time, tagged with
//! the guest's name, so a guest can neither forge another source's lines nor split one.

use heapless::String;
use spin::Mutex;

/// Longer lines are printed in pieces of this size; markers must fit in one.
const LINE_CAPACITY: usize = 2048;

pub struct GuestConsole(Mutex<String<LINE_CAPACITY>>);

impl GuestConsole {
    pub const fn new() -> Self {
        Self(Mutex::new(String::new()))
    }

    /// Bytes of the line begun and not yet emitted.
    pub fn pending_len(&self) -> usize {
        self.0.lock().len()
    }

    /// Appends `bytes`; calls `emit` with every completed line (without the newline).
    /// Bytes that are not printable ASCII (or tab) are shown as `?`.
    pub fn write(&self, bytes: &[u8], mut emit: impl FnMut(&str)) {
        let mut line = self.0.lock();
        for &byte in bytes {
            match byte {
                b'\n' => {
                    emit(&line);
                    line.clear();
                }
                b'\r' => {}
                _ => {
                    let c = if byte == b'\t' || (0x20..0x7f).contains(&byte) {
                        byte as char
                    } else {
                        '?'
                    };
                    if line.push(c).is_err() {
                        emit(&line);
                        line.clear();
                        // Just emptied, so there is room.
                        let _ = line.push(c);
                    }
                }
            }
        }
    }
}

impl Default for GuestConsole {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn emits_whole_lines_only_and_sanitizes() {
        let console = GuestConsole::new();
        let mut lines: Vec<std::string::String> = Vec::new();
        console.write(b"hel", |l| lines.push(l.to_string()));
        assert!(lines.is_empty());
        console.write(b"lo\r\nwor\x1bld\nrest", |l| lines.push(l.to_string()));
        assert_eq!(lines, ["hello", "wor?ld"]);
    }

    #[test]
    fn overlong_lines_are_split_not_dropped() {
        let console = GuestConsole::new();
        let mut lines: Vec<std::string::String> = Vec::new();
        console.write(&[b'x'; 3000], |l| lines.push(l.to_string()));
        console.write(b"\n", |l| lines.push(l.to_string()));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len() + lines[1].len(), 3000);
    }
}
