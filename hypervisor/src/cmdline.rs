//! The hypervisor's command line (the multiboot2 cmdline GRUB passes):
//! space-separated `key=value` options.

use log::LevelFilter;

/// Options understood on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=error|warn|info|debug|trace` (default `info`).
    pub log_level: LevelFilter,
    /// `core_test=SEED:CYCLES`: grant and revoke cores of the guest with a control
    /// channel on a seeded random schedule (the core-move test).
    pub core_test: Option<CoreTest>,
    /// `stats_ms=N`: print every guest's exit counters every N ms (TSC time).
    pub stats_ms: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreTest {
    pub seed: u64,
    pub cycles: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            core_test: None,
            stats_ms: None,
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
            Some(("stats_ms", value)) => match value.parse() {
                Ok(ms) if ms > 0 => options.stats_ms = Some(ms),
                _ => on_ignored(Ignored(word)),
            },
            Some(("core_test", value)) => {
                let parsed = value.split_once(':').and_then(|(seed, cycles)| {
                    Some(CoreTest {
                        seed: seed.parse().ok()?,
                        cycles: cycles.parse().ok().filter(|c| *c > 0)?,
                    })
                });
                match parsed {
                    Some(test) => options.core_test = Some(test),
                    None => on_ignored(Ignored(word)),
                }
            }
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
    fn stats_interval_is_a_positive_number() {
        assert_eq!(parse("stats_ms=500", |_| panic!()).stats_ms, Some(500));
        let mut ignored = 0;
        assert_eq!(
            parse("stats_ms=0 stats_ms=x", |_| ignored += 1).stats_ms,
            None
        );
        assert_eq!(ignored, 2);
    }

    #[test]
    fn core_test_takes_seed_and_cycles() {
        assert_eq!(
            parse("core_test=42:60", |_| panic!()).core_test,
            Some(CoreTest {
                seed: 42,
                cycles: 60
            })
        );
        let mut ignored = std::vec::Vec::new();
        for bad in ["core_test=42", "core_test=x:1", "core_test=1:0"] {
            assert_eq!(parse(bad, |w| ignored.push(w.0)).core_test, None);
        }
        assert_eq!(ignored.len(), 3);
    }

    #[test]
    fn unknown_words_and_bad_values_are_reported_not_fatal() {
        let mut ignored = std::vec::Vec::new();
        let options = parse("quiet log=loud foo=bar", |w| ignored.push(w.0));
        assert_eq!(options, Options::default());
        assert_eq!(ignored, ["quiet", "log=loud", "foo=bar"]);
    }
}
