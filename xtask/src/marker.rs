//! Structured console markers: `<anything> @@tandem {json}`, one per line.
//!
//! Runs are judged only by these objects (see `vmcall_proto::marker`), never by loose text.

use serde_json::Value;
use vmcall_proto::marker::MARKER_PREFIX;

use crate::emulator::Port;

/// Events after which the machine does nothing more: the run is over.
pub const TERMINAL_EVENTS: [&str; 2] = ["fatal", "panic"];

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
