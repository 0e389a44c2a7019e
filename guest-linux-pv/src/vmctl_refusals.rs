//! `vmctl`'s refusals of malformed and out-of-range arguments (host tests of the `vmctl`
//! binary, compiled into it under `cfg(test)`): each is refused by the argument parser with a
//! message naming the argument, before anything is sent to the agent, so nothing changes.

use clap::error::ErrorKind;
use clap::Parser;

use super::Cli;

/// The parser's refusal of `args` (after `vmctl`): its kind and rendered message.
fn refusal(args: &[&str]) -> (ErrorKind, String) {
    let argv = std::iter::once("vmctl").chain(args.iter().copied());
    match Cli::try_parse_from(argv) {
        Ok(_) => panic!("vmctl {args:?} was accepted"),
        Err(e) => (e.kind(), e.render().to_string()),
    }
}

fn assert_refused(args: &[&str], kind: ErrorKind, mentions: &[&str]) {
    let (got, message) = refusal(args);
    assert_eq!(got, kind, "vmctl {args:?}: {message}");
    for text in mentions {
        assert!(
            message.contains(text),
            "vmctl {args:?}: the message does not say {text:?}:\n{message}"
        );
    }
}

#[test]
fn a_core_that_is_not_a_core_index_is_refused() {
    for core in ["three", "3.5", "0x3", "", "99999999999999999999999"] {
        assert_refused(
            &["move-core", core, "--to", "lavender"],
            ErrorKind::ValueValidation,
            &["<CORE>"],
        );
    }
    for core in ["64", "1000", "18446744073709551615"] {
        assert_refused(
            &["move-core", core, "--to", "lavender"],
            ErrorKind::ValueValidation,
            &["<CORE>", core, "0..64"],
        );
    }
    // A negative number reads as an option, which `move-core` does not have.
    assert_refused(
        &["move-core", "-1", "--to", "lavender"],
        ErrorKind::UnknownArgument,
        &["'-1'"],
    );
    assert!(Cli::try_parse_from(["vmctl", "move-core", "63", "--to", "linux"]).is_ok());
}

#[test]
fn a_timeout_out_of_range_or_not_a_number_is_refused() {
    for timeout in ["0", "60001", "18446744073709551615"] {
        assert_refused(
            &["move-core", "3", "--to", "lavender", "--timeout", timeout],
            ErrorKind::ValueValidation,
            &["--timeout", timeout, "1..=60000"],
        );
    }
    assert_refused(
        &["move-core", "3", "--to", "lavender", "--timeout", "-5"],
        ErrorKind::UnknownArgument,
        &["'-5'"],
    );
    for timeout in ["soon", "1e3", "5ms"] {
        assert_refused(
            &["move-core", "3", "--to", "lavender", "--timeout", timeout],
            ErrorKind::ValueValidation,
            &["--timeout"],
        );
    }
    assert!(
        Cli::try_parse_from(["vmctl", "move-core", "3", "--to", "x", "--timeout", "60000"]).is_ok()
    );
}

#[test]
fn missing_unknown_and_repeated_arguments_are_refused() {
    assert_refused(
        &["move-core", "3"],
        ErrorKind::MissingRequiredArgument,
        &["--to"],
    );
    assert_refused(
        &["move-core", "--to", "lavender"],
        ErrorKind::MissingRequiredArgument,
        &["<CORE>"],
    );
    assert_refused(
        &["move-core", "3", "--to"],
        ErrorKind::InvalidValue,
        &["--to"],
    );
    assert_refused(
        &["move-core", "3", "--to", "a", "--to", "b"],
        ErrorKind::ArgumentConflict,
        &["--to"],
    );
    assert_refused(
        &["move-core", "3", "4", "--to", "lavender"],
        ErrorKind::UnknownArgument,
        &["'4'"],
    );
    assert_refused(
        &["status", "--force"],
        ErrorKind::UnknownArgument,
        &["--force"],
    );
    assert_refused(&["reboot"], ErrorKind::InvalidSubcommand, &["reboot"]);
    assert_refused(
        &["trace", "-n", "many"],
        ErrorKind::ValueValidation,
        &["-n"],
    );
    assert_refused(&["trace", "-n", "-2"], ErrorKind::UnknownArgument, &["-2"]);
    assert_refused(
        &[],
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
        &["Usage"],
    );
}

#[test]
fn every_refusal_maps_to_the_bad_usage_exit_status() {
    // clap exits with status 2 for usage errors, which `vmctl --help` documents as bad usage.
    for args in [
        &["move-core", "64", "--to", "linux"][..],
        &["move-core", "3"],
        &["reboot"],
    ] {
        let argv = std::iter::once("vmctl").chain(args.iter().copied());
        let Err(error) = Cli::try_parse_from(argv) else {
            panic!("vmctl {args:?} was accepted");
        };
        assert_eq!(error.exit_code(), 2, "vmctl {args:?}");
    }
}
