//! `tandem.selftest=exec-bench:N` (for `cargo xtask bench --only exec`): once the agent serves
//! `vmctl`, times N runs of `vmctl exec` of an empty Lavender program (`status 0`: load,
//! start, exit, the exit's notification back to vmctl) against N fork + exec + wait of an
//! empty static Linux program (busybox `true`), interleaved, and prints one `exec_bench`
//! marker with every run's time. Times are Linux's monotonic clock: virtual under Bochs with
//! `clock: sync=none`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::report;

/// The word's prefix; the run count follows.
const WORD: &str = "tandem.selftest=exec-bench:";
const EMPTY_LAVENDER: &str = "/usr/lib/tandem/lavender/status";
const EMPTY_LINUX: &str = "/bin/true";

/// The run count the command line asks for, if it asks.
pub fn requested(cmdline: &str) -> Option<u32> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|word| word.strip_prefix(WORD)?.parse().ok())
        .filter(|runs| (1..=10_000).contains(runs))
}

/// Runs `program ARGS` to its end; its time, or why it failed.
fn timed(program: &str, args: &[&str]) -> Result<Duration, String> {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{program}: {e}"))?;
    let took = started.elapsed();
    if !status.success() {
        return Err(format!("{program} {args:?}: {status}"));
    }
    Ok(took)
}

pub fn run(runs: u32) {
    let mut lavender = Vec::new();
    let mut linux = Vec::new();
    // One of each first, untimed: page cache and the Lavender program's first load.
    let warm =
        timed("/bin/vmctl", &["exec", EMPTY_LAVENDER, "0"]).and_then(|_| timed(EMPTY_LINUX, &[]));
    let measured = warm.and_then(|_| {
        for _ in 0..runs {
            lavender.push(timed("/bin/vmctl", &["exec", EMPTY_LAVENDER, "0"])?);
            linux.push(timed(EMPTY_LINUX, &[])?);
        }
        Ok(())
    });
    if let Err(e) = measured {
        report::emit(&report::error("exec_bench", &e, |_| {}));
        return;
    }
    let micros =
        |times: &[Duration]| -> Vec<u64> { times.iter().map(|t| t.as_micros() as u64).collect() };
    report::emit(&report::marker("exec_bench", |o| {
        o.u64("runs", u64::from(runs))
            .str("clock", "linux_monotonic")
            .str("lavender_program", EMPTY_LAVENDER)
            .str("linux_program", EMPTY_LINUX)
            .array("vmctl_exec_us", |a| {
                for us in micros(&lavender) {
                    a.u64(us);
                }
            })
            .array("fork_exec_wait_us", |a| {
                for us in micros(&linux) {
                    a.u64(us);
                }
            });
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_names_a_sane_run_count() {
        assert_eq!(requested("quiet tandem.selftest=exec-bench:20"), Some(20));
        assert_eq!(requested("tandem.selftest=exec-bench:0"), None);
        assert_eq!(requested("tandem.selftest=exec-bench:x"), None);
        assert_eq!(requested("tandem.selftest=delegation"), None);
    }
}
