//! The argument string: space-separated `key=value` words, as on Lavender's command line.

/// The value of `key` in `args`, if a `key=value` word is present (the last one wins).
pub fn value<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(name, _)| *name == key)
        .map(|(_, value)| value)
        .next_back()
}

/// Why a number argument was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberError {
    NotANumber,
    OutOfRange { min: u64, max: u64 },
}

/// The number `key` names (decimal or `0x` hexadecimal), `default` if absent, and an error if
/// present but unusable or outside `min..=max`.
pub fn number(args: &str, key: &str, default: u64, min: u64, max: u64) -> Result<u64, NumberError> {
    let Some(text) = value(args, key) else {
        return Ok(default);
    };
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| NumberError::NotANumber)?;
    if (min..=max).contains(&parsed) {
        Ok(parsed)
    } else {
        Err(NumberError::OutOfRange { min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let args = "threads=8 limit=0x10 rounds=2 junk threads=4";
        assert_eq!(value(args, "threads"), Some("4"));
        assert_eq!(value(args, "junk"), None);
        assert_eq!(number(args, "limit", 1, 0, 100), Ok(16));
        assert_eq!(number(args, "rounds", 1, 0, 100), Ok(2));
        assert_eq!(number(args, "missing", 7, 0, 100), Ok(7));
        assert_eq!(
            number(args, "threads", 1, 5, 64),
            Err(NumberError::OutOfRange { min: 5, max: 64 })
        );
        assert_eq!(number("x=y", "x", 1, 0, 9), Err(NumberError::NotANumber));
    }
}
