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
    /// `load_markers=on|off` (default `off`): print the guests' load reports as
    /// `load_report` markers. `log=debug` and `log=trace` print them too.
    pub load_markers: bool,
}

impl Options {
    /// Whether load reports are printed: asked for, or part of a debug log.
    pub fn print_load_reports(&self) -> bool {
        self.load_markers || self.log_level >= LevelFilter::Debug
    }
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
            load_markers: false,
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
            Some(("load_markers", "on")) => options.load_markers = true,
            Some(("load_markers", "off")) => options.load_markers = false,
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
    fn load_reports_are_printed_on_request_or_at_debug_level() {
        assert!(!parse("", |_| panic!()).print_load_reports());
        assert!(!parse("log=info", |_| panic!()).print_load_reports());
        assert!(parse("load_markers=on", |_| panic!()).print_load_reports());
        assert!(parse("log=debug", |_| panic!()).print_load_reports());
        assert!(parse("log=trace load_markers=off", |_| panic!()).print_load_reports());
        let mut ignored = std::vec::Vec::new();
        assert!(!parse("load_markers=1", |w| ignored.push(w.0)).load_markers);
        assert_eq!(ignored, ["load_markers=1"]);
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
