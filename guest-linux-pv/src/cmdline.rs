//! The words the hypervisor adds to the Linux kernel command line for the agent.
//!
//! Contract (one word per shared region, any number of words, anywhere on the line):
//!
//! ```text
//! tandem.shared=<name>@<phys>:<size>
//! ```
//!
//! * `name`: 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9_-]`, unique on the line;
//! * `phys`, `size`: hexadecimal, with or without a `0x` prefix, at most 16 digits;
//! * `phys` and `size` are multiples of [`PAGE_SIZE`], `size` is not zero and
//!   `phys + size` does not overflow;
//! * at most [`MAX_SHARED`] regions.
//!
//! The command line is input the agent does not control, so every malformed word becomes a
//! [`SpecError`] (reported, then skipped) and the well-formed ones are still used.

use std::fmt;

/// The parameter name. It contains a dot, so the kernel takes it for a module parameter of a
/// module that does not exist: it neither complains nor passes it to init's environment, and
/// the word stays visible in `/proc/cmdline`.
pub const SHARED_KEY: &str = "tandem.shared";
/// Most regions the agent accepts: bounds the work a hostile command line can cause.
pub const MAX_SHARED: usize = 16;
pub const MAX_NAME_LEN: usize = 32;
/// Regions are mapped whole through `/dev/mem`, which maps pages.
pub const PAGE_SIZE: u64 = 4096;
/// Offending words are quoted in markers; longer ones are cut to this many characters.
const MAX_QUOTED: usize = 96;

/// One `tandem.shared=` word, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSpec {
    pub name: String,
    pub phys: u64,
    pub size: u64,
}

/// What the agent takes from the command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub shared: Vec<SharedSpec>,
    /// Malformed `tandem.shared=` words, in command-line order.
    pub errors: Vec<SpecError>,
}

/// A `tandem.shared=` word that was refused, with the word itself (cut to a sane length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub word: String,
    pub kind: SpecErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecErrorKind {
    /// Not `<name>@<phys>:<size>`.
    Syntax,
    BadName,
    BadNumber,
    Misaligned,
    EmptyRegion,
    /// `phys + size` does not fit 64 bits.
    Overflow,
    DuplicateName,
    TooMany,
}

impl SpecErrorKind {
    /// Stable identifier for markers.
    pub fn code(self) -> &'static str {
        match self {
            Self::Syntax => "syntax",
            Self::BadName => "bad_name",
            Self::BadNumber => "bad_number",
            Self::Misaligned => "misaligned",
            Self::EmptyRegion => "empty_region",
            Self::Overflow => "overflow",
            Self::DuplicateName => "duplicate_name",
            Self::TooMany => "too_many",
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.kind {
            SpecErrorKind::Syntax => "expected <name>@<hex-phys>:<hex-size>".to_string(),
            SpecErrorKind::BadName => format!("name must be 1-{MAX_NAME_LEN} of [A-Za-z0-9_-]"),
            SpecErrorKind::BadNumber => "address and size must be hex, at most 16 digits".into(),
            SpecErrorKind::Misaligned => format!("address and size must be {PAGE_SIZE}-aligned"),
            SpecErrorKind::EmptyRegion => "size is zero".into(),
            SpecErrorKind::Overflow => "address + size overflows 64 bits".into(),
            SpecErrorKind::DuplicateName => "a region of this name was already given".into(),
            SpecErrorKind::TooMany => format!("more than {MAX_SHARED} regions"),
        };
        write!(f, "{SHARED_KEY}={}: {why}", self.word)
    }
}

/// Parses `/proc/cmdline` text.
pub fn parse(cmdline: &str) -> Cmdline {
    let mut out = Cmdline::default();
    for word in words(cmdline) {
        let Some(value) = word
            .strip_prefix(SHARED_KEY)
            .and_then(|rest| rest.strip_prefix('='))
        else {
            continue;
        };
        let error = |kind| SpecError {
            word: value.chars().take(MAX_QUOTED).collect(),
            kind,
        };
        match parse_shared(value) {
            Ok(_) if out.shared.len() == MAX_SHARED => {
                out.errors.push(error(SpecErrorKind::TooMany))
            }
            Ok(spec) if out.shared.iter().any(|s| s.name == spec.name) => {
                out.errors.push(error(SpecErrorKind::DuplicateName))
            }
            Ok(spec) => out.shared.push(spec),
            Err(kind) => out.errors.push(error(kind)),
        }
    }
    out
}

/// Splits the line into words as the kernel does (`next_arg` in `lib/cmdline.c`): whitespace
/// separates words except inside double quotes, and the quotes themselves are dropped.
fn words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for c in cmdline.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_ascii_whitespace() && !in_quotes => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn parse_shared(value: &str) -> Result<SharedSpec, SpecErrorKind> {
    let (name, range) = value.split_once('@').ok_or(SpecErrorKind::Syntax)?;
    let (phys, size) = range.split_once(':').ok_or(SpecErrorKind::Syntax)?;
    let name_ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        return Err(SpecErrorKind::BadName);
    }
    let phys = parse_hex(phys)?;
    let size = parse_hex(size)?;
    if size == 0 {
        return Err(SpecErrorKind::EmptyRegion);
    }
    if phys % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
        return Err(SpecErrorKind::Misaligned);
    }
    phys.checked_add(size).ok_or(SpecErrorKind::Overflow)?;
    Ok(SharedSpec {
        name: name.to_string(),
        phys,
        size,
    })
}

fn parse_hex(text: &str) -> Result<u64, SpecErrorKind> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    // `from_str_radix` alone would also take a leading `+`.
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SpecErrorKind::BadNumber);
    }
    u64::from_str_radix(digits, 16).map_err(|_| SpecErrorKind::BadNumber)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, phys: u64, size: u64) -> SharedSpec {
        SharedSpec {
            name: name.into(),
            phys,
            size,
        }
    }

    fn kinds(parsed: &Cmdline) -> Vec<SpecErrorKind> {
        parsed.errors.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn finds_regions_among_other_words() {
        let parsed = parse(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 tandem.shared=pv@0x1f000000:0x100000 quiet \
             tandem.shared=deleg@20000000:1000\n",
        );
        assert_eq!(
            parsed.shared,
            vec![
                spec("pv", 0x1f00_0000, 0x10_0000),
                spec("deleg", 0x2000_0000, 0x1000)
            ]
        );
        assert!(parsed.errors.is_empty());
    }

    #[test]
    fn no_region_is_not_an_error() {
        assert_eq!(
            parse("console=ttyS0 tandem.sharedx=a@0:1000"),
            Cmdline::default()
        );
        assert_eq!(parse(""), Cmdline::default());
    }

    #[test]
    fn quotes_follow_the_kernel() {
        let parsed = parse(r#"foo="a b" "tandem.shared=q@0X2000:0X3000" bar"#);
        assert_eq!(parsed.shared, vec![spec("q", 0x2000, 0x3000)]);
        assert_eq!(words(r#"foo="a b" x"#), vec!["foo=a b", "x"]);
    }

    #[test]
    fn malformed_words_are_reported_and_skipped() {
        let parsed = parse(
            "tandem.shared= tandem.shared=pv tandem.shared=pv@1000 tandem.shared=@0:1000 \
             tandem.shared=a.b@0:1000 tandem.shared=pv@+1000:1000 tandem.shared=pv@0x:1000 \
             tandem.shared=pv@0:10000000000000000 tandem.shared=pv@1001:1000 \
             tandem.shared=pv@0:0 tandem.shared=pv@fffffffffffff000:2000 \
             tandem.shared=ok@0:1000",
        );
        use SpecErrorKind::*;
        assert_eq!(
            kinds(&parsed),
            vec![
                Syntax,
                Syntax,
                Syntax,
                BadName,
                BadName,
                BadNumber,
                BadNumber,
                BadNumber,
                Misaligned,
                EmptyRegion,
                Overflow
            ]
        );
        assert_eq!(parsed.shared, vec![spec("ok", 0, 0x1000)]);
    }

    #[test]
    fn duplicates_and_excess_are_refused() {
        let mut line = String::from("tandem.shared=a@0:1000 tandem.shared=a@1000:1000");
        for i in 0..MAX_SHARED {
            line.push_str(&format!(" tandem.shared=r{i}@0:1000"));
        }
        let parsed = parse(&line);
        assert_eq!(parsed.shared.len(), MAX_SHARED);
        assert_eq!(
            kinds(&parsed),
            vec![SpecErrorKind::DuplicateName, SpecErrorKind::TooMany]
        );
    }

    #[test]
    fn errors_quote_a_bounded_word_and_explain() {
        let long = format!("tandem.shared={}", "x".repeat(5000));
        let parsed = parse(&long);
        assert_eq!(parsed.errors[0].word.len(), MAX_QUOTED);
        let text = parse("tandem.shared=pv@1001:1000").errors[0].to_string();
        assert_eq!(
            text,
            "tandem.shared=pv@1001:1000: address and size must be 4096-aligned"
        );
    }

    #[test]
    fn odd_bytes_do_not_panic() {
        for line in [
            "tandem.shared=\u{e9}@0:1000",
            "tandem.shared=a@\u{e9}:1000",
            "\"\"\"tandem.shared=a@0:1000",
            "tandem.shared=a@0:1000@0:1000",
            "tandem.shared=a@0:1000:1000",
        ] {
            let parsed = parse(line);
            assert!(parsed.shared.len() + parsed.errors.len() <= 1, "{line}");
        }
    }
}
