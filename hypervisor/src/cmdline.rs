//! The hypervisor's command line (the multiboot2 cmdline GRUB passes):
//! space-separated `key=value` options.

use log::LevelFilter;

/// Options understood on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=error|warn|info|debug|trace` (default `info`).
    pub log_level: LevelFilter,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
        }
    }
}

/// A word of the command line that was not understood; it is reported and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ignored<'a>(pub &'a str);

/// Parses `cmdline`, calling `on_ignored` for every word it does not understand.
pub fn parse<'a>(cmdline: &'a str, mut on_ignored: impl FnMut(Ignored<'a>)) -> Options {
    let mut options = Options::default();
    for word in cmdline.split_ascii_whitespace() {
        match word.split_once('=') {
            Some(("log", level)) => match level.parse() {
                Ok(level) => options.log_level = level,
                Err(_) => on_ignored(Ignored(word)),
            },
            _ => on_ignored(Ignored(word)),
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(parse("", |_| panic!()), Options::default());
    }

    #[test]
    fn log_level_is_read_case_insensitively() {
        assert_eq!(
            parse("log=DEBUG", |_| panic!()).log_level,
            LevelFilter::Debug
        );
        assert_eq!(
            parse("  log=warn ", |_| panic!()).log_level,
            LevelFilter::Warn
        );
    }

    #[test]
    fn unknown_words_and_bad_values_are_reported_not_fatal() {
        let mut ignored = std::vec::Vec::new();
        let options = parse("quiet log=loud foo=bar", |w| ignored.push(w.0));
        assert_eq!(options, Options::default());
        assert_eq!(ignored, ["quiet", "log=loud", "foo=bar"]);
    }
}
