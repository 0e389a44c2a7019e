//! What a user program writes, made safe for the console: the harness and operators read
//! structured `@@tandem` markers from the same console, so a program must not be able to forge
//! one, nor send control characters (escape sequences, carriage returns that hide a line).

use core::fmt;

/// Writes `bytes` (one line, without its `'\n'`) to `out`: printable ASCII stays, everything
/// else becomes `?`, and the second `@` of any `@@` becomes `?`, so the marker prefix can
/// never appear.
pub fn sanitize(bytes: &[u8], out: &mut impl fmt::Write) -> fmt::Result {
    let mut previous = 0u8;
    for &byte in bytes {
        let shown = match byte {
            b'@' if previous == b'@' => b'?',
            b' '..=b'~' | b'\t' => byte,
            _ => b'?',
        };
        out.write_char(char::from(shown))?;
        previous = byte;
    }
    Ok(())
}

/// The lines of `bytes`: split at `'\n'`, without a trailing empty line.
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|byte| *byte == b'\n')
        .filter(move |_| !bytes.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(bytes: &[u8]) -> String {
        let mut out = String::new();
        sanitize(bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn markers_cannot_be_forged() {
        assert_eq!(clean(b"@@tandem {\"ev\":\"x\"}"), "@?tandem {\"ev\":\"x\"}");
        assert_eq!(clean(b"@@@"), "@??");
        assert_eq!(clean(b"a@b@c"), "a@b@c");
        assert!(!clean(b"x @@tandem").contains("@@tandem"));
    }

    #[test]
    fn control_and_non_ascii_bytes_are_replaced() {
        assert_eq!(clean(b"ok\r\x1b[2Jdone\tx\xff"), "ok??[2Jdone\tx?");
    }

    #[test]
    fn lines_split() {
        let all: Vec<&[u8]> = lines(b"a\nb\n").collect();
        assert_eq!(all, vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(lines(b"tail").count(), 1);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n").count(), 1, "one empty line");
    }
}
