//! The agent's console markers (`@@tandem {json}`), which the end-to-end tests judge.
//!
//! | event | when |
//! |---|---|
//! | `agent_ready` | once, after setup: CPUs, kernel, every shared region and whether it attached |
//! | `agent_error` | something the agent could not do; `code` says what, `reason` says why |
//! | `agent_shutdown` | PID 1 got SIGTERM (power off) or SIGINT (reboot) |
//!
//! Linux's console is COM1, which only Linux writes, so lines carry no `[source]` tag.

use std::io::Write;

use vmcall_proto::marker::{write_marker, JsonObject};

use crate::cmdline::SharedSpec;
use crate::shared::AttachError;

/// How one shared region fared.
pub struct SharedStatus<'a> {
    pub spec: &'a SharedSpec,
    /// The region's ring count when it attached.
    pub result: Result<u32, AttachError>,
}

pub struct Ready<'a> {
    pub cpus_online: &'a str,
    pub cpus_present: &'a [u32],
    pub kernel: &'a str,
    pub shared: &'a [SharedStatus<'a>],
    pub uptime_ms: u64,
}

/// Writes `line` and a newline to the console in one `write`, so the marker is not split by
/// the shell or by another process writing at the same moment.
pub fn emit(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    // With no console there is nobody to tell: dropping the line is all that is left.
    let _ = std::io::stdout().lock().write_all(&bytes);
}

pub fn marker(event: &str, fields: impl FnOnce(&mut JsonObject<'_, String>)) -> String {
    let mut line = String::new();
    // Writing to a String cannot fail.
    let _ = write_marker(&mut line, event, fields);
    line
}

pub fn ready(ready: &Ready<'_>) -> String {
    marker("agent_ready", |o| {
        o.str("cpus_online", ready.cpus_online);
        o.array("cpus_present", |a| {
            for &cpu in ready.cpus_present {
                a.u64(cpu.into());
            }
        });
        o.str("kernel", ready.kernel);
        o.array("shared", |a| {
            for status in ready.shared {
                a.object(|r| {
                    r.str("name", &status.spec.name)
                        .hex("phys", status.spec.phys)
                        .u64("size", status.spec.size)
                        .bool("ok", status.result.is_ok());
                    match status.result {
                        Ok(rings) => r.u64("rings", rings.into()),
                        Err(e) => r.str("error", e.code()),
                    };
                });
            }
        });
        o.u64("uptime_ms", ready.uptime_ms);
    })
}

/// `agent_error` with `code` and a human-readable `reason`; `extra` adds fields.
pub fn error(
    code: &str,
    reason: &dyn std::fmt::Display,
    extra: impl FnOnce(&mut JsonObject<'_, String>),
) -> String {
    marker("agent_error", |o| {
        o.str("code", code);
        extra(o);
        o.display("reason", reason);
    })
}

/// `agent_error` for a shared region that did not attach.
pub fn shared_error(spec: &SharedSpec, error: AttachError) -> String {
    self::error("shared_region", &error, |o| {
        o.str("name", &spec.name)
            .hex("phys", spec.phys)
            .u64("size", spec.size)
            .str("error", error.code());
    })
}

pub fn shutdown(signal: &str, action: &str) -> String {
    marker("agent_shutdown", |o| {
        o.str("signal", signal).str("action", action);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devmem::MapError;
    use nix::errno::Errno;
    use vmcall_proto::region::LayoutError;

    #[test]
    fn ready_marker_lists_regions() {
        let pv = SharedSpec {
            name: "pv".into(),
            phys: 0x1f00_0000,
            size: 0x10_0000,
        };
        let deleg = SharedSpec {
            name: "deleg".into(),
            phys: 0x2000_0000,
            size: 0x1000,
        };
        let shared = [
            SharedStatus {
                spec: &pv,
                result: Err(AttachError::Layout(LayoutError::BadMagic(0))),
            },
            SharedStatus {
                spec: &deleg,
                result: Ok(3),
            },
        ];
        let line = ready(&Ready {
            cpus_online: "0-1",
            cpus_present: &[0, 1],
            kernel: "6.1.0-50-cloud-amd64",
            shared: &shared,
            uptime_ms: 1234,
        });
        assert_eq!(
            line,
            r#"@@tandem {"ev":"agent_ready","cpus_online":"0-1","cpus_present":[0,1],"kernel":"6.1.0-50-cloud-amd64","shared":[{"name":"pv","phys":"0x1f000000","size":1048576,"ok":false,"error":"bad_magic"},{"name":"deleg","phys":"0x20000000","size":4096,"ok":true,"rings":3}],"uptime_ms":1234}"#
        );
    }

    #[test]
    fn error_markers_carry_code_and_reason() {
        let spec = SharedSpec {
            name: "pv".into(),
            phys: 0x1000,
            size: 0x1000,
        };
        let line = shared_error(&spec, AttachError::Map(MapError::Map(Errno::EPERM)));
        assert!(
            line.starts_with(
                r#"@@tandem {"ev":"agent_error","code":"shared_region","name":"pv","phys":"0x1000","size":4096,"error":"devmem_map","reason":"/dev/mem refused"#
            ),
            "{line}"
        );
        assert_eq!(
            shutdown("SIGTERM", "poweroff"),
            r#"@@tandem {"ev":"agent_shutdown","signal":"SIGTERM","action":"poweroff"}"#
        );
    }
}
