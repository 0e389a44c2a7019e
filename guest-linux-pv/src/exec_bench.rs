//! `tandem.selftest=exec-bench:N` (for `cargo xtask bench --only exec`): once the agent serves
//! `vmctl`, times N runs of `vmctl exec` of an empty Lavender program (`status 0`: load,
//! start, exit, the exit's notification back to vmctl) against N fork + exec + wait of an
//! empty static Linux program (busybox `true`), interleaved, and prints one `exec_bench`
//! marker with every run's time. Times are Linux's monotonic clock: virtual under Bochs with
//! `clock: sync=none`. Each `vmctl exec` run also has its stages in TSC ticks (the clock
//! Lavender stamps its `process_start` and `process_exit` markers with): vmctl spawned, the
//! agent's steps ([`exec::ExecStages`]), vmctl reaped; `cargo xtask bench` joins them with
//! Lavender's by pid.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::exec::{self, ExecStages};
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

/// One `vmctl exec` run: vmctl spawned and reaped (TSC) around the agent's stages.
struct StagedRun {
    spawned: u64,
    agent: ExecStages,
    reaped: u64,
}

/// Times one `vmctl exec` of the empty program with its stages.
fn staged_exec() -> Result<(Duration, StagedRun), String> {
    let spawned = exec::tsc_now();
    let took = timed("/bin/vmctl", &["exec", EMPTY_LAVENDER, "0"])?;
    let reaped = exec::tsc_now();
    let agent = match exec::take_stages()[..] {
        [one] => one,
        ref other => return Err(format!("{} exec stages recorded for one run", other.len())),
    };
    Ok((
        took,
        StagedRun {
            spawned,
            agent,
            reaped,
        },
    ))
}

pub fn run(runs: u32) {
    let mut staged = Vec::new();
    let mut lavender = Vec::new();
    let mut linux = Vec::new();
    // One of each first, untimed: page cache and the Lavender program's first load.
    let warm = staged_exec().and_then(|_| timed(EMPTY_LINUX, &[]));
    let measured = warm.and_then(|_| {
        for _ in 0..runs {
            let (took, stages) = staged_exec()?;
            lavender.push(took);
            staged.push(stages);
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
            })
            .array("vmctl_exec_stages_tsc", |a| {
                for run in &staged {
                    let s = &run.agent;
                    a.object(|o| {
                        o.u64("pid", u64::from(s.pid))
                            .u64("spawned", run.spawned)
                            .u64("accepted", s.accepted)
                            .u64("request", s.request)
                            .u64("image_read", s.image_read)
                            .u64("sent", s.sent)
                            .u64("replied", s.replied)
                            .u64("exited", s.exited)
                            .u64("relayed", s.relayed)
                            .u64("reaped", run.reaped);
                    });
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
