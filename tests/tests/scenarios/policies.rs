//! The core-allocation policies (`static`, `autonomous`, `cooperative`) on one Linux and
//! Lavender boot with a phase-changing load, switched at run time with `vmctl rebalance`.

use std::time::Duration;

use tandem_e2e::{EmulatorKind, Outcome, Port, Scenario};

/// The autonomous policy's first decision after the switch, with Lavender already busy
/// (hypervisor TSC time, virtual under Bochs with `clock: sync=none`). It samples every 1 ms
/// and confirms a move over 3 periods, so it decides 3 ms after Linux's cores go idle; the
/// rest is Linux finishing the `vmctl rebalance` that made the switch (its process, the agent
/// waiting for the status page), which the policy rightly sees as Linux being busy.
const AUTONOMOUS_DECISION_US: u64 = 1_000_000;
/// The cooperative policy arbitrates when a report arrives and makes a revoke once the reports
/// called for it over its 50 ms hold: from the later of the two reports it decided on to the
/// decision, the hold and a sampling period at most.
const COOPERATIVE_DECISION_US: u64 = 60_000;
/// A move, once decided: Linux takes its CPU offline or online through sysfs (~150 ms).
const MOVE_US: u64 = 2_000_000;

/// Bochs, the default partition (`policies`: the boot policy is `static`; Lavender runs its
/// primes worker for 40 rounds from boot; Linux's agent runs `tandem.selftest=policies`).
/// Under `static` no core moves while Lavender is busy and Linux idle; `vmctl rebalance
/// --policy autonomous --period-ms 1` moves core 3 from Linux to the busy Lavender within
/// [`AUTONOMOUS_DECISION_US`] of the switch, then nothing moves under the steady load;
/// `vmctl rebalance --policy cooperative` moves nothing while the load holds; when Linux runs
/// two CPU-bound tasks (and asks for a core) and Lavender offers one (between two rounds of
/// its worker, or once it ends), the core comes back to Linux within
/// [`COOPERATIVE_DECISION_US`] of the reports that made it due, and stays there once
/// Lavender's worker is done. `vmctl status` names the policy and the
/// last move's reason, `vmctl trace` the reason of each move. About 12 minutes of wall time.
#[test]
fn bochs_policies_follow_a_phase_changing_load() {
    let mut run = Scenario::new(
        "bochs_policies_follow_a_phase_changing_load",
        EmulatorKind::Bochs,
    )
    .config("policies")
    .timeout(Duration::from_secs(3000))
    .boot();
    let done = |markers: &[tandem_e2e::Marker]| {
        markers.iter().any(|m| {
            matches!(
                m.ev(),
                "policies_done" | "agent_error" | "guest_stopped" | "fatal"
            )
        })
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "the policies self-test never finished"
    );
    for bad in [
        "fatal",
        "panic",
        "guest_stopped",
        "agent_error",
        "isolation_violation",
    ] {
        assert!(
            run.events(bad).is_empty(),
            "unexpected {bad}: {:?}",
            run.events(bad)
        );
    }
    let phases = run.events("policy_phase");
    let phase = |name: &str| {
        phases
            .iter()
            .find(|m| m["phase"] == name)
            .unwrap_or_else(|| panic!("no phase '{name}': {phases:?}"))
    };
    for switch in run.events("policy_switch") {
        assert_eq!(switch["exit"], 0, "{switch}");
    }

    let fixed = phase("static");
    assert_eq!(fixed["policy"], "static", "{fixed}");
    assert_eq!(fixed["moves_during"], 0, "static moved a core: {fixed}");
    assert_eq!(fixed["owner"], "linux", "{fixed}");

    let auto = phase("autonomous");
    assert_eq!(auto["policy"], "autonomous", "{auto}");
    assert_eq!(auto["owner"], "lavender", "{auto}");
    assert_eq!(auto["moves_during"], 1, "{auto}");
    assert_eq!(auto["reason"], "busiest_from_idlest", "{auto}");
    assert!(
        auto["taker_busy_permille"].as_u64().unwrap() >= 850,
        "{auto}"
    );
    assert!(
        auto["giver_busy_permille"].as_u64().unwrap() <= 500,
        "{auto}"
    );
    let reaction = auto["reaction_us"].as_u64().unwrap();
    assert!(
        reaction <= AUTONOMOUS_DECISION_US,
        "autonomous took {reaction} us: {auto}"
    );
    assert!(auto["move_total_us"].as_u64().unwrap() <= MOVE_US, "{auto}");
    assert_eq!(auto["forced"], false, "{auto}");
    for steady in ["autonomous_steady", "cooperative_steady"] {
        let p = phase(steady);
        assert_eq!(p["moves_during"], 0, "a steady load moved a core: {p}");
        assert_eq!(p["owner"], "lavender", "{p}");
    }

    let coop = phase("cooperative");
    assert_eq!(coop["policy"], "cooperative", "{coop}");
    assert_eq!(coop["owner"], "linux", "{coop}");
    assert_eq!(coop["moves_during"], 1, "{coop}");
    assert_eq!(coop["reason"], "requested", "{coop}");
    assert!(coop["taker_runnable"].as_u64().unwrap() >= 2, "{coop}");
    let reaction = coop["after_reports_us"].as_u64().unwrap();
    assert!(
        reaction <= COOPERATIVE_DECISION_US,
        "cooperative took {reaction} us: {coop}"
    );
    assert!(coop["move_total_us"].as_u64().unwrap() <= MOVE_US, "{coop}");
    let idle = phase("cooperative_lavender_idle");
    assert_eq!(idle["moves_during"], 0, "{idle}");
    assert_eq!(idle["owner"], "linux", "{idle}");

    // The hypervisor's own record: one decision per move, each carried out.
    let decisions = run.events("policy_decision");
    let reasons: Vec<_> = decisions
        .iter()
        .map(|d| (d["policy"].as_str().unwrap(), d["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [("autonomous", "lavender"), ("cooperative", "linux")],
        "{decisions:?}"
    );
    let moves = run.events("core_move");
    assert_eq!(moves.len(), 2, "{moves:?}");
    for m in &moves {
        assert_eq!(m["outcome"], "done", "{m}");
        assert_eq!(m["by"], "hypervisor", "{m}");
    }

    // What a user reads.
    let shown = run.single("policy_status");
    assert_eq!(shown["status_exit"], 0, "{shown}");
    let status = shown["status"].as_str().unwrap();
    assert!(
        status.contains("policy: cooperative (period 1 ms)")
            && status.contains("core 3 lavender -> linux (requested, done)"),
        "vmctl status:\n{status}"
    );
    let trace = shown["trace"].as_str().unwrap();
    assert!(
        trace.contains("(busiest_from_idlest, by hypervisor)")
            && trace.contains("(requested, by hypervisor)"),
        "vmctl trace:\n{trace}"
    );

    let kernel_log = run.console_text(Port::Com1);
    let complaints: Vec<&str> = kernel_log
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            super::BAD_KERNEL_LOG.iter().any(|bad| line.contains(bad))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "kernel log complaints:\n{}",
        complaints.join("\n")
    );
    for p in &phases {
        println!("{p}");
    }
}
