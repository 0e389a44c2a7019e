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
        self.emit(|out| write!(out, "{value}"));
        self
    }

    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        self.emit(|out| write!(out, "{value}"));
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
        self.emit(|out| write!(out, "\"{value:#x}\""));
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
            self.result = write!(self.out, "{value}");
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

/// Escapes what JSON forbids raw inside a string (RFC 8259 §7).
struct EscapingWriter<'a, W: Write>(&'a mut W);

impl<W: Write> Write for EscapingWriter<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

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
