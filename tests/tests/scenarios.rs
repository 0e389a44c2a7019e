//! End-to-end scenarios. Run them with `cargo xtask test` (all stages),
//! `cargo xtask test --e2e-only`, or `cargo xtask test --scenario NAME`.
//! Each test's name is its scenario name and its run dir under `target/tandem/runs/`.

use std::collections::BTreeSet;
use std::time::Duration;

use tandem_e2e::{EmulatorKind, Outcome, Scenario};

/// Bochs, 4 CPUs: the hypervisor turns VMX on in every core and reports the VMX features
/// the hypervisor depends on.
#[test]
fn bochs_all_cores_vmx_on() {
    // Bochs reaches `idle` in about 17 s of wall time here (BIOS, GRUB loading the 14 MB
    // kernel module, four cores to VMX on); the limit leaves room for a slower or busier
    // machine (two scenarios share the two cores).
    let mut run = Scenario::new("bochs_all_cores_vmx_on", EmulatorKind::Bochs)
        .cpus(4)
        .memory_mib(1024)
        .timeout(Duration::from_secs(240))
        .boot();
    let outcome = run.wait_until(|markers| markers.iter().any(|m| m.ev() == "idle"));
    assert_eq!(
        outcome,
        Outcome::Satisfied,
        "the hypervisor never went idle"
    );
    assert!(run.events("fatal").is_empty() && run.events("panic").is_empty());

    let vmx_on = run.events("core_vmx_on");
    assert_eq!(vmx_on.len(), 4, "core_vmx_on markers: {vmx_on:?}");
    let apic_ids: BTreeSet<u64> = vmx_on
        .iter()
        .map(|m| m["apic_id"].as_u64().expect("apic_id is a number"))
        .collect();
    assert_eq!(apic_ids.len(), 4, "APIC IDs are not distinct: {vmx_on:?}");

    let report = run.single("boot_report");
    let cores = report["cores"].as_array().expect("cores is an array");
    assert_eq!(cores.len(), 4, "boot report cores: {cores:?}");
    for core in cores {
        assert_eq!(core["vmx"], "on", "core not in VMX operation: {core}");
    }
    let report_apic_ids: BTreeSet<u64> =
        cores.iter().filter_map(|c| c["apic_id"].as_u64()).collect();
    assert_eq!(report_apic_ids, apic_ids, "report and core_vmx_on disagree");
    for feature in ["ept", "vpid", "unrestricted_guest"] {
        assert_eq!(
            report["vmx"][feature], true,
            "VMX feature {feature} missing: {}",
            report["vmx"]
        );
    }
    let memory = report["memory"].as_array().expect("memory is an array");
    assert!(!memory.is_empty(), "empty memory map");
    assert!(
        memory.iter().any(|region| region["type"] == "available"),
        "no available memory: {memory:?}"
    );
}

/// QEMU TCG has no VMX: the hypervisor must say so with a clear fatal marker and stop, on
/// its own image built with `log=debug` (so the debug log path is exercised too).
#[test]
fn qemu_tcg_no_vmx_clear_error() {
    let limit = Duration::from_secs(60);
    let mut run = Scenario::new("qemu_tcg_no_vmx_clear_error", EmulatorKind::QemuTcg)
        .cpus(2)
        .timeout(limit)
        .hv_cmdline("log=debug")
        .boot();
    // Nothing but a terminal marker ends this wait.
    let outcome = run.wait_until(|_| false);
    let Outcome::Terminal(fatal) = outcome else {
        panic!("expected a fatal marker, got: {outcome}");
    };
    assert_eq!(fatal.ev(), "fatal", "{}", fatal.value);
    assert_eq!(fatal.value["code"], "no_vmx", "{}", fatal.value);
    let reason = fatal.value["reason"].as_str().unwrap_or_default();
    assert!(
        !reason.trim().is_empty(),
        "no reason given: {}",
        fatal.value
    );
    assert!(
        run.events("core_vmx_on").is_empty(),
        "VMX turned on without VMX?"
    );
    assert!(
        run.elapsed() < limit / 2,
        "the fatal path took {:?}, too close to the {limit:?} limit",
        run.elapsed()
    );
}
