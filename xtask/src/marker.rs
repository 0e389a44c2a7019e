//! Structured console markers: `<anything> @@tandem {json}`, one per line.
//!
//! Runs are judged only by these objects (see `vmcall_proto::marker`), never by loose text.

use serde_json::Value;
use vmcall_proto::marker::MARKER_PREFIX;

use crate::emulator::Port;

/// Events after which the machine does nothing more: the run is over.
pub const TERMINAL_EVENTS: [&str; 2] = ["fatal", "panic"];

/// Markers a person at the interactive console sees even while markers are hidden
/// (`cargo xtask run` without `--show-markers`): the machine or a guest stopped, failed or
/// was refused something. Every other marker is for programs (tests, benchmarks) and stays
/// in the run dir's console logs.
pub const NOTABLE_EVENTS: [&str; 13] = [
    "fatal",
    "panic",
    "guest_stopped",
    "guest_hung",
    "core_forced",
    "isolation_violation",
    "lavender_fatal",
    "lavender_panic",
    "lavender_exception",
    "lavender_core_release_failed",
    "process_fault",
    "process_spawn_failed",
    "agent_error",
];

/// Whether the interactive console shows `line` while markers are hidden: every line that is
/// not a marker, every notable marker ([`NOTABLE_EVENTS`]), and every malformed one (it ends
/// the run, and the user should see why).
pub fn shown_when_quiet(line: &str) -> bool {
    match parse_line(line) {
        None | Some(Err(_)) => true,
        Some(Ok(value)) => NOTABLE_EVENTS.contains(&value["ev"].as_str().unwrap_or_default()),
    }
}

/// A marker and where it was printed.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub port: Port,
    /// 1-based line number in that console's capture.
    pub line: usize,
    pub value: Value,
}

impl Marker {
    /// The `"ev"` field (always present: [`parse_line`] refuses markers without it).
    pub fn ev(&self) -> &str {
        self.value["ev"].as_str().unwrap_or_default()
    }

    pub fn is_terminal(&self) -> bool {
        TERMINAL_EVENTS.contains(&self.ev())
    }

    /// A marker as printed on `port` (line 1), for the tests of what reads markers.
    #[cfg(test)]
    pub fn printed(port: Port, value: Value) -> Self {
        Self {
            port,
            line: 1,
            value,
        }
    }
}

/// `None` for an ordinary log line; for a marker line, its object or why it is malformed.
pub fn parse_line(line: &str) -> Option<Result<Value, String>> {
    let at = line.find(MARKER_PREFIX)?;
    let json = line[at + MARKER_PREFIX.len()..].trim();
    Some(match serde_json::from_str::<Value>(json) {
        Err(e) => Err(format!("invalid JSON ({e})")),
        Ok(value) if !value.is_object() => Err("not a JSON object".to_string()),
        Ok(value) if !value["ev"].is_string() => Err("no string \"ev\" field".to_string()),
        Ok(value) => Ok(value),
    })
}

/// A marker line the Linux kernel's console cut: the marker's head, up to where a kernel
/// message (`[   51.252868] text`, to the end of the line) came in. The kernel writes its
/// messages to the serial port directly, between the chunks of a user-space line it is
/// sending, so the marker's tail is the next line. `None` when the line has no kernel
/// message after the marker prefix.
pub fn cut_by_kernel_message(line: &str) -> Option<&str> {
    let at = line.find(MARKER_PREFIX)? + MARKER_PREFIX.len();
    let bytes = line.as_bytes();
    (at..line.len())
        .filter(|&i| bytes[i] == b'[')
        .find(|&i| is_printk_stamp(&line[i..]))
        .map(|i| &line[..i])
}

/// Whether `text` starts with a printk time stamp: `[`, spaces, seconds, `.`, six digits, `] `.
fn is_printk_stamp(text: &str) -> bool {
    let Some(rest) = text.strip_prefix('[') else {
        return false;
    };
    let rest = rest.trim_start_matches(' ');
    let seconds = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Some(rest) = rest[seconds..].strip_prefix('.') else {
        return false;
    };
    let micros = rest.bytes().take_while(u8::is_ascii_digit).count();
    seconds > 0 && micros == 6 && rest[micros..].starts_with("] ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_marker_cut_by_a_kernel_message_is_found_and_others_are_not() {
        let cut = r#"@@tandem {"ev":"hotplug_cycle","hv_state":"[   51.252868] smpboot: CPU 1 is now offline"#;
        assert_eq!(
            cut_by_kernel_message(cut),
            Some(r#"@@tandem {"ev":"hotplug_cycle","hv_state":""#)
        );
        let whole = format!("{}{}", cut_by_kernel_message(cut).unwrap(), r#"owned"}"#);
        assert_eq!(parse_line(&whole).unwrap().unwrap()["hv_state"], "owned");
        // A kernel line before the marker, brackets in a marker's strings, no marker: none.
        assert_eq!(
            cut_by_kernel_message(r#"[    1.000000] x @@tandem {"ev":"a"}"#),
            None
        );
        assert_eq!(
            cut_by_kernel_message(r#"@@tandem {"ev":"a","s":"[1.5] x"}"#),
            None
        );
        assert_eq!(cut_by_kernel_message("[    1.000000] plain"), None);
    }

    #[test]
    fn plain_lines_are_not_markers() {
        assert_eq!(parse_line("[hv] starting on cpu 0"), None);
        assert_eq!(parse_line("@@tandem"), None, "prefix includes the space");
    }

    #[test]
    fn markers_parse_after_any_prefix() {
        let v = parse_line(r#"[hv] @@tandem {"ev":"core_vmx_on","cpu":2,"apic_id":2}"#)
            .unwrap()
            .unwrap();
        assert_eq!(v, json!({"ev":"core_vmx_on","cpu":2,"apic_id":2}));
        let v = parse_line("@@tandem {\"ev\":\"idle\"}  ").unwrap().unwrap();
        assert_eq!(v["ev"], "idle");
    }

    #[test]
    fn malformed_markers_say_why() {
        let err = |line| parse_line(line).unwrap().unwrap_err();
        assert!(err(r#"[hv] @@tandem {"ev":"fatal""#).contains("invalid JSON"));
        assert!(err("[hv] @@tandem [1,2]").contains("not a JSON object"));
        assert!(err(r#"[hv] @@tandem {"cpu":1}"#).contains("\"ev\""));
        assert!(err(r#"[hv] @@tandem {"ev":"x"} trailing"#).contains("invalid JSON"));
    }

    #[test]
    fn quiet_console_shows_text_and_notable_markers_only() {
        assert!(shown_when_quiet("[hv] INFO  cpu0 (APIC ID 0): VMX on"));
        assert!(shown_when_quiet(
            "[    2.300455] smp: Brought up 1 node, 2 CPUs"
        ));
        assert!(!shown_when_quiet(
            r#"[hv] @@tandem {"ev":"load_report","guest":"lavender","runnable":1}"#
        ));
        assert!(!shown_when_quiet(
            r#"[lavender] @@tandem {"ev":"lavender_load","runnable":0}"#
        ));
        assert!(!shown_when_quiet(r#"@@tandem {"ev":"agent_ready"}"#));
        assert!(shown_when_quiet(
            r#"[hv] @@tandem {"ev":"fatal","code":"no_vmx"}"#
        ));
        assert!(shown_when_quiet(
            r#"[hv] @@tandem {"ev":"isolation_violation","guest":"lavender"}"#
        ));
        assert!(shown_when_quiet("[hv] @@tandem {broken"), "malformed");
        for ev in TERMINAL_EVENTS {
            assert!(NOTABLE_EVENTS.contains(&ev), "{ev} ends the run: show it");
        }
    }

    #[test]
    fn fatal_and_panic_are_terminal() {
        let marker = |ev: &str| Marker {
            port: Port::Com2,
            line: 1,
            value: json!({ "ev": ev }),
        };
        assert!(marker("fatal").is_terminal());
        assert!(marker("panic").is_terminal());
        assert!(!marker("idle").is_terminal());
        assert_eq!(marker("boot_report").ev(), "boot_report");
    }
}
