//! Faults tried on purpose (issue 19): a guest that misbehaves or dies costs the others
//! nothing. Each scenario boots hypervisor + Lavender only (about a minute each under Bochs),
//! with a Lavender command line that causes the fault (`ignore_revoke=`, `fault=`).

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_e2e::{core_moves, EmulatorKind, Marker, Outcome, Scenario, ScenarioRun, Terminal};

use super::{check_all_threads_finished, check_primes_process, exit_counters, screen_rows};

/// Primes below 200000, the workers' limit in these scenarios.
const PRIMES_BELOW_200000: u64 = 17_984;

fn position(markers: &[Marker], keep: impl Fn(&Marker) -> bool) -> Option<usize> {
    markers.iter().position(keep)
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {value}"))
}

fn assert_none_of(run: &ScenarioRun, events: &[&str]) {
    for bad in events {
        assert!(
            run.events(bad).is_empty(),
            "unexpected {bad}: {:?}",
            run.events(bad)
        );
    }
}

/// Bochs, Lavender alone under the seeded core-move test, with core 2 never releasing itself
/// (`faults-ignore-revoke`). Every revoke of core 2 is taken by force at its deadline (an NMI:
/// the core either goes on running the primes worker it was running, in user mode with its
/// timer stopped, or spins with interrupts off, so nothing else would make it exit), counted
/// (`core_test_done.forced_releases`) and reported (`core_forced`); Lavender hears of it
/// (`Taken`), reads the registers the core had (`FORCED_STATE`) and resumes the worker that was
/// running there on another core, and hands the threads the core left queued to its other
/// cores; the core, parked and scrubbed, is granted again and comes up in Lavender. Core 3
/// releases normally. At least one worker ran on core 2 when it was taken; the primes worker's
/// every round is right, every worker ran exactly once, and no thread is lost.
#[test]
fn bochs_faults_revoke_ignored_core_taken_by_force() {
    let mut run = Scenario::new(
        "bochs_faults_revoke_ignored_core_taken_by_force",
        EmulatorKind::Bochs,
    )
    .config("faults-ignore-revoke")
    .hv_cmdline(&core_moves::hv_cmdline(5, 24))
    .timeout(Duration::from_secs(900))
    .boot();
    assert_eq!(
        run.wait_until(core_moves::finished),
        Outcome::Satisfied,
        "the core test or the workload never finished"
    );
    assert_none_of(&run, &core_moves::BAD_EVENTS);
    let done = run.single("core_test_done").clone();
    let forced = u64_of(&done, "forced_releases");
    assert!(forced >= 1, "no revoke of core 2 was forced: {done}");
    assert_eq!(done["grant_timeouts"], 0, "a grant never came up: {done}");

    // Every forced release was core 2's, reported once by the hypervisor, with the core parked.
    let reports = run.events("core_forced");
    assert_eq!(reports.len() as u64, forced, "{reports:?}");
    for (i, report) in reports.iter().enumerate() {
        assert_eq!(report["guest"], "lavender", "{report}");
        assert_eq!(report["cpu"], 2, "{report}");
        assert_eq!(report["parked"], true, "{report}");
        assert_eq!(u64_of(report, "forced_total"), i as u64 + 1, "{report}");
        assert!(
            u64_of(report, "revoke_to_parked_us") >= u64_of(report, "deadline_us"),
            "taken before its deadline: {report}"
        );
    }
    // Lavender withheld each of those releases, and picked up what each left behind.
    let withheld = run.events("lavender_release_withheld");
    let taken = run.events("lavender_core_taken");
    assert_eq!(withheld.len() as u64, forced, "{withheld:?}");
    assert_eq!(taken.len() as u64, forced, "{taken:?}");
    for event in withheld.iter().chain(&taken) {
        assert_eq!(event["core"], 2, "{event}");
    }
    for event in &taken {
        assert_eq!(event["thread_lost"], false, "{event}");
    }
    // Some revokes came while core 2 ran a worker in user mode: it ran on until taken, and
    // went on from there, on another core, from the registers the hypervisor kept.
    let running = withheld
        .iter()
        .filter(|m| m["thread_running"] == true)
        .count();
    let resumed: Vec<&Value> = taken
        .iter()
        .copied()
        .filter(|m| m.get("thread_resumed").is_some())
        .collect();
    // (A worker that ended before the deadline left the core idle: nothing to resume then.)
    assert!(
        !resumed.is_empty() && resumed.len() <= running,
        "no worker was resumed from core 2's registers: {withheld:?} {taken:?}"
    );
    for event in &resumed {
        assert_eq!(event["thread_resumed"], "user", "{event}");
        let rip = u64::from_str_radix(event["rip"].as_str().unwrap().trim_start_matches("0x"), 16)
            .unwrap();
        assert!(
            (0x80_0000_0000..0x100_0000_0000).contains(&rip),
            "not in the user window: {event}"
        );
    }
    // Core 2 never released itself; core 3 did, every time it was revoked.
    let released = run.events("lavender_core_released");
    assert!(
        released.iter().all(|m| m["core"] == 3),
        "core 2 released itself: {released:?}"
    );
    // The forced core served again: granted after it was taken, it came up in Lavender.
    let markers = run.markers();
    let first_taken = position(markers, |m| m.ev() == "lavender_core_taken").unwrap();
    let back = markers[first_taken..]
        .iter()
        .find(|m| m.ev() == "lavender_core_online" && m.value["core"] == 2);
    assert!(
        back.is_some(),
        "core 2 never came up again after it was taken by force"
    );

    let worker = check_primes_process(&run, "lavender", 8, 3, PRIMES_BELOW_200000);
    check_all_threads_finished(&run);
    println!(
        "forced releases: {forced} (all core 2), {running} revoked while it ran a worker, {} taken with the worker still running and resumed elsewhere; {} normal releases of core 3",
        resumed.len(),
        released.len()
    );
    for event in reports.iter().chain(&taken) {
        println!("{event}");
    }
    println!("primes: {worker}");
}

/// Bochs, two Lavender instances (`faults-crash`): 'crasher' triple-faults in the middle of
/// its primes run. The hypervisor stops it with a diagnostic (`guest_stopped`, exit
/// `triple_fault`), reports it down once its core is back in the pool (`guest_down`), and
/// 'survivor' runs on to a correct result.
#[test]
fn bochs_faults_guest_crash_stopped_other_runs_on() {
    let mut run = Scenario::new(
        "bochs_faults_guest_crash_stopped_other_runs_on",
        EmulatorKind::Bochs,
    )
    .config("faults-crash")
    .timeout(Duration::from_secs(900))
    .boot();
    let over = |markers: &[Marker]| {
        let down = markers
            .iter()
            .any(|m| m.ev() == "guest_down" && m.value["guest"] == "crasher");
        down && markers.iter().any(|m| m.ev() == "process_exit")
    };
    assert_eq!(
        run.wait_until(over),
        Outcome::Satisfied,
        "the crash was never reported, or the survivor never finished"
    );
    assert_none_of(&run, &["fatal", "panic", "isolation_violation"]);
    let fault = run.single("lavender_fault");
    assert_eq!(fault["kind"], "triple_fault", "{fault}");
    let stopped = run.single("guest_stopped");
    assert_eq!(stopped["guest"], "crasher", "{stopped}");
    assert_eq!(stopped["code"], "triple_fault", "{stopped}");
    assert_eq!(stopped["cpu"], 2, "{stopped}");
    let down = run.single("guest_down");
    assert_eq!(down["guest"], "crasher", "{down}");
    assert_eq!(down["state"], "stopped", "{down}");
    assert_eq!(down["cores_in_pool"], serde_json::json!([2]), "{down}");
    assert_eq!(exit_counters(&run, "crasher")["state"], "stopped");
    // The survivor was still working when the crasher went down, and finished right.
    let markers = run.markers();
    let down_at = position(markers, |m| m.ev() == "guest_down").unwrap();
    let exit_at = position(markers, |m| m.ev() == "process_exit").unwrap();
    assert!(
        exit_at > down_at,
        "the survivor finished before the crash: the test shows nothing"
    );
    let worker = check_primes_process(&run, "survivor", 4, 3, PRIMES_BELOW_200000);
    println!("crash: {stopped}\ndown: {down}\nsurvivor's primes: {worker}");
}

/// Bochs, Linux with `watchdog_ms = 2000` (`faults-linux-hang`): 2 s after its agent is
/// ready, a real-time spinner takes every Linux CPU (`tandem.selftest=hang:2000`), so the
/// agent's load reports, Linux's heartbeats, stop. The hypervisor reports Linux hung
/// (`guest_hung`) within the watchdog's bound of the hang (TSC time, virtual under Bochs),
/// stops it, takes its cores back and tells Lavender, which runs on.
#[test]
fn bochs_faults_linux_hang_watchdog_stops_it() {
    let mut run = Scenario::new(
        "bochs_faults_linux_hang_watchdog_stops_it",
        EmulatorKind::Bochs,
    )
    .config("faults-linux-hang")
    .timeout(Duration::from_secs(900))
    .boot();
    let over = |markers: &[Marker]| markers.iter().any(|m| m.ev() == "lavender_peer_down");
    assert_eq!(
        run.wait_until(over),
        Outcome::Satisfied,
        "Lavender never heard that Linux is down"
    );
    assert_none_of(
        &run,
        &["fatal", "panic", "isolation_violation", "lavender_panic"],
    );
    let hang = run.single("linux_hang").clone();
    let hung = run.single("guest_hung").clone();
    assert_eq!(hung["guest"], "linux", "only Linux hung: {hung}");
    // The agent's heartbeat comes every 100 ms where Lavender's comes every tick: 100 ms more
    // of slack than Lavender's hang (below).
    let (deadline, period) = check_silence(&hung, (2000, 500), 150);
    let tsc_hz = u64_of(&run.single("boot_report")["cpu"], "tsc_hz");
    let detected_ms = u64_of(&hung, "tsc").saturating_sub(u64_of(&hang, "tsc")) * 1000 / tsc_hz;
    assert!(
        detected_ms > 0 && detected_ms <= deadline + 2 * period + 150,
        "reported {detected_ms} ms after the hang: {hung} {hang}"
    );
    let stopped = run.single("guest_stopped");
    assert_eq!(
        (&stopped["guest"], &stopped["code"]),
        (&"linux".into(), &"hung".into()),
        "{stopped}"
    );
    let down = run.single("guest_down");
    assert_eq!(down["guest"], "linux", "{down}");
    assert_eq!(down["cores_in_pool"], serde_json::json!([1, 3]), "{down}");
    assert_eq!(
        down["peers_told"],
        serde_json::json!(["lavender"]),
        "{down}"
    );
    let heard = run.single("lavender_peer_down");
    assert_eq!(heard["state"], "stopped", "{heard}");
    println!("Linux hang: {hang}\nwatchdog: {hung}\nreported {detected_ms} ms after the hang (TSC time, virtual under Bochs)\ndown: {down}\nLavender: {heard}");
}

/// Bochs, Lavender with `watchdog_ms = 1000` (`faults-hang`): the core test grants it a second
/// core, then every core it runs on spins with interrupts off. Its heartbeats (load reports)
/// stop; the hypervisor reports it hung (`guest_hung`) no later than the watchdog's deadline
/// plus two check periods after the hang began (virtual TSC time under Bochs), stops it, and
/// its cores go back to the pool (`guest_down`).
#[test]
fn bochs_faults_guest_hang_watchdog_stops_it() {
    let mut run = Scenario::new(
        "bochs_faults_guest_hang_watchdog_stops_it",
        EmulatorKind::Bochs,
    )
    .config("faults-hang")
    .hv_cmdline(&core_moves::hv_cmdline(1, 1))
    .timeout(Duration::from_secs(900))
    .boot();
    let over = |markers: &[Marker]| markers.iter().any(|m| m.ev() == "guest_down");
    assert_eq!(
        run.wait_until(over),
        Outcome::Satisfied,
        "the hang was never reported"
    );
    assert_none_of(&run, &["fatal", "panic", "isolation_violation"]);
    let test = run.single("core_test_done").clone();
    assert_eq!(test["grants"], 1, "{test}");
    let fault = run.single("lavender_fault").clone();
    assert_eq!(fault["kind"], "hang", "{fault}");
    let hung = run.single("guest_hung").clone();
    assert_eq!(hung["guest"], "lavender", "{hung}");
    // 50 ms of slack: the monitor loop's own work between checks and the last timer tick
    // (5 ms) of a core that had not reached the hang yet.
    let (deadline, period) = check_silence(&hung, (1000, 250), 50);
    // Reported at most the deadline plus two check periods (and the slack) after the hang.
    let tsc_hz = u64_of(run.single("lavender_clock"), "tsc_hz");
    let detected_ms = (u64_of(&hung, "tsc") - u64_of(&fault, "tsc")) * 1000 / tsc_hz;
    assert!(
        detected_ms <= deadline + 2 * period + 50,
        "reported {detected_ms} ms after the hang: {hung} {fault}"
    );
    let stopped = run.single("guest_stopped");
    assert_eq!(stopped["code"], "hung", "{stopped}");
    let down = run.single("guest_down");
    assert_eq!(down["state"], "stopped", "{down}");
    let granted = test["grants_posted"][0]["core"].as_u64().unwrap();
    let in_pool: Vec<u64> = down["cores_in_pool"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        in_pool.contains(&1) && in_pool.contains(&granted),
        "the hung guest's cores (1 and {granted}) are not all back: {down}"
    );
    assert!(
        run.events("process_exit").is_empty(),
        "the hang did not hang"
    );
    println!("hang: {fault}\nwatchdog: {hung}\nreported {detected_ms} ms after the hang (TSC time, virtual under Bochs)\ndown: {down}");
}

/// Bochs, the default partitions with a Lavender whose kernel panics 45 s (virtual) after its
/// scheduler starts (`faults-linux-crash`), at an interactive Linux shell where `vmctl exec
/// .../spin` runs on it: its panic handler reports the panic by hypercall, and the hypervisor
/// stops Lavender at once (`guest_stopped` with code `panic` and the panic's message, not a
/// core that halts) and takes its core back; Linux runs on
/// and lets go of what it held for Lavender: the waiting `vmctl exec` says its process was
/// lost and exits 137, the delegation server is killed (its descriptors and calls with it)
/// and restarted (`agent_peer_down`, a second `delegation_server`); `vmctl status` typed
/// at the prompt shows Lavender `stopped` holding no core, Linux running, and core 2 parked
/// in the pool; `vmctl move-core 3 --to lavender` is then refused (exit status 3) and
/// nothing moves; `vmctl ps` lists `spin` as lost with status 137. Linux learns that
/// Lavender is down from the hypervisor (`GuestEvent::Down`).
#[test]
fn bochs_faults_linux_sees_lavender_stopped() {
    let name = "bochs_faults_linux_sees_lavender_stopped";
    let mut term = Terminal::run_configured(
        name,
        Some("faults-linux-crash"),
        None,
        &["--emulator", "bochs", "--timeout", "1500"],
    );
    let first_prompt = term
        .wait_for("~ # ", 0, Duration::from_secs(1200))
        .expect("no `~ # ` prompt on the terminal");
    // A program runs on Lavender when it crashes: its launcher hears that it was lost.
    let (ended, prompt) = term.command(
        "vmctl exec /usr/lib/tandem/lavender/spin",
        first_prompt,
        Duration::from_secs(900),
    );
    assert!(
        ended.contains("lost: Lavender is stopped") && ended.contains("exit=137"),
        "{ended}"
    );
    // The crash is reported on COM2; look at the log until it is.
    let com2 = term.run_dir().join("com2.log");
    let reported = || {
        std::fs::read_to_string(&com2)
            .is_ok_and(|log| log.contains(r#""ev":"guest_down","guest":"lavender""#))
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !reported() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(reported(), "Lavender's crash was never reported");
    term.type_text(b"vmctl status\r");
    let moves = term
        .wait_for("moves: ", prompt, Duration::from_secs(300))
        .expect("vmctl status never printed its summary");
    let shown = term.shown();
    let rows = screen_rows(&shown[prompt..moves]);
    let row = |first: &str| {
        rows.iter()
            .map(|r| r.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.first() == Some(&first))
            .unwrap_or_else(|| panic!("no row for {first}: {rows:#?}"))
    };
    let lavender = row("lavender");
    assert_eq!(&lavender[1..3], ["stopped", "-"], "{rows:#?}");
    let linux = row("linux");
    assert_eq!(linux[1], "running", "{rows:#?}");
    let core2 = row("2");
    assert_eq!(&core2[1..3], ["hypervisor", "parked"], "{rows:#?}");
    // A stopped guest cannot take a core: refused (exit status 3), and nothing moves.
    let (refusal, after_move) = term.command(
        "vmctl move-core 3 --to lavender",
        moves,
        Duration::from_secs(300),
    );
    assert!(
        refusal.contains("guest 'lavender' is stopped: it cannot take a core")
            && refusal.contains("exit=3"),
        "{refusal}"
    );
    let log = std::fs::read_to_string(&com2).expect("com2.log");
    assert!(
        !log.contains(r#""ev":"core_move""#),
        "a move was started for a stopped guest"
    );
    // The panic as Lavender reported it: the hypervisor's diagnostic names the panic and
    // carries its message (location and text, on one line), from the VMCALL that reported it.
    let fault = term.events("lavender_fault");
    assert_eq!(fault.len(), 1, "{fault:?}");
    assert_eq!(fault[0]["kind"], "panic", "{fault:?}");
    assert_eq!(
        term.events("lavender_panic").len(),
        1,
        "Lavender panicked once"
    );
    let stopped = term.events("guest_stopped");
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    let stopped = &stopped[0];
    assert_eq!(stopped["guest"], "lavender", "{stopped}");
    assert_eq!(stopped["cpu"], 2, "{stopped}");
    assert_eq!(stopped["code"], "panic", "{stopped}");
    assert_eq!(stopped["exit_name"], "vmcall", "{stopped}");
    let detail = stopped["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("panicked at guest-lavender/src/kernel/faults.rs:")
            && detail.ends_with("fault test: core 2 panics on purpose"),
        "{stopped}"
    );
    // `vmctl ps` lists the process that was running as lost, ended as if by SIGKILL.
    let (listed, _) = term.command("vmctl ps", after_move, Duration::from_secs(300));
    let spin = listed
        .lines()
        .map(|row| row.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.get(1) == Some(&"spin"))
        .unwrap_or_else(|| panic!("vmctl ps lists no spin: {listed}"));
    assert_eq!(&spin[2..4], ["lost", "137"], "{listed}");
    assert!(listed.contains("exit=0"), "vmctl ps failed: {listed}");
    // Linux let go of what it held for Lavender.
    let seen = term.events("agent_peer_down");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["state"], "stopped", "{seen:?}");
    assert_eq!(seen[0]["server_killed"], true, "{seen:?}");
    // `spin`, and Lavender's boot program `idle` when Linux had heard of it.
    assert!(
        (1..=2).contains(&seen[0]["processes_lost"].as_u64().unwrap_or(0)),
        "{seen:?}"
    );
    let servers = term.events("delegation_server");
    assert_eq!(
        servers
            .iter()
            .map(|s| s["generation"].as_u64())
            .collect::<Vec<_>>(),
        [Some(1), Some(2)],
        "the delegation server was not restarted: {servers:?}"
    );
    // Linux, Lavender's peer through the delegation region, was told (the marker above is
    // its agent's answer).
    assert!(
        log.contains(r#""peers_told":["linux"]"#),
        "Linux was not told Lavender is down"
    );
    assert_eq!(seen[0]["guest"], 0, "{seen:?}");
    let status = term.stop(Duration::from_secs(120));
    assert_eq!(status.and_then(|s| s.code()), Some(130));
    println!(
        "{ended}\nLinux let go: {}\nvmctl status after Lavender's crash:\n{}",
        seen[0],
        rows.join("\n")
    );
}

/// At the interactive Linux shell of the default partitions (`term`, its prompt shown at
/// byte `prompt`; run by `bochs_both_guests_boot_to_a_quiet_shell`): a move of Linux's core 3
/// to Lavender with a 1 ms timeout cannot be honoured (Linux takes milliseconds to offline a
/// CPU): the revoke is called off at the deadline, `vmctl` says so with exit status 1
/// (`called off`), the move is reported `cancelled`, and core 3 is still Linux's. (The agent
/// goes on offlining the CPU after the deadline and does not undo it, so the core is Linux's
/// but offline, `granted` to it: Linux can bring it online again.)
pub(crate) fn linux_offline_too_slow_move_cancelled(term: &mut Terminal, prompt: usize) {
    let (reply, after) = term.command(
        "vmctl move-core 3 --to lavender --timeout 1",
        prompt,
        Duration::from_secs(300),
    );
    assert!(reply.contains("exit=1"), "{reply}");
    term.type_text(b"vmctl status\r");
    let moves = term
        .wait_for("moves: ", after, Duration::from_secs(300))
        .expect("vmctl status never printed its summary");
    let summary_end = term
        .wait_for(" forced;", moves, Duration::from_secs(60))
        .expect("vmctl status's summary line never ended");
    let shown = term.shown();
    let rows = screen_rows(&shown[after..summary_end]);
    let row = |core: &str| {
        rows.iter()
            .map(|r| r.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.first() == Some(&core))
            .unwrap_or_else(|| panic!("no row for core {core}: {rows:#?}"))
    };
    // The default partitions give every core to a guest, the boot processor to Linux.
    for (core, owner) in [("0", "linux"), ("1", "linux"), ("2", "lavender")] {
        assert_eq!(row(core)[1..3], [owner, "owned"], "core {core}: {rows:#?}");
    }
    let core3 = row("3");
    assert_eq!(core3[1], "linux", "core 3 left Linux: {rows:#?}");
    assert!(
        ["owned", "granted"].contains(&core3[2]),
        "core 3 is not Linux's to run: {rows:#?}"
    );
    let summary = rows.iter().find(|r| r.starts_with("moves: ")).unwrap();
    assert!(summary.contains("1 cancelled"), "{summary}");
    let com2 = std::fs::read_to_string(term.run_dir().join("com2.log")).expect("com2.log");
    // The hypervisor's record of the move: cancelled, not forced.
    assert!(
        com2.lines().any(|line| {
            line.contains(r#""ev":"core_move","id":1,"core":3,"from":"linux","to":"lavender","outcome":"cancelled""#)
                && line.contains(r#""forced":false"#)
        }),
        "no cancelled core_move marker"
    );
    println!("{reply}\n{}", rows.join("\n"));
}

/// Checks a `guest_hung` report against its watchdog (`(watchdog_ms, check_period_ms)`
/// expected) and returns them. A heartbeat is seen when the monitor drains the ring, at most
/// one check period after it was sent, and the silence is checked every period: reported
/// after the deadline, at most the deadline plus one period after the last heartbeat seen,
/// plus `slack_ms`. The silence is printed in whole ms, rounded down from TSC ticks: one just
/// past the deadline may print as the deadline or 1 ms short (seen: 1000 of 1000, 1999 of
/// 2000).
fn check_silence(hung: &Value, watchdog: (u64, u64), slack_ms: u64) -> (u64, u64) {
    let deadline = u64_of(hung, "watchdog_ms");
    let period = u64_of(hung, "check_period_ms");
    assert_eq!((deadline, period), watchdog, "{hung}");
    let silent = u64_of(hung, "silent_ms");
    assert!(
        silent + 1 >= deadline && silent <= deadline + period + slack_ms,
        "silent {silent} ms: {hung}"
    );
    (deadline, period)
}
