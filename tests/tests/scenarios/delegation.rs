//! System-call delegation: Lavender's programs use Linux's files through the PV agent.

use std::time::{Duration, Instant};

use tandem_e2e::{EmulatorKind, Outcome, Port, Scenario};

/// Bochs, system-call delegation (the default partitions, the agent's delegation self-test):
/// Linux writes files under its served root and starts Lavender's file tools there. Lavender's
/// `sha256sum` of a 4 MiB file matches busybox's; its `cp` of it is identical by `cmp` (both
/// move the data through their window buffers, which Linux reads and writes in place); every
/// escape (`..`, absolute path, symlink to `/`, `/proc/self/root`) is refused and nothing
/// outside the root changes; six `mix` processes delegate at once, all correct, served on
/// more than one Linux CPU; `wc`, `cat`, `ls` and the threaded `scan` give Linux's answers;
/// a long call of a live server is not cut; the server killed mid-call leaves the caller
/// with `EIO`, a call while it is down fails at once, and its restart serves the next; killed
/// again while 100 threads of four processes wait in delegated calls, every one of those
/// calls ends in `EIO`, every process ends, and the next restart serves again. Last, Linux
/// panics (`/proc/sysrq-trigger`) while two threads of a Lavender process wait in delegated
/// calls: Linux resets, the hypervisor stops it and reports it down with its cores in the
/// pool, Lavender is told, both calls end in `EIO`, and the process prints and exits.
#[test]
fn bochs_lavender_delegates_file_calls() {
    let mut run = Scenario::new("bochs_lavender_delegates_file_calls", EmulatorKind::Bochs)
        .config("delegation")
        .timeout(Duration::from_secs(3000))
        .boot();
    // Linux's verdict comes first; Lavender's console (its programs' lines) may lag behind:
    // the run ends when Linux is down, Lavender heard of it and every program Lavender
    // started has its exit reported.
    let mut self_test_done = None;
    let done = |markers: &[tandem_e2e::Marker]| {
        let count = |ev: &str| markers.iter().filter(|m| m.ev() == ev).count();
        if count("delegation_done") > 0 {
            self_test_done.get_or_insert_with(Instant::now);
        }
        count("agent_error") > 0
            || (count("guest_down") > 0
                && count("lavender_peer_down") > 0
                && count("process_exit") == count("process_start"))
    };
    assert_eq!(
        run.wait_until(done),
        Outcome::Satisfied,
        "the delegation self-test never finished"
    );
    let panic_step = self_test_done.map(|at| at.elapsed());
    // Linux's panic stops its other CPU with an IPI naming it, not a refused broadcast.
    run.assert_none_of(&[
        "fatal",
        "panic",
        "agent_error",
        "process_fault",
        "isolation_violation",
    ]);
    let console = run.console_text(Port::Com2);
    let lavender_line = |program: &str, pid: &serde_json::Value, text: &str| {
        format!("[lavender] {program}[{pid}]: {text}")
    };

    let sha = run.single("delegation_sha256");
    assert_eq!(
        (&sha["status"], &sha["linux_ok"]),
        (&0.into(), &true.into()),
        "{sha}"
    );
    let linux_hex = sha["linux"].as_str().unwrap();
    assert_eq!(linux_hex.len(), 64, "{sha}");
    let expected = lavender_line("sha256sum", &sha["pid"], &format!("{linux_hex}  big.bin"));
    assert!(
        console.contains(&expected),
        "Lavender's sha256sum differs from Linux's ({expected})"
    );
    // The configuration's 12 MiB region has room for window buffers, and both tools use one.
    let delegation = run.single("lavender_delegation");
    assert!(
        delegation["window_buffer_bytes"].as_u64() >= Some(1 << 20),
        "{delegation}"
    );
    let through_window = |program: &str, pid: &serde_json::Value, text: &str| {
        let prefix = lavender_line(program, pid, "");
        console
            .lines()
            .any(|line| line.starts_with(&prefix) && line.ends_with(text))
    };
    assert!(
        through_window("sha256sum", &sha["pid"], "read into the window buffer"),
        "Lavender's sha256sum did not read into its window buffer"
    );

    let cp = run.single("delegation_cp");
    assert_eq!(cp["status"], 0, "{cp}");
    assert_eq!(cp["cmp_same"], true, "cmp found the copy different: {cp}");
    assert_eq!(cp["bytes"], sha["bytes"], "{cp}");
    assert!(
        through_window("cp", &cp["pid"], "through the window buffer"),
        "Lavender's cp did not copy through its window buffer"
    );

    let escape = run.single("delegation_escape");
    assert_eq!(escape["status"], 0, "an escape got through: {escape}");
    assert_eq!(escape["outside_untouched"], true, "{escape}");
    for attempt in [
        "escape ../../etc/shadow: refused",
        "escape /etc/shadow: refused",
        "escape /proc/self/root/etc/shadow: refused",
        "escape to-root/etc/shadow: refused",
        "escape to-proc-root/etc/shadow: refused",
        "escape create to-root/tmp/escaped: refused",
        "escape mkdir ../outside: refused",
    ] {
        assert!(
            console.contains(&lavender_line("escape", &escape["pid"], attempt)),
            "missing: {attempt}"
        );
    }

    let mix = run.single("delegation_mix");
    let statuses = mix["statuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 6, "{mix}");
    assert!(
        statuses.iter().all(|s| *s == 0),
        "a mix process failed: {mix}"
    );
    let mix_lines = console
        .lines()
        .filter(|line| {
            line.contains("rounds, 196608 bytes written, 196608 verified, 4 null calls, 0 errors")
        })
        .count();
    assert_eq!(mix_lines, 6, "every mix process reports a clean run");

    let tools = run.single("delegation_tools");
    for tool in ["wc", "cat", "ls", "scan"] {
        assert_eq!(tools[tool], 0, "{tool} failed: {tools}");
    }
    assert!(
        console.contains(&format!("]: {}", tools["wc_expected"].as_str().unwrap())),
        "wc's counts differ from Linux's: {tools}"
    );
    assert!(console.contains("]: Lavender reads this file through Linux."));
    assert!(console.contains(&format!(
        "scan: {} files, {} bytes, 4 threads, 0 failures",
        tools["scan_files"], tools["scan_bytes"]
    )));
    assert!(console.contains("ls: scan: 12 entries"));

    // `cat` waits in a long call (opening a FIFO nobody writes) well past the silence that
    // marks a dead server and is not cut; the server killed by `kill -9` leaves it with EIO,
    // Lavender runs on, a call while no server runs fails at once, and the server PID 1
    // restarts attaches as the next epoch and serves `wc`.
    let death = run.single("delegation_agent_death");
    assert_eq!(
        death["waited_alive"], true,
        "a live server's long call was cut: {death}"
    );
    assert_eq!(death["kill_ok"], true, "{death}");
    assert_eq!(death["cat_status"], 1, "{death}");
    assert!(
        console.contains(&lavender_line(
            "cat",
            &death["cat_pid"],
            "cat: fifo: EIO (5)"
        )),
        "the caller did not get EIO: {death}"
    );
    assert_eq!(
        death["fast_status"], 1,
        "a call with no server did not fail: {death}"
    );
    assert!(
        console.contains(&lavender_line(
            "cat",
            &death["fast_pid"],
            "cat: notes.txt: EIO (5)"
        )),
        "{death}"
    );
    assert_ne!(death["killed"], death["restarted"], "{death}");
    assert_eq!(
        death["new_epoch"].as_u64(),
        death["old_epoch"].as_u64().map(|epoch| epoch + 1),
        "{death}"
    );
    assert_eq!(death["wc_after_restart"], 0, "{death}");
    // The second death, with 100 callers waiting: each of the four processes saw all 25 of
    // its calls end in EIO (status 0), and the server's restart serves `wc`.
    let many = run.single("delegation_agent_death_many");
    assert_eq!(many["callers"], 100, "{many}");
    assert_eq!(
        many["ended_before_kill"], 0,
        "a live server's calls were cut: {many}"
    );
    assert_eq!(many["kill_ok"], true, "{many}");
    assert_eq!(many["statuses"], serde_json::json!([0, 0, 0, 0]), "{many}");
    for pid in many["pids"].as_array().unwrap() {
        assert!(
            console.contains(&lavender_line(
                "openwait",
                pid,
                "openwait: 25 calls, 25 EIO, 0 opened, 0 other errors"
            )),
            "openwait[{pid}] did not see EIO on every call: {many}"
        );
    }
    assert_eq!(many["wc_after_restart"], 0, "{many}");
    assert_eq!(run.events("delegation_server").len(), 3, "two restarts");
    println!(
        "agent death: a {} ms call of a live server went on; EIO {} ms (Linux time) after the kill; a new call failed after {} ms",
        death["long_call_ms"], death["eio_after_ms"], death["fast_fail_ms"]
    );
    println!(
        "agent death with 100 callers waiting: all four processes ended {} ms (Linux time) after the kill",
        many["all_ended_after_ms"]
    );

    let service = run.single("delegation_done");
    let cpus = service["cpus"].as_array().unwrap();
    assert!(
        cpus.len() >= 2,
        "all calls served on one Linux CPU: {service}"
    );
    assert_eq!(service["refused"], 0, "{service}");
    println!("delegation service: {service}");
    // Doorbells both ways: the agent's service threads slept until Lavender rang (through
    // the virtual PCI device and Linux's stock uio_pci_generic) and rang Lavender's back
    // for its sleeping callers; Lavender counts both sides too.
    let ready = run.single("delegation_ready");
    assert_eq!(
        (
            &ready["doorbell_from_lavender"],
            &ready["doorbell_to_lavender"]
        ),
        (&true.into(), &true.into()),
        "{ready}"
    );
    let count = |marker: &serde_json::Value, key: &str| marker[key].as_u64().unwrap_or(0);
    assert!(
        count(service, "woken_by_doorbell") > 0 && count(service, "doorbells_rung") > 0,
        "no doorbell woke a service thread or a Lavender caller: {service}"
    );
    let exits = run.events("process_exit");
    let last = exits.last().expect("no process_exit marker");
    assert!(
        count(last, "doorbells_rung") > 0 && count(last, "doorbells_heard") > 0,
        "Lavender rang or heard no doorbell: {last}"
    );
    println!(
        "doorbells: {} service-thread wake-ups by Lavender's, {} rung into Lavender; Lavender rang {} and heard {}",
        service["woken_by_doorbell"], service["doorbells_rung"], last["doorbells_rung"], last["doorbells_heard"]
    );

    // Linux panicked with openwait's two calls taken by its server: it reset through the
    // FADT's reset register, which the hypervisor answers by stopping it; once both its cores
    // are parked it is reported down and Lavender, its peer, is told.
    let panic = run.single("delegation_linux_panic");
    assert!(
        run.console_text(Port::Com1)
            .contains("Kernel panic - not syncing: sysrq triggered crash"),
        "Linux did not panic"
    );
    let stopped = run.single("guest_stopped");
    assert_eq!(
        (&stopped["guest"], &stopped["code"]),
        (&"linux".into(), &"reset".into()),
        "{stopped}"
    );
    let down = run.single("guest_down");
    assert_eq!(down["guest"], "linux", "{down}");
    assert_eq!(down["state"], "stopped", "{down}");
    assert_eq!(
        down["cores_in_pool"],
        serde_json::json!([1, 3]),
        "Linux's cores are not back in the pool: {down}"
    );
    assert_eq!(
        down["peers_told"],
        serde_json::json!(["lavender"]),
        "{down}"
    );
    let heard = run.single("lavender_peer_down");
    assert_eq!(
        (&heard["guest"], &heard["state"], &heard["delegation"]),
        (&1.into(), &"stopped".into(), &true.into()),
        "{heard}"
    );
    assert_eq!(
        heard["calls_waiting"], 2,
        "openwait's two calls were not waiting: {heard}"
    );
    // Both calls ended in EIO; the process went on to print that and exit 0, after Lavender
    // heard that Linux is down.
    let pid = &panic["pid"];
    assert!(
        console.contains(&lavender_line(
            "openwait",
            pid,
            "openwait: 2 calls, 2 EIO, 0 opened, 0 other errors"
        )),
        "openwait's calls did not end in EIO when Linux went down: {panic}"
    );
    let markers = run.markers();
    let position = |ev: &str, matches: &dyn Fn(&serde_json::Value) -> bool| {
        markers
            .iter()
            .position(|m| m.ev() == ev && matches(&m.value))
    };
    let told_at = position("lavender_peer_down", &|_| true);
    let exited_at = position("process_exit", &|m| m["pid"] == *pid);
    assert!(
        told_at.is_some() && exited_at > told_at,
        "openwait did not end after Lavender heard Linux is down"
    );
    let exit = run
        .events("process_exit")
        .into_iter()
        .find(|m| m["pid"] == *pid)
        .expect("openwait's exit");
    assert_eq!(exit["status"], 0, "{exit}");
    println!(
        "Linux panic: down and reported, {} waiting calls ended in EIO; the step took {:.1} s of wall time after delegation_done",
        heard["calls_waiting"],
        panic_step.map_or(0.0, |d| d.as_secs_f64())
    );
}
