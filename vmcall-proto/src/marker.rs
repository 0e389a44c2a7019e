//! Structured console markers.
//!
//! Every component (hypervisor, Lavender, Linux agent) reports machine-readable events on its
//! console as one line: `[source] @@tandem {json}`. The end-to-end harness in `tests/` judges
//! runs by these objects only, never by loose substrings of the human-readable log.
//!
//! Every marker object has an `"ev"` field naming the event; the other fields depend on it.
//! [`write_marker`] writes one without allocating, so bare-metal code can use it.

use core::fmt::{self, Write};

/// Text that precedes the JSON object of a marker on a console line.
pub const MARKER_PREFIX: &str = "@@tandem ";

/// Writes `@@tandem {"ev":"<event>", ...fields...}` (no line ending) to `out`.
pub fn write_marker<W: Write>(
    out: &mut W,
    event: &str,
    fields: impl FnOnce(&mut JsonObject<'_, W>),
) -> fmt::Result {
    out.write_str(MARKER_PREFIX)?;
    let mut object = JsonObject::open(out);
    object.str("ev", event);
    fields(&mut object);
    object.close()
}

/// Writes one JSON object (no prefix, no line ending) to `out`: a document rather than a marker.
pub fn write_object<W: Write>(
    out: &mut W,
    fields: impl FnOnce(&mut JsonObject<'_, W>),
) -> fmt::Result {
    let mut object = JsonObject::open(out);
    fields(&mut object);
    object.close()
}

/// A JSON object being written. Methods add one member each; the first write error is kept
/// and returned by [`JsonObject::close`] (later writes are skipped).
pub struct JsonObject<'a, W: Write> {
    out: &'a mut W,
    empty: bool,
    result: fmt::Result,
}

impl<'a, W: Write> JsonObject<'a, W> {
    fn open(out: &'a mut W) -> Self {
        let result = out.write_char('{');
        Self {
            out,
            empty: true,
            result,
        }
    }

    fn close(mut self) -> fmt::Result {
        self.emit(|out| out.write_char('}'));
        self.result
    }

    fn emit(&mut self, f: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = f(self.out);
        }
    }

    fn key(&mut self, key: &str) {
        let comma = !self.empty;
        self.empty = false;
        self.emit(|out| {
            if comma {
                out.write_char(',')?;
            }
            write_json_string(out, key)?;
            out.write_char(':')
        });
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.emit(|out| write_json_string(out, value));
        self
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.emit(|out| write_decimal(out, value));
        self
    }

    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        self.emit(|out| {
            if value < 0 {
                out.write_char('-')?;
            }
            write_decimal(out, value.unsigned_abs())
        });
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.emit(|out| out.write_str(if value { "true" } else { "false" }));
        self
    }

    /// A number written as a `"0x..."` string (JSON numbers lose precision past 2^53).
    pub fn hex(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.emit(|out| {
            out.write_char('"')?;
            write_hex(out, value)?;
            out.write_char('"')
        });
        self
    }

    /// A string member whose value is produced by `Display` (escaped like any string).
    pub fn display(&mut self, key: &str, value: &dyn fmt::Display) -> &mut Self {
        self.key(key);
        self.emit(|out| {
            out.write_char('"')?;
            write!(EscapingWriter(out), "{value}")?;
            out.write_char('"')
        });
        self
    }

    pub fn object(&mut self, key: &str, fields: impl FnOnce(&mut JsonObject<'_, W>)) -> &mut Self {
        self.key(key);
        if self.result.is_ok() {
            let mut inner = JsonObject::open(self.out);
            fields(&mut inner);
            self.result = inner.close();
        }
        self
    }

    pub fn array(&mut self, key: &str, items: impl FnOnce(&mut JsonArray<'_, W>)) -> &mut Self {
        self.key(key);
        if self.result.is_ok() {
            let mut inner = JsonArray::open(self.out);
            items(&mut inner);
            self.result = inner.close();
        }
        self
    }
}

/// A JSON array being written; see [`JsonObject`].
pub struct JsonArray<'a, W: Write> {
    out: &'a mut W,
    empty: bool,
    result: fmt::Result,
}

impl<'a, W: Write> JsonArray<'a, W> {
    fn open(out: &'a mut W) -> Self {
        let result = out.write_char('[');
        Self {
            out,
            empty: true,
            result,
        }
    }

    fn close(mut self) -> fmt::Result {
        if self.result.is_ok() {
            self.result = self.out.write_char(']');
        }
        self.result
    }

    fn separator(&mut self) {
        if !self.empty && self.result.is_ok() {
            self.result = self.out.write_char(',');
        }
        self.empty = false;
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.separator();
        if self.result.is_ok() {
            self.result = write_decimal(self.out, value);
        }
        self
    }

    pub fn str(&mut self, value: &str) -> &mut Self {
        self.separator();
        if self.result.is_ok() {
            self.result = write_json_string(self.out, value);
        }
        self
    }

    pub fn object(&mut self, fields: impl FnOnce(&mut JsonObject<'_, W>)) -> &mut Self {
        self.separator();
        if self.result.is_ok() {
            let mut inner = JsonObject::open(self.out);
            fields(&mut inner);
            self.result = inner.close();
        }
        self
    }
}

fn write_json_string<W: Write>(out: &mut W, value: &str) -> fmt::Result {
    out.write_char('"')?;
    EscapingWriter(out).write_str(value)?;
    out.write_char('"')
}

/// Writes `value` in decimal with one `write_str`. `core::fmt`'s integer formatting goes
/// through its formatter machinery, several hundred instructions a number: too slow for the
/// hypervisor's status page (hundreds of numbers, rebuilt during core moves).
fn write_decimal<W: Write>(out: &mut W, value: u64) -> fmt::Result {
    write_digits(out, value, 10, "")
}

/// Writes `0x` and `value` in lowercase hexadecimal, as `{:#x}` does.
fn write_hex<W: Write>(out: &mut W, value: u64) -> fmt::Result {
    write_digits(out, value, 16, "0x")
}

/// Writes `prefix` and `value`'s digits in `base` (10 or 16), most significant first.
fn write_digits<W: Write>(out: &mut W, mut value: u64, base: u64, prefix: &str) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = HEX_DIGITS[(value % base) as usize];
        value /= base;
        if value == 0 {
            break;
        }
    }
    out.write_str(prefix)?;
    out.write_str(ascii(&digits[at..]))
}

/// The digits written above, which are ASCII.
fn ascii(digits: &[u8]) -> &str {
    core::str::from_utf8(digits).unwrap_or("?")
}

/// Escapes what JSON forbids raw inside a string (RFC 8259 §7). Runs of bytes that need no
/// escape go out in one `write_str` each: most strings are one run, copied whole rather than
/// a character at a time.
struct EscapingWriter<'a, W: Write>(&'a mut W);

impl<W: Write> Write for EscapingWriter<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut run = 0;
        for (i, &b) in s.as_bytes().iter().enumerate() {
            let escape = match b {
                b'"' => Escape::Short("\\\""),
                b'\\' => Escape::Short("\\\\"),
                b'\n' => Escape::Short("\\n"),
                b'\r' => Escape::Short("\\r"),
                b'\t' => Escape::Short("\\t"),
                0..=0x1f => Escape::Unicode(b),
                _ => continue,
            };
            // `b` is ASCII, so `i` and `i + 1` are character boundaries.
            if run < i {
                self.0.write_str(&s[run..i])?;
            }
            match escape {
                Escape::Short(text) => self.0.write_str(text)?,
                Escape::Unicode(b) => {
                    let code = [
                        HEX_DIGITS[usize::from(b >> 4)],
                        HEX_DIGITS[usize::from(b & 0xf)],
                    ];
                    self.0.write_str("\\u00")?;
                    self.0.write_str(ascii(&code))?;
                }
            }
            run = i + 1;
        }
        if run < s.len() {
            self.0.write_str(&s[run..])?;
        }
        Ok(())
    }
}

/// How a byte that JSON forbids raw in a string is written.
enum Escape {
    /// Its two-character escape.
    Short(&'static str),
    /// A control character without one: `\u00XX`.
    Unicode(u8),
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::String;

    #[test]
    fn writes_nested_objects_and_arrays() {
        let mut s = String::new();
        write_marker(&mut s, "boot_report", |o| {
            o.u64("cpus", 4)
                .bool("ok", true)
                .hex("base", 0x1000)
                .i64("delta", -2);
            o.object("cpu", |c| {
                c.str("vendor", "GenuineIntel");
            });
            o.array("cores", |a| {
                a.object(|c| {
                    c.u64("apic_id", 0);
                });
                a.object(|c| {
                    c.u64("apic_id", 1);
                });
                a.u64(7).str("x");
            });
        })
        .unwrap();
        assert_eq!(
            s,
            r#"@@tandem {"ev":"boot_report","cpus":4,"ok":true,"base":"0x1000","delta":-2,"cpu":{"vendor":"GenuineIntel"},"cores":[{"apic_id":0},{"apic_id":1},7,"x"]}"#
        );
    }

    /// One JSON document holding `text` and the numbers, as the writer writes it.
    fn written(text: &str, unsigned: u64, signed: i64) -> String {
        let mut s = String::new();
        write_object(&mut s, |o| {
            o.str("text", text)
                .display("shown", &text)
                .u64("unsigned", unsigned)
                .i64("signed", signed)
                .hex("hex", unsigned);
            o.array("list", |a| {
                a.u64(unsigned).str(text);
            });
        })
        .unwrap();
        s
    }

    proptest::proptest! {
        /// Whatever the string and the numbers, a JSON parser reads back exactly them.
        #[test]
        fn strings_and_numbers_read_back(text in "\\PC*|[\\x00-\\x7f]*", unsigned: u64, signed: i64) {
            let json: serde_json::Value = serde_json::from_str(&written(&text, unsigned, signed)).unwrap();
            proptest::prop_assert_eq!(json["text"].as_str(), Some(text.as_str()));
            proptest::prop_assert_eq!(json["shown"].as_str(), Some(text.as_str()));
            proptest::prop_assert_eq!(json["unsigned"].as_u64(), Some(unsigned));
            proptest::prop_assert_eq!(json["signed"].as_i64(), Some(signed));
            let hex = std::format!("{unsigned:#x}");
            proptest::prop_assert_eq!(json["hex"].as_str(), Some(hex.as_str()));
            proptest::prop_assert_eq!(json["list"][0].as_u64(), Some(unsigned));
            proptest::prop_assert_eq!(json["list"][1].as_str(), Some(text.as_str()));
        }
    }

    #[test]
    fn extreme_numbers() {
        let s = written("", u64::MAX, i64::MIN);
        assert!(s.contains(r#""unsigned":18446744073709551615"#), "{s}");
        assert!(s.contains(r#""signed":-9223372036854775808"#), "{s}");
        assert!(s.contains(r#""hex":"0xffffffffffffffff""#), "{s}");
        let s = written("", 0, 0);
        assert!(s.contains(r#""unsigned":0,"signed":0,"hex":"0x0""#), "{s}");
    }

    #[test]
    fn escapes_strings() {
        let mut s = String::new();
        write_marker(&mut s, "fatal", |o| {
            o.str("reason", "a \"b\"\\c\n\u{1}");
            o.display("shown", &format_args!("x={}\"", 5));
        })
        .unwrap();
        assert_eq!(
            s,
            r#"@@tandem {"ev":"fatal","reason":"a \"b\"\\c\n\u0001","shown":"x=5\""}"#
        );
    }
}
