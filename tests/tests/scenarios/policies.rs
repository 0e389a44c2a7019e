//! The core-allocation policies (`static`, `autonomous`, `cooperative`) on one Linux and
//! Lavender boot with a phase-changing load, switched at run time with `vmctl rebalance`.

use std::time::Duration;

use hypervisor::policy::RELEASE_AFTER_LAVENDER_US;
use tandem_e2e::{EmulatorKind, Outcome, Port, Scenario};

/// The autonomous policy's first decision after the switch, with Lavender already busy
/// (hypervisor TSC time, virtual under Bochs with `clock: sync=none`). It samples every 1 ms
/// and confirms a move over 3 periods, so it decides 3 ms after Linux's cores go idle; the
/// rest is Linux finishing the `vmctl rebalance` that made the switch (its process, the agent
/// waiting for the status page), which the policy rightly sees as Linux being busy.
const AUTONOMOUS_DECISION_US: u64 = 1_000_000;
/// Cooperative, load step -> decision: it arbitrates on the report that carries the step (the
/// goal is 1 ms; the bound leaves room for a pass finishing a console line under Bochs).
const COOPERATIVE_AFTER_STEP_US: u64 = 10_000;
/// A move, once decided: Linux takes its CPU offline or online through sysfs (~150 ms).
const MOVE_US: u64 = 2_000_000;

/// Bochs, the `policies` partitions (Linux boots on core 0: the hypervisor has no core of its
/// own and works on the guests' exits; the boot policy is `static`; Linux's agent runs
/// `tandem.selftest=policies`, which starts and kills Lavender's primes worker with `vmctl
/// exec --detach` / `vmctl kill` and runs CPU loops in Linux). Under `static` no core moves
/// while Lavender is busy and Linux idle; `vmctl rebalance --policy autonomous --period-ms 1`
/// moves core 3 to the busy Lavender within [`AUTONOMOUS_DECISION_US`] of the switch, nothing
/// moves under the steady load, and when Linux gets busy and Lavender idle the core comes back
/// from the idle Lavender (through the hypervisor's pool when Lavender's idling came first:
/// a core nobody wants goes back there); `vmctl rebalance --policy cooperative`,
/// made while both run, moves nothing while the load holds; then the core goes to Lavender
/// and back to Linux at each phase change within [`COOPERATIVE_AFTER_STEP_US`] of the step
/// (back through the pool: Lavender's worker killed, its final offer sends the core there at
/// once), and nothing moves in between; a negotiable `vmctl move-core` while Lavender is busy is
/// declined (`busy`), which vmctl and `vmctl trace` say. `vmctl status` names the policy and
/// the last move's reason, `vmctl trace` the reason of each move.
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
    run.assert_none_of(&[
        "fatal",
        "panic",
        "guest_stopped",
        "agent_error",
        "isolation_violation",
    ]);
    let phases = run.events("policy_phase");
    for p in &phases {
        println!("{p}");
    }
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

    // A move toward the busy guest: one, for the policy's reason, from a busy taker and an
    // idle giver, carried out without force; from the pool when the idle giver gave the core
    // back there first (two moves then).
    let moved = |name: &str, policy: &str, to: &str, reason: &str| {
        let p = phase(name);
        assert_eq!(p["policy"], policy, "{p}");
        assert_eq!(p["owner"], to, "{p}");
        let moves = if p["from"] == "hypervisor" { 2 } else { 1 };
        assert_eq!(p["moves_during"], moves, "{p}");
        assert_eq!(p["reason"], reason, "{p}");
        assert!(p["move_total_us"].as_u64().unwrap() <= MOVE_US, "{p}");
        assert_eq!(p["forced"], false, "{p}");
        (*p).clone()
    };
    let auto = moved(
        "autonomous",
        "autonomous",
        "lavender",
        "busiest_from_idlest",
    );
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
    // Back to the busy Linux, from the idle giver. Its time is not judged here: autonomous
    // reads no report, and the reports that would date the step include the `vmctl kill`
    // that ends Lavender's worker (Linux's steadied request can start with it, 0.03 to 1.3 s
    // before the decision in the runs seen); `cargo xtask bench --only policies-quick` times it.
    let back = moved(
        "autonomous_back",
        "autonomous",
        "linux",
        "busiest_from_idlest",
    );
    assert!(
        back["giver_busy_permille"].as_u64().unwrap() <= 500,
        "{back}"
    );
    for name in ["cooperative", "cooperative_back"] {
        let to = if name == "cooperative" {
            "lavender"
        } else {
            "linux"
        };
        let p = moved(name, "cooperative", to, "requested");
        // The taker asked for both cores: Lavender for its runnable threads, Linux for its
        // runnable tasks or, while they waited for its one CPU, one CPU more (the runnable
        // count of an instant reads two CPU-bound tasks on one CPU as one now and then).
        assert!(p["taker_wants"].as_u64().unwrap() >= 2, "{p}");
        let after = p["after_step_us"].as_u64().unwrap();
        assert!(
            after <= COOPERATIVE_AFTER_STEP_US,
            "cooperative took {after} us after the step: {p}"
        );
    }
    // Lavender's worker killed under cooperative: its report says the offer of the core is
    // final (the work that used it ended), and the core goes to the pool on that report,
    // without the 10 ms an offer that is not final waits (a job between two phases).
    // (Where the core is by the time the agent looks may be Linux again: its own `vmctl`
    // processes can make it ask for the core meanwhile.)
    let released = phase("cooperative_release");
    assert_eq!(released["policy"], "cooperative", "{released}");
    assert_eq!(released["reason"], "unwanted", "{released}");
    assert_eq!(released["from"], "lavender", "{released}");
    assert_eq!(released["giver_final_offer"], true, "{released}");
    let after = released["after_step_us"].as_u64().unwrap();
    assert!(
        after < RELEASE_AFTER_LAVENDER_US,
        "the final offer waited {after} us: {released}"
    );
    for (steady, policy, owner) in [
        ("autonomous_steady", "autonomous", "lavender"),
        ("cooperative_steady_start", "cooperative", "linux"),
        ("cooperative_steady", "cooperative", "lavender"),
        ("cooperative_lavender_idle", "cooperative", "linux"),
    ] {
        let p = phase(steady);
        assert_eq!(p["moves_during"], 0, "a steady load moved a core: {p}");
        assert_eq!(p["policy"], policy, "{p}");
        assert_eq!(p["owner"], owner, "{p}");
    }

    // Lavender declines a negotiable revoke while its worker runs, and says why.
    let declined = run.single("policy_decline");
    assert_eq!(declined["exit"], 1, "{declined}");
    assert_eq!(declined["owner"], "lavender", "{declined}");
    let stderr = declined["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("lavender refused to give core 3 up: its runnable threads would exceed"),
        "{declined}"
    );
    assert!(
        declined["trace"]
            .as_str()
            .unwrap()
            .contains("declined: busy"),
        "{declined}"
    );
    let lavender_said = run.single("lavender_declined");
    assert_eq!(lavender_said["reason"], "busy", "{lavender_said}");
    // Judged by its steadied need (both cores), while some thread can run.
    assert_eq!(lavender_said["needs"], 2, "{lavender_said}");
    assert!(
        lavender_said["runnable"].as_u64().unwrap() >= 1,
        "{lavender_said}"
    );

    // The hypervisor's own record: one decision per move, each carried out. A core given
    // back to the pool (to the hypervisor, nobody wanting it: the idle Lavender's, before
    // Linux's load asked for it) is its own decision and move, right before the grant from
    // the pool.
    let decisions = run.events("policy_decision");
    let to_pool = |d: &&serde_json::Value| d["to"] == "hypervisor";
    for (i, released) in decisions.iter().enumerate().filter(|(_, d)| to_pool(d)) {
        assert_eq!(released["reason"], "unwanted", "{released}");
        let next = decisions.get(i + 1);
        assert!(
            next.is_some_and(|n| n["from"] == "hypervisor" && n["core"] == released["core"]),
            "a core released to the pool and not granted from there next: {decisions:?}"
        );
    }
    let reasons: Vec<_> = decisions
        .iter()
        .filter(|d| !to_pool(d))
        .map(|d| (d["policy"].as_str().unwrap(), d["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("autonomous", "lavender"),
            ("autonomous", "linux"),
            ("cooperative", "lavender"),
            ("cooperative", "linux")
        ],
        "{decisions:?}"
    );
    let moves = run.events("core_move");
    let outcomes: Vec<_> = moves
        .iter()
        .filter(|m| {
            // A release to the pool: the policy's, carried out.
            let released = m["to"] == "hypervisor";
            if released {
                assert!(
                    m["outcome"] == "done" && m["by"] == "hypervisor" && m["reason"] == "unwanted",
                    "{m}"
                );
            }
            !released
        })
        .map(|m| {
            (
                m["outcome"].as_str().unwrap(),
                m["by"].as_str().unwrap(),
                m["decline_reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("done", "hypervisor", ""),
            ("done", "hypervisor", ""),
            ("done", "hypervisor", ""),
            ("refused", "holder", "busy"),
            ("done", "hypervisor", ""),
        ],
        "{moves:?}"
    );

    // What a user reads.
    let shown = run.single("policy_status");
    assert_eq!(shown["status_exit"], 0, "{shown}");
    let status = shown["status"].as_str().unwrap();
    assert!(
        status.contains("policy: cooperative (period 1 ms)")
            && (status.contains("core 3 lavender -> linux (requested, done)")
                || status.contains("core 3 hypervisor -> linux (requested, done)")),
        "vmctl status:\n{status}"
    );
    let trace = shown["trace"].as_str().unwrap();
    assert!(
        trace.contains("(requested, by hypervisor)") && trace.contains("declined: busy"),
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
}
