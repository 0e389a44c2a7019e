//! The boot report: one `boot_report` marker that says what the machine offers and
//! what the hypervisor made of it (see README "What you will see").

use core::fmt::Write;

use vmcall_proto::marker::JsonObject;

use crate::cpu_info::CpuIdentity;
use crate::platform::{BootModule, MemoryRegion};
use crate::vmx::caps::VmxFeatures;

/// How one core came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreStatus {
    pub cpu: usize,
    pub apic_id: u32,
    /// "on", "failed" or "no_response".
    pub vmx: &'static str,
    /// Why VMX is not on, as a stable code (see `VmxUnavailable::code`).
    pub reason: Option<&'static str>,
}

pub struct BootReport<'a> {
    pub cpu: &'a CpuIdentity,
    pub vmx: &'a VmxFeatures,
    pub cores: &'a [CoreStatus],
    pub memory: &'a [MemoryRegion],
    pub modules: &'a [BootModule],
    pub tsc_hz: u64,
}

impl BootReport<'_> {
    pub fn write_fields<W: Write>(&self, o: &mut JsonObject<'_, W>) {
        o.object("cpu", |c| {
            c.str("vendor", &self.cpu.vendor)
                .u64("family", self.cpu.family.into())
                .u64("model", self.cpu.model.into())
                .u64("stepping", self.cpu.stepping.into())
                .str("brand", &self.cpu.brand)
                .bool("x2apic", self.cpu.has_x2apic)
                .bool("xsave", self.cpu.has_xsave)
                .u64("tsc_hz", self.tsc_hz);
        });
        o.object("vmx", |v| {
            v.u64("vmcs_revision", self.vmx.vmcs_revision.into());
            for (name, offered) in self.vmx.flags() {
                v.bool(name, offered);
            }
            v.u64(
                "preemption_timer_rate",
                self.vmx.preemption_timer_rate.into(),
            );
        });
        o.array("cores", |a| {
            for core in self.cores {
                a.object(|c| {
                    c.u64("cpu", core.cpu as u64)
                        .u64("apic_id", core.apic_id.into())
                        .str("vmx", core.vmx);
                    if let Some(reason) = core.reason {
                        c.str("reason", reason);
                    }
                });
            }
        });
        o.array("memory", |a| {
            for region in self.memory {
                a.object(|r| {
                    r.hex("base", region.base)
                        .hex("length", region.length)
                        .str("type", region.kind.name());
                });
            }
        });
        o.array("modules", |a| {
            for module in self.modules {
                a.object(|m| {
                    m.str("name", &module.name)
                        .hex("start", module.start)
                        .u64("size", module.end - module.start);
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{module_from, MemoryKind};
    use vmcall_proto::marker::write_marker;

    #[test]
    fn report_is_one_json_line_with_every_section() {
        let cpu = CpuIdentity {
            family: 6,
            model: 85,
            ..Default::default()
        };
        let vmx = VmxFeatures {
            ept: true,
            vpid: true,
            ..Default::default()
        };
        let cores = [
            CoreStatus {
                cpu: 0,
                apic_id: 0,
                vmx: "on",
                reason: None,
            },
            CoreStatus {
                cpu: 1,
                apic_id: 2,
                vmx: "failed",
                reason: Some("vmx_locked_off"),
            },
        ];
        let memory = [MemoryRegion {
            base: 0,
            length: 0x9fc00,
            kind: MemoryKind::Available,
        }];
        let modules = [module_from("linux", 0x100000, 0x200000)];
        let report = BootReport {
            cpu: &cpu,
            vmx: &vmx,
            cores: &cores,
            memory: &memory,
            modules: &modules,
            tsc_hz: 1,
        };
        let mut line = std::string::String::new();
        write_marker(&mut line, "boot_report", |o| report.write_fields(o)).unwrap();
        assert!(!line.contains('\n'));
        for needle in [
            r#""ept":true"#,
            r#""vpid":true"#,
            r#""unrestricted_guest":false"#,
            r#"{"cpu":1,"apic_id":2,"vmx":"failed","reason":"vmx_locked_off"}"#,
            r#"{"base":"0x0","length":"0x9fc00","type":"available"}"#,
            r#"{"name":"linux","start":"0x100000","size":1048576}"#,
        ] {
            assert!(line.contains(needle), "{needle} missing from {line}");
        }
    }
}
