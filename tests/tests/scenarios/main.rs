//! End-to-end scenarios. Run them with `cargo xtask test` (all stages),
//! `cargo xtask test --e2e-only`, or `cargo xtask test --scenario NAME`.
//! Each test's name is its scenario name and its run dir under `target/tandem/runs/`.
//! Scenarios of one area live in a module of their own beside this file.

mod delegation;

use std::collections::BTreeSet;
use std::time::Duration;

mod policies;

use tandem_e2e::{
    core_moves, marker_lines, EmulatorKind, Outcome, Port, Scenario, ScenarioRun, Terminal,
};

mod exec;
mod faults;
mod soak;

/// Bochs, 4 CPUs: the hypervisor turns VMX on in every core and reports the VMX features
/// the hypervisor depends on.
#[test]
fn bochs_all_cores_vmx_on() {
    // Bochs reaches the boot report in about 20 s of wall time here (BIOS, GRUB loading
    // the modules, four cores to VMX on); the limit leaves room for a slower or busier
    // machine (two scenarios share the two cores).
    let mut run = Scenario::new("bochs_all_cores_vmx_on", EmulatorKind::Bochs)
        .cpus(4)
        .memory_mib(1024)
        .timeout(Duration::from_secs(240))
        .boot();
    let outcome = run.wait_until(|markers| markers.iter().any(|m| m.ev() == "boot_report"));
    assert_eq!(outcome, Outcome::Satisfied, "no boot report");
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

/// The markers of `guest`'s exit counters, once it halted or was stopped.
fn exit_counters<'a>(run: &'a tandem_e2e::ScenarioRun, guest: &str) -> &'a serde_json::Value {
    let counters = run.events("exit_counters");
    counters
        .into_iter()
        .find(|m| m["guest"] == guest)
        .unwrap_or_else(|| panic!("no exit_counters for {guest}"))
}

fn guest_done(markers: &[tandem_e2e::Marker]) -> bool {
    markers.iter().any(|m| m.ev() == "hv_alive")
}

/// True once an `exit_counters` marker follows the first `first` marker: the counters
/// then include what led to `first`.
fn counters_after(first: &'static str) -> impl FnMut(&[tandem_e2e::Marker]) -> bool {
    move |markers| {
        markers
            .iter()
            .position(|m| m.ev() == first)
            .is_some_and(|at| markers[at..].iter().any(|m| m.ev() == "exit_counters"))
    }
}

/// Exit counters once a second of TSC time, for guests that stay up.
const STATS: &str = "log=info stats_ms=1000";

/// Bochs, 4 CPUs, Lavender alone (`tests/configs/lavender.toml`): Lavender boots in its
/// partition on its boot core (core 1), prints its banner and completes the hello hypercall round
/// trip, and starts its other initial core (core 2); the hypervisor prints its exit counters
/// per reason.
#[test]
fn bochs_lavender_boots_and_says_hello() {
    let mut run = Scenario::new("bochs_lavender_boots_and_says_hello", EmulatorKind::Bochs)
        .config("lavender")
        .hv_cmdline(STATS)
        .timeout(Duration::from_secs(300))
        .boot();
    let mut hello_and_counters = counters_after("lavender_hello");
    let outcome = run.wait_until(|markers| {
        hello_and_counters(markers)
            && markers
                .iter()
                .position(|m| m.ev() == "lavender_core_online" && m.value["core"] == 2)
                .is_some_and(|at| markers[at..].iter().any(|m| m.ev() == "exit_counters"))
    });
    assert_eq!(
        outcome,
        Outcome::Satisfied,
        "no hello, no exit counters after it, or initial core 2 never came online"
    );
    run.assert_none_of(&["fatal", "panic", "guest_stopped", "isolation_violation"]);
    let started = run.single("vcpu_started");
    assert_eq!(
        (started["guest"].as_str(), started["cpu"].as_u64()),
        (Some("lavender"), Some(1)),
        "{started}"
    );
    assert_eq!(started["mode"], "entry64", "{started}");

    let banner = run.single("lavender_banner");
    assert_eq!(banner["boot_core"], 1, "{banner}");
    assert_eq!(
        banner["cores_allowed"],
        serde_json::json!([1, 2, 3]),
        "{banner}"
    );
    assert!(
        banner["memory_mib"]
            .as_u64()
            .is_some_and(|m| (120..=127).contains(&m)),
        "{banner}"
    );

    let hello = run.single("lavender_hello");
    assert_eq!(hello["ok"], true, "{hello}");
    assert_eq!(hello["abi"], hello["hv_abi"], "{hello}");

    let counters = exit_counters(&run, "lavender");
    assert!(
        counters["state"] == "running" || counters["state"] == "halted",
        "{counters}"
    );
    let by_reason = &counters["by_reason"];
    assert!(
        by_reason["vmcall"].as_u64().unwrap_or(0) >= 2,
        "hello + console: {counters}"
    );
    assert!(by_reason["hlt"].as_u64().unwrap_or(0) >= 1, "{counters}");
    let sum: u64 = by_reason
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(counters["total"].as_u64(), Some(sum), "{counters}");
    let core1 = counters["by_core"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cpu"] == 1)
        .expect("core 1 counters");
    assert!(
        core1["by_reason"]["vmcall"].as_u64().unwrap_or(0) >= 2,
        "the boot core made the calls: {counters}"
    );
    let online = run.single("lavender_core_online");
    assert_eq!(
        (online["core"].as_u64(), online["slot"].as_u64()),
        (Some(2), Some(1)),
        "{online}"
    );
    let last = run
        .events("exit_counters")
        .into_iter()
        .rfind(|m| m["guest"] == "lavender")
        .expect("exit counters");
    let core2 = last["by_core"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cpu"] == 2);
    assert!(
        core2.is_some_and(|c| c["by_reason"].as_object().is_some_and(|r| !r.is_empty())),
        "Lavender runs on its initial core 2: {last}"
    );
}

/// Isolation with the "fault" policy: each attack (read and write outside the partition,
/// IPI to a core Lavender does not own, a release of its own core asking for an interrupt to
/// that core) is refused and reported, Lavender gets #GP for the memory attacks and
/// `NotOwner` for the release, keeps its core and goes on to the next, and the hypervisor
/// keeps running.
#[test]
fn bochs_isolation_attacks_refused_fault_policy() {
    let mut run = Scenario::new(
        "bochs_isolation_attacks_refused_fault_policy",
        EmulatorKind::Bochs,
    )
    .config("isolation-fault")
    .hv_cmdline(STATS)
    .timeout(Duration::from_secs(300))
    .boot();
    let outcome = run.wait_until(counters_after("isolation_done"));
    assert_eq!(
        outcome,
        Outcome::Satisfied,
        "the isolation test never finished"
    );
    assert!(run.events("fatal").is_empty() && run.events("panic").is_empty());
    assert!(
        run.events("guest_stopped").is_empty(),
        "fault policy stops nobody: {:?}",
        run.events("guest_stopped")
    );

    let violations = run.events("isolation_violation");
    let seen: Vec<(&str, &str, &str)> = violations
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap(),
                v["target"].as_str().unwrap(),
                v["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("memory_read", "0x3fe00000", "fault_injected"),
            ("memory_write", "0x10000000", "fault_injected"),
            ("ipi", "0x0", "dropped"),
            ("release_wake", "0x0", "refused"),
        ],
        "{violations:?}"
    );
    let attacks = run.events("isolation_attack");
    let outcomes: Vec<(&str, &str)> = attacks
        .iter()
        .map(|a| (a["kind"].as_str().unwrap(), a["outcome"].as_str().unwrap()))
        .collect();
    // The guest cannot see an IPI being dropped: from its side the send completed.
    assert_eq!(
        outcomes,
        [
            ("read", "faulted"),
            ("write", "faulted"),
            ("ipi", "completed"),
            ("release_wake", "refused"),
        ],
        "{attacks:?}"
    );
    let release = &attacks[3];
    assert!(
        release["status"].as_str().unwrap().contains("NotOwner"),
        "{release}"
    );
    assert!(
        attacks.iter().all(|a| a.get("value").is_none()),
        "a read returned bytes: {attacks:?}"
    );
    // The refused release left Lavender its core: it went on to report the end.
    assert_eq!(run.single("isolation_done")["attacks"], 4);

    let counters = exit_counters(&run, "lavender");
    assert_eq!(counters["by_reason"]["ept_violation"], 2, "{counters}");
    assert!(run
        .events("hv_alive")
        .iter()
        .all(|a| a["uptime_us"].as_u64().is_some()));
}

/// Isolation with the "stop" policy: the first attack stops Lavender with a diagnostic;
/// the hypervisor reports the stopped guest's counters and goes on.
#[test]
fn bochs_isolation_attack_stops_guest() {
    let mut run = Scenario::new("bochs_isolation_attack_stops_guest", EmulatorKind::Bochs)
        .config("isolation-stop")
        .timeout(Duration::from_secs(300))
        .boot();
    assert_eq!(
        run.wait_until(guest_done),
        Outcome::Satisfied,
        "the guest was never stopped"
    );
    assert!(run.events("fatal").is_empty() && run.events("panic").is_empty());
    let stopped = run.single("guest_stopped");
    assert_eq!(stopped["guest"], "lavender", "{stopped}");
    assert_eq!(stopped["code"], "isolation_violation", "{stopped}");
    assert_eq!(stopped["exit_name"], "ept_violation", "{stopped}");
    assert_eq!(stopped["gpa"], "0x3fe00000", "{stopped}");
    assert!(
        run.events("isolation_attack").is_empty(),
        "the guest went on: {:?}",
        run.events("isolation_attack")
    );
    let counters = exit_counters(&run, "lavender");
    assert_eq!(counters["state"], "stopped", "{counters}");
    let alive = run.single("hv_alive");
    assert_eq!(alive["guests_running"], 0, "{alive}");
}

/// Bochs, two Lavender instances (`tests/configs/ioapic-hostile.toml`): "hostile" owns the
/// IOAPIC and programs redirection entries aimed at the victim's core, at the hypervisor's core
/// and at exception vectors (16..31, on its own core, the victim's and the hypervisor's). Its
/// writes complete (the IOAPIC is emulated), but the hypervisor refuses each entry (masked in
/// the hardware) and reports it. Then it sends IPIs with exception vectors through the ICR (to
/// its own core, the victim's, the hypervisor's, and by the self shorthand): each is dropped
/// and reported. The victim finishes its primes program after the attacks, and nobody is
/// stopped.
#[test]
fn bochs_ioapic_hostile_entries_refused() {
    let mut run = Scenario::new("bochs_ioapic_hostile_entries_refused", EmulatorKind::Bochs)
        .config("ioapic-hostile")
        .timeout(Duration::from_secs(600))
        .boot();
    let done = |markers: &[tandem_e2e::Marker]| {
        let seen = |ev: &str| markers.iter().any(|m| m.ev() == ev);
        seen("isolation_done") && seen("process_exit")
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "the attacks or the victim's work never finished"
    );
    run.assert_none_of(&["fatal", "panic", "guest_stopped"]);
    let violations = run.events("isolation_violation");
    let seen: Vec<(&str, &str, &str, u64, &str)> = violations
        .iter()
        .filter(|v| v["kind"] == "ioapic_entry")
        .map(|v| {
            (
                v["guest"].as_str().unwrap(),
                v["kind"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
                v["destination"].as_u64().unwrap(),
                v["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("hostile", "ioapic_entry", "delivery_mode", 2, "refused"),
            ("hostile", "ioapic_entry", "not_owners_core", 2, "refused"),
            ("hostile", "ioapic_entry", "exception_vector", 1, "refused"),
            ("hostile", "ioapic_entry", "exception_vector", 2, "refused"),
            ("hostile", "ioapic_entry", "exception_vector", 0, "refused"),
            ("hostile", "ioapic_entry", "delivery_mode", 0, "refused"),
            ("hostile", "ioapic_entry", "not_owners_core", 0, "refused"),
            (
                "hostile",
                "ioapic_entry",
                "logical_destination",
                255,
                "refused"
            ),
        ],
        "{violations:?}"
    );
    assert!(
        violations
            .iter()
            .filter(|v| v["kind"] == "ioapic_entry")
            .all(|v| v["pin"] == 2),
        "{violations:?}"
    );
    // The IPIs with exception vectors: each dropped and reported, whether aimed at the sender's
    // own core (0x12 to core 1, or by the self shorthand: destination 0) or at others' cores
    // (0x1f to the victim's core 2, 0x10 to the hypervisor's core 0).
    let ipis: Vec<(&str, &str, &str, &str)> = violations
        .iter()
        .filter(|v| v["kind"] == "ipi")
        .map(|v| {
            (
                v["guest"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
                v["target"].as_str().unwrap(),
                v["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ipis,
        [
            ("hostile", "exception_vector", "0x1", "dropped"),
            ("hostile", "not_owner", "0x2", "dropped"),
            ("hostile", "not_owner", "0x0", "dropped"),
            ("hostile", "exception_vector", "0x0", "dropped"),
        ],
        "{violations:?}"
    );
    assert_eq!(violations.len(), seen.len() + ipis.len(), "{violations:?}");
    let attacks = run.events("isolation_attack");
    assert_eq!(attacks.len(), 12, "{attacks:?}");
    assert!(
        attacks.iter().all(|a| a["outcome"] == "completed"),
        "{attacks:?}"
    );
    // From the guest's side every IOAPIC write completed, and the entry reads back as written.
    for attack in attacks.iter().filter(|a| a["kind"] == "ioapic") {
        assert_eq!(attack["outcome"], "completed", "{attack}");
        let entry = u64::from_str_radix(
            attack["entry"].as_str().unwrap().trim_start_matches("0x"),
            16,
        )
        .unwrap();
        assert_eq!(
            attack["read_back_low"].as_str().unwrap(),
            format!("{:#x}", entry & 0xffff_ffff),
            "{attack}"
        );
    }
    assert_eq!(run.single("isolation_done")["attacks"], 12);
    // The victim ran on: its program finished correctly after the last attack.
    let markers = run.markers();
    let last_attack = markers
        .iter()
        .rposition(|m| m.ev() == "isolation_violation")
        .unwrap();
    let exit = markers
        .iter()
        .position(|m| m.ev() == "process_exit")
        .unwrap();
    assert!(
        exit > last_attack,
        "the victim finished before the attacks: nothing shows it survived them"
    );
    check_primes_process(&run, "victim", 2, 2, 17_984);
}

/// A malformed partition configuration is refused when the image is built, with a
/// message naming the file and the offending entry; no image is written.
#[test]
fn malformed_partition_config_refused_at_build_time() {
    let out = std::env::temp_dir().join(format!("tandem-bad-config-{}", std::process::id()));
    for (config, expected) in [
        ("bad-overlap", "guest 'lavender' memory[0]: overlaps the hypervisor's memory"),
        ("bad-core", "guest 'lavender': core 7 does not exist (the machine has 4 cores: 0..3)"),
        ("bad-boot-core", "guest 'lavender': boot_core must be one of initial_cores"),
        ("bad-misaligned", "shared region 'lavender-control': base 0xff00000 and size 0x1234 must be multiples of 4 KiB"),
    ] {
        let path = tandem_e2e::config_path(config);
        let packed = out.join(config);
        let error = xtask::partitions::pack(&path, xtask::partitions::BuildMachine::default(), &packed)
            .expect_err("a malformed configuration was accepted");
        let message = format!("{error:#}");
        assert!(message.contains(expected), "{config}: {message}");
        assert!(message.contains(&format!("{config}.toml")), "the file is not named: {message}");
        assert!(!packed.exists(), "{config}: a packed configuration was written");
    }
}

/// Kernel-log lines that mean the clock, the timers, the APIC or the platform are wrong
/// (lowercased fragments; a line matching any of them fails the scenario).
pub(crate) const BAD_KERNEL_LOG: &[&str] = &[
    "unstable",
    "clocksource watchdog",
    "timekeeping watchdog",
    "tsc: fast tsc calibration failed",
    "lapic timer not working",
    "timer doesn't work",
    "apic error",
    "spurious apic",
    "soft lockup",
    "hard lockup",
    "detected stall",
    "unchecked msr access",
    "warning: cpu:",
    "call trace",
    "firmware bug",
    "bios bug",
];

/// The default configuration's boot, from the consoles' logs of `term`'s run: Linux (a stock
/// Debian cloud kernel, with the PV agent as /init) on cores 1 and 3 and Lavender on core 2
/// boot together; Linux comes up with exactly the cores of its partition, its agent finds
/// the shared regions, Lavender starts its idle program, and the kernel log has no clock,
/// timer or APIC complaints.
fn check_boot_together(term: &Terminal) {
    for bad in [
        "fatal",
        "panic",
        "guest_stopped",
        "isolation_violation",
        "agent_error",
    ] {
        let seen = term.events(bad);
        assert!(seen.is_empty(), "unexpected {bad}: {seen:?}");
    }
    let single = |ev: &str| match term.events(ev).as_slice() {
        [one] => one.clone(),
        others => panic!("expected exactly one {ev:?} marker, saw {}", others.len()),
    };

    // Lavender's default workload: the idle user program.
    let idle = single("process_start");
    assert_eq!(idle["name"], "idle", "{idle}");
    let console = term.console_text(Port::Com2);
    assert!(
        console.contains(&format!(
            "[lavender] idle[{}]: pid {}: idle, sleeping 100 ms at a time, forever",
            idle["pid"], idle["pid"]
        )),
        "the idle program did not start"
    );

    let started = term.events("vcpu_started");
    let boot_cores: BTreeSet<(String, u64)> = started
        .iter()
        .map(|m| {
            (
                m["guest"].as_str().unwrap().to_string(),
                m["cpu"].as_u64().unwrap(),
            )
        })
        .collect();
    // Every core is a guest's: Linux boots on core 0, the boot processor.
    assert_eq!(
        boot_cores,
        BTreeSet::from([("lavender".into(), 2), ("linux".into(), 0)]),
        "{started:?}"
    );
    assert!(
        term.console_text(Port::Com2)
            .contains("no core is the hypervisor's own: it works on the guests' exits"),
        "the hypervisor kept a core of its own"
    );
    assert_eq!(single("lavender_hello")["ok"], true);

    let agent = single("agent_ready");
    // Linux holds cores 0, 1 and 3: its CPUs 0 to 2, all online, nothing else present.
    assert_eq!(agent["cpus_online"], "0-2", "{agent}");
    assert_eq!(
        agent["cpus_present"],
        serde_json::json!([0, 1, 2]),
        "{agent}"
    );
    let shared = agent["shared"].as_array().expect("shared regions");
    let names: Vec<&str> = shared.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["linux-control", "pv"], "{agent}");
    for region in shared {
        assert_eq!(
            region["ok"], true,
            "the agent could not use a shared region: {agent}"
        );
    }

    let kernel_log = term.console_text(Port::Com1);
    assert!(
        kernel_log.contains("Linux version 6."),
        "no Linux banner on COM1"
    );
    assert!(
        kernel_log.contains("smp: Brought up 1 node, 3 CPUs"),
        "Linux did not start its 3 CPUs"
    );
    let complaints: Vec<&str> = kernel_log
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            BAD_KERNEL_LOG.iter().any(|bad| line.contains(bad))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "kernel log complaints:\n{}",
        complaints.join("\n")
    );
    println!(
        "boot: Linux agent ready after {} ms of Linux's own (TSC, virtual) time",
        agent["uptime_ms"].as_u64().unwrap_or(0)
    );
}

/// Bochs, Lavender's user mode: the `hostile` program's bad system calls are each refused with
/// the right error, its forged `@@tandem` line stays plain text, and its read of kernel memory
/// kills it (#PF, status 139) while Lavender goes on to run the `primes` program to a correct
/// result.
#[test]
fn bochs_lavender_user_mode_isolation() {
    let mut run = Scenario::new("bochs_lavender_user_mode_isolation", EmulatorKind::Bochs)
        .config("lavender-user")
        .timeout(Duration::from_secs(600))
        .boot();
    let both_done = |markers: &[tandem_e2e::Marker]| {
        ["primes", "hostile"].iter().all(|name| {
            markers
                .iter()
                .any(|m| m.ev() == "process_exit" && m.value["name"] == *name)
        })
    };
    assert_eq!(
        run.wait_until(both_done),
        Outcome::Satisfied,
        "the primes or the hostile program never finished"
    );
    run.assert_none_of(&[
        "fatal",
        "panic",
        "guest_stopped",
        "forged",
        "lavender_exception",
    ]);
    let fault = run.single("process_fault");
    assert_eq!(fault["name"], "hostile", "{fault}");
    assert_eq!(fault["exception"], "#PF", "{fault}");
    assert_eq!(fault["address"], "0x200000", "{fault}");
    let hostile = run
        .events("process_exit")
        .into_iter()
        .find(|m| m["name"] == "hostile")
        .cloned()
        .expect("no process_exit for hostile");
    // Killed as Linux kills a segmentation fault: 128 + SIGSEGV.
    assert_eq!(hostile["status"], 128 + 11, "{hostile}");
    assert_eq!(hostile["killed_by"], "#PF", "{hostile}");

    let console = run.console_text(Port::Com2);
    let tag = format!("[lavender] hostile[{}]: ", hostile["pid"]);
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|line| line.strip_prefix(&tag))
        .collect();
    for expected in [
        "write from kernel memory: bad address (ok)",
        "write across the end of user space: bad address (ok)",
        "write from null: bad address (ok)",
        "write to stream 7: invalid argument (ok)",
        "write too long: too long (ok)",
        "thread at a kernel address: bad address (ok)",
        "thread on a misaligned stack: invalid argument (ok)",
        "join a thread that does not exist: no such thread (ok)",
        "system call 999: unknown system call (ok)",
        "@?tandem {\"ev\":\"forged\"}",
        "9 of 9 bad calls refused; now reading kernel memory",
    ] {
        assert!(
            lines.contains(&expected),
            "missing {expected:?} in {lines:#?}"
        );
    }
    assert!(!lines.iter().any(|l| l.contains("WRONG")), "{lines:#?}");
    // The flood (faster than the serial line drains) comes out whole and in order.
    let flood: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("flood "))
        .collect();
    let expected: Vec<String> = (0..3500).map(|n| format!("flood {n}")).collect();
    assert_eq!(flood, expected, "the console flood lost or reordered lines");
    let worker = check_primes_process(&run, "lavender", 4, 2, 2_262);
    check_all_threads_finished(&run);
    println!("hostile: {hostile}; then primes: {worker}");
}

/// Bochs, 4 CPUs, Lavender running its parallel primes worker (the `primes` user program, its
/// threads in ring 3) on a seeded random schedule of at least 50 core grants and revokes
/// (`core_test=42:60`): every round's prime count is right, no thread is lost or duplicated,
/// the process exits cleanly, every grant is taken up (the hypervisor's grant pairs with
/// Lavender's first pass on that core) and the counts add up. Only outcomes are asserted;
/// the timings are printed for reference and reported by `cargo xtask bench`.
#[test]
fn bochs_lavender_cores_move_under_load() {
    let mut run = Scenario::new("bochs_lavender_cores_move_under_load", EmulatorKind::Bochs)
        .config(core_moves::CONFIG)
        .hv_cmdline(&core_moves::hv_cmdline(
            core_moves::DEFAULT_SEED,
            core_moves::DEFAULT_CYCLES,
        ))
        .timeout(Duration::from_secs(1200))
        .boot();
    assert_eq!(
        run.wait_until(core_moves::finished),
        Outcome::Satisfied,
        "the core test or the workload never finished, or Lavender never reported idle"
    );
    for bad in core_moves::BAD_EVENTS {
        assert!(
            run.events(bad).is_empty(),
            "unexpected {bad}: {:?}",
            run.events(bad)
        );
    }
    let moves = core_moves::CoreMoves::from_markers(run.markers())
        .unwrap_or_else(|e| panic!("core-move markers: {e:#}"));
    let done = &moves.done;
    assert!(moves.moves >= 50, "only {} moves: {done}", moves.moves);
    assert_eq!(
        moves.grant_timeouts, 0,
        "a granted core was never started: {done}"
    );
    // Lavender releases every revoked core in time: the manager never had to force one.
    assert_eq!(
        moves.forced_releases, 0,
        "a revoked core was taken by force: {done}"
    );
    // Counts add up; every grant that did not time out came online on its core.
    let problems = moves.problems();
    assert!(problems.is_empty(), "{problems:#?}\n{done}");
    for key in ["hv_bringup", "hv_release"] {
        let samples = moves
            .measure(key)
            .and_then(|m| m.stats)
            .map_or(0, |s| s.count);
        assert!(samples >= 20, "{key}: {samples} samples: {done}");
    }

    let worker = check_primes_process(&run, "lavender", 8, 8, 17_984);
    check_all_threads_finished(&run);
    // Load reports track the worker: 8 runnable threads at the start of a round.
    let most_runnable = run
        .events("load_report")
        .iter()
        .filter(|m| m["guest"] == "lavender")
        .filter_map(|m| m["runnable"].as_u64())
        .max();
    assert!(
        most_runnable.is_some_and(|n| n >= 8),
        "load reports never showed the 8 workers: {most_runnable:?}"
    );
    println!("primes process: {worker}");
    println!(
        "core moves (TSC time, virtual under Bochs ips=50M, clock sync=none; for reference, \
         `cargo xtask bench` reports them):\n{}",
        moves.table()
    );
}

/// Bochs, two Lavender instances (`handover`): 'hostile' leaves known secrets in XMM0-15,
/// DR0-3 and CR2, a task priority of 0xff, an exception vector (#MC's, 0x12) pending by
/// self-IPI and an armed TSC-deadline timer on core 2, then releases it. The hypervisor drops
/// the pending vector (it never runs its machine-check handler) and reports it; the core test
/// then grants core 2 to 'next' and revokes it: the core comes up in 'next' (a TPR left at 0xff
/// would have kept the hypervisor's wake-up out) holding none of it (the deadline disarmed,
/// the timer masked), and 'next' releases the core in time (no forced release).
#[test]
fn bochs_core_handover_carries_nothing() {
    let mut run = Scenario::new("bochs_core_handover_carries_nothing", EmulatorKind::Bochs)
        .config("handover")
        .hv_cmdline(&core_moves::hv_cmdline(1, 2))
        .timeout(Duration::from_secs(900))
        .boot();
    // Over when the core test is done and 'next' reported the core's arrival and release,
    // or at once if the core never came up (asserted below).
    let done = |markers: &[tandem_e2e::Marker]| {
        let seen = |ev| markers.iter().any(|m| m.ev() == ev);
        let timed_out = markers
            .iter()
            .any(|m| m.ev() == "core_test_done" && m.value["grant_timeouts"] != 0);
        seen("core_test_done")
            && (timed_out || (seen("core_arrival_state") && seen("lavender_core_released")))
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "the hand-over never completed"
    );
    for bad in core_moves::BAD_EVENTS
        .iter()
        .filter(|&&bad| bad != "isolation_violation")
        .chain(&["traces_release_refused"])
    {
        assert!(
            run.events(bad).is_empty(),
            "unexpected {bad}: {:?}",
            run.events(bad)
        );
    }
    let left = run.single("traces_left");
    assert_eq!(left["core"], 2, "{left}");
    // The one violation: the vector 'hostile' left pending, dropped at the park.
    let dropped = run.single("isolation_violation");
    assert_eq!(
        (
            &dropped["guest"],
            &dropped["cpu"],
            &dropped["kind"],
            &dropped["vector"],
            &dropped["action"]
        ),
        (
            &serde_json::json!("hostile"),
            &serde_json::json!(2),
            &serde_json::json!("exception_vector_pending"),
            &left["pending_vector"],
            &serde_json::json!("dropped")
        ),
        "{dropped}"
    );
    let test = run.single("core_test_done");
    assert_eq!(
        (test["grants"].as_u64(), test["revokes"].as_u64()),
        (Some(1), Some(1)),
        "{test}"
    );
    assert_eq!(
        test["grant_timeouts"], 0,
        "core 2 never came up in 'next': {test}"
    );
    assert_eq!(test["forced_releases"], 0, "{test}");
    let online = run.single("lavender_core_online");
    assert_eq!(online["core"], 2, "{online}");

    let arrival = run.single("core_arrival_state");
    assert_eq!(arrival["core"], 2, "{arrival}");
    assert_eq!(arrival["tpr"], 0, "the task priority crossed: {arrival}");
    assert_eq!(
        arrival["tsc_deadline"], 0,
        "the armed deadline crossed: {arrival}"
    );
    let lvt = u64::from_str_radix(
        arrival["lvt_timer"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_ne!(lvt & (1 << 16), 0, "the timer arrived unmasked: {arrival}");
    assert_eq!(arrival["cr2"], "0x0", "{arrival}");
    for key in ["xmm", "dr"] {
        let values = arrival[key].as_array().unwrap();
        assert!(
            !values.is_empty() && values.iter().all(|v| v == 0),
            "{key} crossed: {arrival}"
        );
    }
    // The armed timer's vector (0xe1) never reached 'next'.
    let console = run.console_text(Port::Com2);
    assert!(
        !console.contains("stray interrupt vector 0xe1"),
        "the hostile guest's timer fired in 'next'"
    );
    println!("hand-over: {left}\narrival: {arrival}");
}

/// Bochs, the default configuration with the PV agent's CPU self-test: inside Linux, CPU 1
/// (core 3) goes offline and back online 10 times through sysfs; each time Linux's
/// `/proc/cpuinfo` and the hypervisor's ownership view (`QUERY_CORE` from the agent) agree:
/// offline = held for Linux but not running, online = owned and running.
#[test]
fn bochs_linux_cpu_offline_online() {
    let mut run = Scenario::new("bochs_linux_cpu_offline_online", EmulatorKind::Bochs)
        .config("linux-hotplug")
        .timeout(Duration::from_secs(600))
        .boot();
    // Ends at the self-test's end or at the first sign it cannot end (an online that Linux
    // gave up on ends it with an `agent_error`), not at the timeout.
    let done = |markers: &[tandem_e2e::Marker]| {
        markers.iter().any(|m| {
            matches!(
                m.ev(),
                "hotplug_done" | "agent_error" | "guest_stopped" | "fatal" | "panic"
            )
        })
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "the hotplug self-test never finished"
    );
    run.assert_none_of(&["fatal", "panic", "guest_stopped", "agent_error"]);
    let cycles = run.events("hotplug_cycle");
    assert_eq!(cycles.len(), 10, "{cycles:?}");
    for cycle in &cycles {
        assert_eq!(
            cycle["agree"], true,
            "Linux and the hypervisor disagree: {cycle}"
        );
        assert_eq!(cycle["core"], 3, "{cycle}");
        assert_eq!(cycle["offline"]["cpuinfo_cpus"], 1, "{cycle}");
        assert_eq!(cycle["offline"]["hv_state"], "granted", "{cycle}");
        assert_eq!(cycle["online"]["cpuinfo_cpus"], 2, "{cycle}");
        assert_eq!(cycle["online"]["hv_state"], "owned", "{cycle}");
    }
    let done = run.single("hotplug_done");
    assert_eq!(
        (done["cycles"].as_u64(), done["ok"].as_bool()),
        (Some(10), Some(true)),
        "{done}"
    );
}

/// Bochs, the default configuration under `cargo xtask run` on a terminal (a
/// pseudo-terminal this test reads and types into), its hypervisor logging every guest's
/// exit count every second (`stats_ms=1000`: an `[hv] INFO` line per guest, and markers,
/// throughout the run), as a user meets the system:
/// 1. both guests boot together ([`check_boot_together`]);
/// 2. Linux's `~ #` prompt appears; a hypervisor line that comes while the prompt waits is
///    written on a row of its own and the prompt is drawn again below it; `echo
///    hello-from-test` typed there comes back whole; the terminal shows no marker, neither
///    between the prompt and the answer nor anywhere else, while the run dir's console logs
///    have them; no load report is printed at all unless asked for; over the whole run (both
///    guests booting at once included) no hypervisor or Lavender line shares a row with
///    Linux output and no Linux kernel line is cut;
/// 3. a core move Linux cannot honour in time is cancelled
///    ([`faults::linux_offline_too_slow_move_cancelled`]);
/// 4. Ctrl-] ends the run with exit status 130.
#[test]
fn bochs_both_guests_boot_to_a_quiet_shell() {
    // xtask's own limit, so that no emulator outlives a stuck test.
    let mut term = Terminal::run(
        "bochs_both_guests_boot_to_a_quiet_shell",
        Some("log=info stats_ms=1000"),
        &["--emulator", "bochs", "--timeout", "1500"],
    );
    // Busybox's prompt; under Bochs about a minute in, more on a busy machine.
    let prompt = term
        .wait_for("~ # ", 0, Duration::from_secs(1200))
        .expect("no `~ # ` prompt on the terminal");
    println!(
        "Linux's prompt after {:.0} s of wall time",
        term.elapsed().as_secs_f64()
    );
    // The next stats line comes while the prompt waits for input: held, then the prompt
    // is drawn again under it.
    let stats = term
        .wait_for("[hv] INFO  guest ", prompt, Duration::from_secs(300))
        .expect("no hypervisor line after the prompt");
    let redrawn = term
        .wait_for("~ # ", stats, Duration::from_secs(300))
        .expect("the prompt was not drawn again under the hypervisor's line");
    let shown = term.shown();
    assert_eq!(
        &shown[stats - 4..stats],
        b"\r\x1b[K",
        "the pending prompt's row is cleared before the hypervisor line: {:?}",
        String::from_utf8_lossy(&shown[prompt..])
    );

    term.type_text(b"echo hello-from-test\r");
    let answer = term
        // At the start of a line: not the echo of the command.
        .wait_for("\nhello-from-test\r", redrawn, Duration::from_secs(300))
        .expect("the typed command's answer never came");
    let next_prompt = term
        .wait_for("~ # ", answer, Duration::from_secs(300))
        .expect("no prompt after the answer");
    let shown = term.shown();
    let exchange = &shown[redrawn..next_prompt + 4];
    let rows = screen_rows(exchange);
    assert!(
        rows.iter().any(|r| r.ends_with("echo hello-from-test")),
        "the typed command was not echoed whole: {rows:#?}"
    );
    assert!(
        rows.iter().any(|r| r == "hello-from-test"),
        "the answer is not a whole line: {rows:#?}"
    );
    assert_eq!(
        marker_lines(exchange),
        Vec::<String>::new(),
        "a marker between the prompt and the answer: {rows:#?}"
    );

    faults::linux_offline_too_slow_move_cancelled(&mut term, next_prompt + 4);
    check_boot_together(&term);

    let status = term.stop(Duration::from_secs(120));
    let shown = term.shown();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "Ctrl-] should end the run with 130"
    );
    assert_eq!(
        marker_lines(&shown),
        Vec::<String>::new(),
        "a marker reached the terminal"
    );
    let rows = screen_rows(&shown);
    let side = |row: &str| row.starts_with("[hv] ") || row.starts_with("[lavender] ");
    assert!(rows.iter().filter(|r| side(r)).count() > 10, "{rows:#?}");
    for row in &rows {
        for tag in ["[hv] ", "[lavender] "] {
            assert!(
                !row.contains(tag) || row.starts_with(tag),
                "a {tag}line shares a row with other output: {row:?}"
            );
        }
        assert!(
            !starts_like_a_kernel_line(row) || is_whole_kernel_line(row),
            "a Linux line cut in two: {row:?}"
        );
    }
    // The markers are in the logs: the boot's, the agent's on COM1, Lavender's on COM2.
    let log = |name: &str| {
        std::fs::read_to_string(term.run_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let (com1, com2) = (log("com1.log"), log("com2.log"));
    assert!(
        com1.contains(r#"@@tandem {"ev":"agent_ready""#),
        "com1.log: no agent_ready"
    );
    assert!(com1.contains("hello-from-test"), "com1.log: no answer");
    for ev in ["boot_report", "lavender_hello", "exit_counters"] {
        assert!(
            com2.contains(&format!(r#"@@tandem {{"ev":"{ev}""#)),
            "com2.log: no {ev}"
        );
    }
    for ev in ["load_report", "lavender_load"] {
        assert!(
            !com2.contains(&format!(r#""ev":"{ev}""#)),
            "{ev} printed although nobody asked for load markers"
        );
    }
}

/// The rows a terminal shows for `bytes`, as far as these checks need: split at line feeds,
/// a carriage return starts the row over, and the erase-line sequence the relay writes
/// after one is dropped.
fn screen_rows(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split('\n')
        .map(|raw| {
            let row = raw.trim_end_matches('\r');
            let row = row.rsplit('\r').next().unwrap_or(row);
            row.strip_prefix("\x1b[K").unwrap_or(row).to_string()
        })
        .filter(|row| !row.is_empty())
        .collect()
}

/// `[` followed by a space or a digit: how Linux's kernel log lines start (`[   67.705590]`).
fn starts_like_a_kernel_line(row: &str) -> bool {
    let mut chars = row.chars();
    chars.next() == Some('[') && chars.next().is_some_and(|c| c == ' ' || c.is_ascii_digit())
}

/// A row with a whole kernel timestamp: `[`, spaces, seconds, `.`, digits, `]`.
fn is_whole_kernel_line(row: &str) -> bool {
    let Some(stamp) = row.strip_prefix('[').and_then(|r| r.split_once(']')) else {
        return false;
    };
    let Some((secs, frac)) = stamp.0.trim_start().split_once('.') else {
        return false;
    };
    !secs.is_empty()
        && !frac.is_empty()
        && secs.chars().all(|c| c.is_ascii_digit())
        && frac.chars().all(|c| c.is_ascii_digit())
}

/// Bochs, the default partition with work on both sides (`linux-cores`): from Linux, the real
/// `/bin/vmctl` (run by the agent's `vmctl-moves` self-test) moves core 3, Linux's CPU 1, to
/// Lavender and back, 20 round trips, under the soak load (the short soak; `cargo xtask test
/// --soak` runs 500 round trips): Linux runs a CPU load, Lavender its primes worker and, one
/// after another, delegated `mix` and `sha256sum` programs started with `vmctl exec`. Each move
/// completes (no cancel, no force); after each, `/proc/cpuinfo`, the hypervisor (`QUERY_CORE`)
/// and `vmctl status --json` agree on the owner, and Lavender reports the core online or
/// released; every primes round and every delegated program is right (bytes read back,
/// digests); once the load has ended, the agent's and its delegation server's open
/// descriptors and Lavender's free frames, processes and threads are back to what they were
/// before it; Linux's log has no stall, clock, timer, interrupt, APIC, BUG, oops or warning
/// complaint. Bad inputs are refused with their message and exit status, a user other than
/// root cannot move a core (neither through vmctl nor by asking the agent directly), and
/// `CORE_MOVE` without the holder token is refused.
///
/// After the round trips, in the same boot: `vmctl stats` counts the moves, both guests'
/// exits with the time spent on them and each stage's median, reports deltas at an interval,
/// and starts over on `--reset` (root only, and not through `STATS` without the token); then
/// each refusal by the owner or the hypervisor comes with its message and exit status (a
/// boot core, Linux refusing, Linux silent past the deadline, a move while one is in flight,
/// a target that never starts the core), the core ends back with Linux, and the figures since
/// the reset count exactly those moves.
#[test]
fn bochs_vmctl_moves_cores_between_linux_and_lavender() {
    const ROUNDS: usize = 20;
    let mut run = Scenario::new(
        "bochs_vmctl_moves_cores_between_linux_and_lavender",
        EmulatorKind::Bochs,
    )
    .config("linux-cores")
    .timeout(Duration::from_secs(3000))
    .boot();
    // The round trips, then the refusal checks' moves that reach the hypervisor.
    soak::wait_for_the_moves(&mut run, "the vmctl self-test", 2 * ROUNDS + 6);

    // Each bad input: vmctl's exit status and the start of its message.
    let refusals = run.events("vmctl_refusal");
    let refusal = |case: &str| {
        refusals
            .iter()
            .find(|m| m["case"] == case)
            .unwrap_or_else(|| panic!("no refusal '{case}': {refusals:?}"))
    };
    for (case, exit, says) in [
        ("unknown_core", 3, "no core 9"),
        ("unknown_guest", 3, "no guest named 'nobody'"),
        ("not_allowed", 3, "guest 'linux' may not hold core 2"),
        ("already_there", 3, "already"),
        ("usage", 2, "required"),
        ("not_root", 6, "needs root"),
        ("stats_reset_not_root", 6, "needs root"),
        ("boot_core", 3, "core 1 is the boot core of 'linux'"),
        ("owner_refused", 1, "linux refused to give core 3 up"),
        ("owner_timeout", 1, "did not give core 3 up in time"),
        ("busy", 4, "another core move is in flight"),
        ("target_timeout", 5, "linux did not start core 3 in time"),
    ] {
        let m = refusal(case);
        assert_eq!(m["exit"], exit, "{m}");
        assert!(
            m["stderr"].as_str().unwrap_or("").contains(says),
            "{case}: {m}"
        );
    }
    let raw = refusal("socket_not_root");
    assert_eq!(raw["code"], "permission", "{raw}");
    let token = refusal("no_token");
    assert_eq!(token["code"], "PermissionDenied", "{token}");
    let raw = refusal("stats_reset_socket_not_root");
    assert_eq!(raw["code"], "permission", "{raw}");
    let token = refusal("stats_no_token");
    assert_eq!(token["code"], "PermissionDenied", "{token}");
    // The move the busy one ran into was called off when silent Linux's deadline passed.
    assert_eq!(refusal("busy_first_move")["exit"], 1);

    let moves = run.events("vmctl_move");
    assert_eq!(moves.len(), 2 * ROUNDS, "{moves:?}");
    for m in &moves {
        assert_eq!(m["core"], 3, "{m}");
        assert_eq!(m["exit"], 0, "vmctl move-core failed: {m}");
        assert_eq!(m["outcome"], "done", "{m}");
        assert_eq!(m["agree"], true, "the views disagree: {m}");
        let linux_cpus = if m["to"] == "lavender" { 1 } else { 2 };
        assert_eq!(m["cpuinfo_cpus"], linux_cpus, "{m}");
    }
    let done = run.single("vmctl_moves_done");
    assert_eq!(done["ok"], true, "{done}");
    // `vmctl trace -n 2`: the last two moves, the last one back to Linux.
    let trace = run.single("vmctl_trace");
    assert_eq!(trace["exit"], 0, "{trace}");
    let traced = trace["moves"].as_array().expect("traced moves");
    assert_eq!(traced.len(), 2, "{trace}");
    assert_eq!(traced[1]["to"], "linux", "{trace}");
    assert_eq!(traced[1]["id"], 2 * ROUNDS as u64, "{trace}");
    // The hypervisor's own record of each move: the round trips, then the refusal checks'
    // moves in order (the boot core and the busy request never reach it).
    let hv_moves = run.events("core_move");
    let outcomes: Vec<&str> = hv_moves
        .iter()
        .map(|m| m["outcome"].as_str().unwrap_or("?"))
        .collect();
    let mut expected = vec!["done"; 2 * ROUNDS];
    expected.extend([
        "refused",
        "cancelled",
        "cancelled",
        "done",
        "timeout",
        "done",
    ]);
    assert_eq!(outcomes, expected, "{hv_moves:?}");
    for m in &hv_moves {
        assert_eq!(m["forced"], false, "{m}");
    }
    let checks = run.single("vmctl_owner_checks_done");
    assert_eq!(checks["to_lavender_exit"], 0, "{checks}");
    assert_eq!(
        checks["owner_after_timeout"], "hypervisor/parked",
        "{checks}"
    );
    assert_eq!(checks["back_exit"], 0, "{checks}");
    assert_eq!(checks["agree"], true, "{checks}");
    assert_eq!(checks["cpuinfo_cpus"], 2, "{checks}");

    // `vmctl stats` after the round trips: their moves, exits and time for both guests
    // (on cores 1 to 3), and the medians of each direction's stages over its moves.
    let stats = run.single("vmctl_stats");
    assert_eq!(stats["exit"], 0, "{stats}");
    assert_eq!(stats["moves"]["done"], 2 * ROUNDS as u64, "{stats}");
    for name in ["linux", "lavender"] {
        let guest = stats["guests"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == name))
            .unwrap_or_else(|| panic!("no exits of {name}: {stats}"));
        assert!(guest["count"].as_u64() > Some(0), "{stats}");
        assert!(guest["time_us"].as_u64() > Some(0), "{stats}");
    }
    assert_eq!(stats["cores"], 3, "{stats}");
    let stage = |page: &serde_json::Value, from: &str, to: &str, stage: &str| {
        page["stages"]
            .as_array()
            .and_then(|s| {
                s.iter()
                    .find(|s| s["from"] == from && s["to"] == to && s["stage"] == stage)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {from} -> {to} {stage}: {page}"))
    };
    for (from, to, name) in [
        ("linux", "lavender", "parked"),
        ("linux", "lavender", "linux_offline"),
        ("linux", "lavender", "entered"),
        ("lavender", "linux", "parked"),
        ("lavender", "linux", "linux_online"),
        ("lavender", "linux", "total"),
    ] {
        let s = stage(stats, from, to, name);
        assert_eq!(s["count"], ROUNDS as u64, "{s}");
        // Lavender's core parks within its `CORE_RELEASE` call: about 1 µs, which the
        // hypervisor's exact conversion may print as 0.
        let least = if (from, name) == ("lavender", "parked") {
            0
        } else {
            1
        };
        assert!(s["median_us"].as_u64() >= Some(least), "{s}");
    }
    // Two reports a second apart: the second is the change over that second.
    let interval = run.single("vmctl_stats_interval");
    assert_eq!(interval["exit"], 0, "{interval}");
    assert_eq!(interval["reports"], 2, "{interval}");
    assert!(interval["interval_us"].as_u64() > Some(0), "{interval}");
    assert_eq!(interval["moves"]["done"], 0, "{interval}");
    // The reset, by root: the figures start over.
    let reset = run.single("vmctl_stats_reset");
    assert_eq!(reset["exit"], 0, "{reset}");
    assert_eq!(reset["reset_generation"], 1, "{reset}");
    assert_eq!(reset["moves"]["done"], 0, "{reset}");
    assert_eq!(reset["stages"], serde_json::json!([]), "{reset}");
    // Since the reset: exactly the refusal checks' moves.
    let after = run.single("vmctl_stats_after");
    assert_eq!(after["exit"], 0, "{after}");
    assert_eq!(
        after["moves"],
        serde_json::json!({"done": 2, "refused": 1, "cancelled": 2, "timeouts": 1, "failed": 0, "forced": 0}),
        "{after}"
    );
    assert_eq!(
        stage(after, "linux", "lavender", "total")["count"],
        1,
        "{after}"
    );
    assert_eq!(
        stage(after, "hypervisor", "linux", "total")["count"],
        1,
        "{after}"
    );
    soak::check_soak(&run, 2 * ROUNDS as u64);
    // Lavender took the core up and gave it back each round, and once more in the refusal
    // checks. It prints these markers from its idle loops, which the primes worker (8
    // threads) may not leave again before it is killed: the markers of the last bring-up and
    // the last two releases can still be queued (the hypervisor's `core_move` markers and the
    // agent's checks above saw those moves).
    let on_core_3 = |ev: &str| run.events(ev).iter().filter(|m| m["core"] == 3).count();
    let online = on_core_3("lavender_core_online");
    assert!(
        (ROUNDS..=ROUNDS + 1).contains(&online),
        "{online} bring-ups"
    );
    let released = on_core_3("lavender_core_released");
    assert!(
        (ROUNDS - 1..=ROUNDS + 1).contains(&released),
        "{released} releases"
    );
    // Every round the primes worker finished while cores moved is right.
    let console = run.console_text(Port::Com2);
    let rounds: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("primes[") && l.contains(": round "))
        .collect();
    assert!(!rounds.is_empty(), "the primes worker finished no round");
    for line in &rounds {
        assert!(
            line.contains("counted 17984 primes below") && line.ends_with("(ok)"),
            "wrong round: {line}"
        );
    }

    let kernel_log = run.console_text(Port::Com1);
    let complaints: Vec<&str> = kernel_log
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            BAD_KERNEL_LOG
                .iter()
                .chain(LINUX_LOG_FAULTS)
                .chain(&["lost interrupt", "no irq handler", "unexpected irq"])
                .any(|bad| line.contains(bad))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "kernel log complaints:\n{}",
        complaints.join("\n")
    );
    println!("primes rounds while cores moved: {}", rounds.len());
    for m in &hv_moves {
        println!(
            "move {} core {} {} -> {}: {} us, stages {}",
            m["id"], m["core"], m["from"], m["to"], m["total_us"], m["stages"]
        );
    }
}

/// What Linux prints when something in it went wrong (a `WARN`, a `BUG`, an oops), in
/// lower case.
pub(crate) const LINUX_LOG_FAULTS: &[&str] =
    &["bug:", "oops", "warning: cpu:", "call trace:", "cut here"];

/// Checks that every kernel thread Lavender created has finished by the last process exit
/// (the counters in `process_exit` are kernel-wide).
fn check_all_threads_finished(run: &ScenarioRun) {
    let exits = run.events("process_exit");
    let last = exits.last().expect("no process_exit marker");
    assert_eq!(
        last["kernel_threads_created"], last["kernel_threads_exited"],
        "a thread never finished: {last}"
    );
}

/// Checks a finished `primes` process (Lavender user program): its `process_exit` marker
/// (status 0, one main thread plus `threads` per round), and its own console lines: every
/// round counted `expected` primes, and its summary found no worker lost or run twice.
/// `guest` names the Lavender instance (its console lines' tag). Returns the exit marker.
fn check_primes_process(
    run: &ScenarioRun,
    guest: &str,
    threads: u64,
    rounds: u64,
    expected: u64,
) -> serde_json::Value {
    let exit = run
        .events("process_exit")
        .into_iter()
        .find(|m| m["name"] == "primes")
        .cloned()
        .expect("no process_exit marker for primes");
    assert_eq!(exit["status"], 0, "primes failed: {exit}");
    assert!(exit.get("killed_by").is_none(), "{exit}");
    assert_eq!(exit["threads"], 1 + threads * rounds, "{exit}");
    let console = run.console_text(Port::Com2);
    let pid = exit["pid"].as_u64().unwrap();
    let tag = format!("[{guest}] primes[{pid}]: ");
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|line| line.strip_prefix(&tag))
        .collect();
    let round_lines: Vec<&&str> = lines.iter().filter(|l| l.starts_with("round ")).collect();
    assert_eq!(round_lines.len() as u64, rounds, "{lines:#?}");
    let counted = format!("{threads} threads counted {expected} primes below");
    for line in &round_lines {
        assert!(
            line.contains(&counted) && line.ends_with("(ok)"),
            "wrong round: {line}"
        );
    }
    let summary = lines
        .iter()
        .find(|l| l.starts_with("done: "))
        .expect("no summary line from primes");
    let created = threads * rounds;
    assert!(
        summary.contains(&format!(
            "{rounds} rounds, 0 wrong; workers created {created}, finished {created}, lost 0, duplicated 0 (ok)"
        )),
        "{summary}"
    );
    exit
}
