//! Arbitrary command lines into `vmctl`'s parser (the one `vmctl` itself uses): the input's
//! bytes, split at NUL, are the words after `vmctl`. Nothing may panic, and whatever is
//! accepted must be inside the ranges `vmctl` promises the agent (a core below 64, a move
//! timeout of 1 to 60000 ms, 1 to 64 cores for `exec`, an interval of 1 to 3600 s, ...).
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/vmctl_cli.rs"]
#[allow(dead_code)]
mod vmctl_cli;

use vmctl_cli::{own_options, plain_exec, Cli, Command, MAX_CORES, MAX_TIMEOUT_MS};

fuzz_target!(|data: &[u8]| {
    let words = std::iter::once("vmctl".to_string()).chain(
        data.split(|&byte| byte == 0)
            .map(|word| String::from_utf8_lossy(word).into_owned()),
    );
    let words: Vec<std::ffi::OsString> = words.map(Into::into).collect();
    // vmctl's way around clap for a plain exec gives what clap gives.
    let plain = plain_exec(&words);
    // A parse error (usage, --help, --version) is a message, never a panic.
    let Ok(cli) = Cli::try_parse_from(&words) else {
        assert!(plain.is_none(), "clap refuses a plain exec: {words:?}");
        return;
    };
    if let Some((program, args)) = plain {
        let Command::Exec {
            program: clap_program,
            args: clap_args,
            cores,
            detach,
        } = &cli.command
        else {
            panic!("a plain exec is not an exec to clap: {words:?}");
        };
        assert_eq!((&program, &args, *cores, *detach), (clap_program, clap_args, 1, false));
    }
    match cli.command {
        Command::MoveCore { core, timeout, .. } => {
            assert!(core < MAX_CORES);
            assert!(timeout.is_none_or(|ms| (1..=MAX_TIMEOUT_MS).contains(&ms)));
        }
        Command::Exec {
            args,
            cores,
            detach,
            ..
        } => {
            assert!((1..=64).contains(&cores));
            if let Ok((rest, cores, _)) = own_options(&args, cores, detach) {
                assert!((1..=64).contains(&cores));
                // vmctl's own options never reach the program.
                assert!(rest
                    .iter()
                    .all(|w| w != "--detach" && w != "--cores" && !w.starts_with("--cores=")));
            }
        }
        Command::Stats {
            interval, count, ..
        } => {
            assert!(interval.is_none_or(|s| (1..=3600).contains(&s)));
            assert!(count.is_none_or(|n| n >= 1));
            assert!(count.is_none() || interval.is_some());
        }
        Command::Rebalance {
            policy, period_ms, ..
        } => {
            assert!(["static", "autonomous", "cooperative"].contains(&policy.as_str()));
            assert!(period_ms.is_none_or(|ms| (1..=1000).contains(&ms)));
        }
        Command::Status { .. }
        | Command::Trace { .. }
        | Command::Ps { .. }
        | Command::Kill { .. }
        | Command::Stop { .. }
        | Command::Cont { .. } => {}
    }
});
