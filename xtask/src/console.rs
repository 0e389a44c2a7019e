//! Following a serial-console capture file while the emulator appends to it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Reads the complete lines appended to a file since the last call (like `tail -f`).
///
/// The file may not exist yet (the emulator creates it when it opens the port). A line is
/// returned only once its `\n` has arrived; [`LineFollower::finish`] returns a last line
/// that never got one.
pub struct LineFollower {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    partial: Vec<u8>,
}

impl LineFollower {
    pub fn new(path: &Path) -> Self {
        LineFollower {
            path: path.to_path_buf(),
            file: None,
            offset: 0,
            partial: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lines completed since the last call, without their line endings.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        file.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        self.offset += file.read_to_end(&mut fresh)? as u64;
        self.partial.extend_from_slice(&fresh);

        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=end).collect();
            lines.push(clean(&raw[..raw.len() - 1]));
        }
        Ok(lines)
    }

    /// Everything left once the writer is gone: new complete lines, then an unterminated
    /// last line if there is one.
    pub fn finish(&mut self) -> io::Result<Vec<String>> {
        let mut lines = self.poll()?;
        if !self.partial.is_empty() {
            lines.push(clean(&self.partial));
            self.partial.clear();
        }
        Ok(lines)
    }
}

/// Serial output is bytes: decode lossily and drop the `\r` of CRLF line endings.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.strip_suffix('\r').unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_appended_lines() {
        let path = std::env::temp_dir().join(format!("tandem-follow-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut follower = LineFollower::new(&path);
        assert!(
            follower.poll().unwrap().is_empty(),
            "missing file is no error"
        );

        let mut file = File::create(&path).unwrap();
        file.write_all(b"[hv] one\r\n[hv] tw").unwrap();
        assert_eq!(follower.poll().unwrap(), vec!["[hv] one"]);
        file.write_all(b"o\n\xffbad\n").unwrap();
        assert_eq!(follower.poll().unwrap(), vec!["[hv] two", "\u{fffd}bad"]);
        file.write_all(b"no newline").unwrap();
        assert!(follower.poll().unwrap().is_empty());
        assert_eq!(follower.finish().unwrap(), vec!["no newline"]);
        std::fs::remove_file(&path).unwrap();
    }
}
