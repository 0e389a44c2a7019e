//! The soak: cores moved between Linux and Lavender many times while both guests work and
//! Lavender's programs delegate file calls to Linux, and nothing may be lost. The default run
//! has the short soak inside `bochs_vmctl_moves_cores_between_linux_and_lavender` (20 round
//! trips); `cargo xtask test --soak` runs [`bochs_soak_core_moves`] (500 round trips).

use std::time::Duration;

use tandem_e2e::{EmulatorKind, Outcome, Port, Scenario, ScenarioRun};

use crate::{BAD_KERNEL_LOG, LINUX_LOG_FAULTS};

/// Round trips of the full soak (`tandem.selftest=vmctl-soak:500` in `tests/configs/soak.toml`).
const SOAK_ROUNDS: u64 = 500;

/// Bochs, the full soak (`cargo xtask test --soak` only): the agent's `vmctl-soak` self-test
/// moves core 3 to Lavender and back 500 times (1,000 moves) under the soak load of
/// [`check_soak`]: every move completes with `/proc/cpuinfo`, the hypervisor and `vmctl
/// status` agreeing; every delegated program and primes round is right; the agent's and its
/// delegation server's descriptors and Lavender's free frames, processes and threads end where
/// they started; Linux's log has no complaint.
#[test]
#[ignore = "hours under Bochs: run it with `cargo xtask test --soak`"]
fn bochs_soak_core_moves() {
    let mut run = Scenario::new("bochs_soak_core_moves", EmulatorKind::Bochs)
        .config("soak")
        .hv_cmdline("log=info")
        .timeout(Duration::from_secs(12 * 3600))
        .boot();
    wait_for_the_moves(&mut run, "the soak", 2 * SOAK_ROUNDS as usize);
    let moves = run.events("vmctl_move");
    assert_eq!(moves.len() as u64, 2 * SOAK_ROUNDS, "moves made");
    for m in &moves {
        assert_eq!(m["exit"], 0, "vmctl move-core failed: {m}");
        assert_eq!(m["outcome"], "done", "{m}");
        assert_eq!(m["agree"], true, "the views disagree: {m}");
    }
    let done = run.single("vmctl_moves_done");
    assert_eq!(done["ok"], true, "{done}");
    for m in run.events("core_move") {
        assert_eq!(m["outcome"], "done", "{m}");
        assert_eq!(m["forced"], false, "{m}");
    }
    check_soak(&run, 2 * SOAK_ROUNDS);
    let kernel_log = run.console_text(Port::Com1);
    let complaints: Vec<&str> = kernel_log
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            BAD_KERNEL_LOG
                .iter()
                .chain(LINUX_LOG_FAULTS)
                .any(|bad| line.contains(bad))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "kernel log complaints:\n{}",
        complaints.join("\n")
    );
    println!("soak wall time: {} s", run.elapsed().as_secs());
}

/// Waits until the agent's `vmctl` self-test (`what`) says its moves are done and the
/// hypervisor's console has its record of `hv_moves` moves (core 0 writes it at the line's
/// pace, after the agent may have finished), and fails the scenario if that never happens or
/// a guest stopped, the agent or the hypervisor erred on the way.
pub(crate) fn wait_for_the_moves(run: &mut ScenarioRun, what: &str, hv_moves: usize) {
    let done = |markers: &[tandem_e2e::Marker]| {
        let finished = markers.iter().any(|m| m.ev() == "vmctl_moves_done")
            && markers.iter().filter(|m| m.ev() == "core_move").count() >= hv_moves;
        finished
            || markers
                .iter()
                .any(|m| matches!(m.ev(), "agent_error" | "guest_stopped"))
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "{what} never finished"
    );
    run.assert_none_of(&[
        "fatal",
        "panic",
        "guest_stopped",
        "agent_error",
        "isolation_violation",
    ]);
}

/// Checks the soak load of the agent's `vmctl-moves` or `vmctl-soak` self-test (`moves`
/// core moves under it): every delegated program was right, primes was killed and ended, and
/// once the load ended nothing it used was lost: the agent's and its delegation server's
/// open descriptors, Lavender's free frames, live processes and threads are what they were
/// before it. Prints the figures.
pub(crate) fn check_soak(run: &ScenarioRun, moves: u64) {
    let load = run.single("soak_load");
    assert_eq!(load["moves"], moves, "{load}");
    assert_eq!(load["failed"], 0, "delegated programs failed: {load}");
    assert!(load["programs"].as_u64() >= Some(2), "{load}");
    assert!(load["digests_checked"].as_u64() >= Some(1), "{load}");
    assert!(load["bytes_verified"].as_u64() > Some(0), "{load}");
    assert_eq!(load["primes_kill_exit"], 0, "{load}");
    assert_eq!(load["primes_state"], "killed", "{load}");
    let probes = run.events("soak_probe");
    assert_eq!(probes.len(), 2, "{probes:?}");
    let (before, after) = (probes[0], probes[1]);
    assert_eq!(
        (&before["when"], &after["when"]),
        (&"before".into(), &"after".into())
    );
    for key in ["agent_fds", "server_fds", "live_processes", "server_pid"] {
        assert!(before[key].as_u64() > Some(0), "{before}");
        assert_eq!(
            before[key], after[key],
            "{key} changed: {before} -> {after}"
        );
    }
    // Lavender prints its memory each time it is listed: first for the probe before the
    // load, last for the probe after it (in between, while the agent waited for primes).
    let memory = run.events("lavender_memory");
    let (first, last) = (memory.first().unwrap(), memory.last().unwrap());
    for key in ["free_frames", "live_processes", "threads_alive"] {
        assert_eq!(
            first[key], last[key],
            "Lavender lost {key}: {first} -> {last}"
        );
    }
    // The killed primes process's rounds, each right.
    let console = run.console_text(Port::Com2);
    let tag = format!("[lavender] primes[{}]: round ", load["primes_pid"]);
    let rounds: Vec<&str> = console.lines().filter(|l| l.contains(&tag)).collect();
    assert!(!rounds.is_empty(), "the primes worker finished no round");
    for line in &rounds {
        assert!(
            line.contains("counted 17984 primes below") && line.ends_with("(ok)"),
            "wrong round: {line}"
        );
    }
    println!(
        "soak: {moves} moves in {} s (Linux time, virtual under Bochs); {} delegated programs \
         ({} bytes verified, {} digests right), {} primes rounds; agent fds {} -> {}, server \
         fds {} -> {}; Lavender free frames {} -> {}, threads {} -> {}",
        load["linux_seconds"],
        load["programs"],
        load["bytes_verified"],
        load["digests_checked"],
        rounds.len(),
        before["agent_fds"],
        after["agent_fds"],
        before["server_fds"],
        after["server_fds"],
        first["free_frames"],
        last["free_frames"],
        first["threads_alive"],
        last["threads_alive"],
    );
}
