//! Lavender programs started, watched and steered from Linux's shell with `vmctl exec`,
//! `ps`, `kill`, `stop` and `cont`, in one boot of the default configuration.

use std::time::Duration;

use serde_json::Value;
use tandem_e2e::Terminal;

/// Where the initramfs installs Lavender's programs.
const PROGRAMS: &str = "/usr/lib/tandem/lavender";
/// Longest wait for one command's answer (under Bochs, on a busy machine).
const COMMAND: Duration = Duration::from_secs(900);

/// The shell at the far end of `cargo xtask run`, one command at a time.
struct Shell {
    term: Terminal,
    /// Where the terminal's output of the next command starts.
    at: usize,
    commands: usize,
}

impl Shell {
    /// Runs `command` and returns what it printed and its exit status. The status line is
    /// written so that its echo (`"R""C-…`) cannot be mistaken for it.
    fn run(&mut self, command: &str) -> (String, i32) {
        self.commands += 1;
        let tag = format!("RC-{}=", self.commands);
        let typed = format!("{command}; echo \"R\"\"{}$?\"\r", &tag[1..]);
        self.term.type_text(typed.as_bytes());
        let found = self
            .term
            .wait_for(&tag, self.at, COMMAND)
            .unwrap_or_else(|| panic!("no answer to `{command}`"));
        self.finish(command, found, &tag)
    }

    /// Types `command`, waits a few seconds once the shell has echoed it (the program runs;
    /// Lavender's own log line may wait while the program keeps its cores busy), presses
    /// Ctrl-C, and returns what it printed and its exit status.
    fn interrupt(&mut self, command: &str) -> (String, i32) {
        self.commands += 1;
        let tag = format!("RC-{}=", self.commands);
        let typed = format!("{command}; echo \"R\"\"{}$?\"", &tag[1..]);
        self.term.type_text(typed.as_bytes());
        self.term.type_text(b"\r");
        self.term
            .wait_for(&format!("{}$?\"", &tag[1..]), self.at, COMMAND)
            .unwrap_or_else(|| panic!("`{command}` was not echoed"));
        std::thread::sleep(Duration::from_secs(5));
        self.term.type_text(b"\x03");
        let found = self
            .term
            .wait_for(&tag, self.at, COMMAND)
            .unwrap_or_else(|| panic!("no answer to `{command}` after Ctrl-C"));
        self.finish(command, found, &tag)
    }

    /// Types `command` (a job of the shell's own, no status line), waits for `started` in its
    /// output, presses Ctrl-Z and waits for the shell to report the job stopped. Returns what
    /// the terminal showed meanwhile.
    fn suspend(&mut self, command: &str, started: &str) -> String {
        self.term.type_text(command.as_bytes());
        self.term.type_text(b"\r");
        let output = self
            .term
            .wait_for(started, self.at, COMMAND)
            .unwrap_or_else(|| panic!("`{command}` printed no `{started}`"));
        self.term.type_text(b"\x1a");
        let stopped = self
            .term
            .wait_for("Stopped", output, COMMAND)
            .unwrap_or_else(|| panic!("the shell did not report `{command}` stopped"));
        let shown = self.term.shown();
        let end = shown[stopped..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(shown.len(), |at| stopped + at);
        let output = String::from_utf8_lossy(&shown[self.at..end]).replace('\r', "");
        self.at = end;
        output
    }

    /// What the command printed up to its status line at `found`, and the status.
    fn finish(&mut self, command: &str, found: usize, tag: &str) -> (String, i32) {
        // The status may still be on its way.
        self.term.wait_for("\n", found, COMMAND);
        let shown = self.term.shown();
        let end = shown[found..]
            .iter()
            .position(|b| *b == b'\r' || *b == b'\n')
            .map_or(shown.len(), |at| found + at);
        let output = String::from_utf8_lossy(&shown[self.at..found]).replace('\r', "");
        let status = String::from_utf8_lossy(&shown[found + tag.len()..end])
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no status after `{command}`: {output}"));
        self.at = end;
        (output, status)
    }

    /// `vmctl ps --json`, parsed.
    fn ps(&mut self) -> Vec<Value> {
        let (output, status) = self.run("vmctl ps --json");
        assert_eq!(status, 0, "vmctl ps --json: {output}");
        let line = output
            .lines()
            // A JSON array, not a line of Lavender's console (`[lavender] ...`) that the
            // terminal shows in between.
            .find(|line| line.starts_with("[{") || line.trim_end() == "[]")
            .unwrap_or_else(|| panic!("no JSON from vmctl ps: {output}"));
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("vmctl ps --json: {e}: {line}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// The pid primes prints in its first line (`pid N on core C: ...`).
fn pid_of(output: &str) -> u64 {
    output
        .lines()
        .find_map(|line| line.strip_prefix("pid "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid line: {output}"))
}

fn row(rows: &[Value], pid: u64) -> Value {
    rows.iter()
        .find(|row| row["pid"] == pid)
        .cloned()
        .unwrap_or_else(|| panic!("pid {pid} not in {rows:?}"))
}

/// Bochs, the default configuration (Lavender boots running only `idle`), on Linux's shell,
/// with core 3 moved to Lavender: `vmctl exec .../primes --cores 2` prints the right count
/// (17984 primes below 200000) with the shell's stdout, its workers ran on cores 2 and 3, and
/// it exits 0; with `--cores 1` every thread ran on one core (primes' own report and `ps`);
/// Ctrl-Z stops an attached exec (`ps`: stopped) and `fg` lets it finish (its output, 0); a
/// program that exits 3 gives status 3; one that faults
/// gives 139 (128 + SIGSEGV) and the next program runs; a pipeline through Lavender's `wc -l`
/// prints what busybox's does; a detached `spin` is listed by `ps`, stopped (its CPU time
/// stops growing), continued (it grows again) and killed (`ps`: killed, 137); Ctrl-C in an
/// attached `vmctl exec` ends its process as SIGINT would (130, from its notification); a missing file,
/// a file that is no ELF, an ELF for another machine, a Linux executable, a file too large,
/// `--cores 0` and more cores than Lavender may hold, an unknown pid, and `exec` or `stop` by a user other than root are refused with a clear
/// message and the status documented for each,
/// and Lavender still runs programs after all of them.
#[test]
fn bochs_vmctl_exec_runs_lavender_programs() {
    let mut term = Terminal::run(
        "bochs_vmctl_exec_runs_lavender_programs",
        None,
        &["--emulator", "bochs", "--timeout", "3000"],
    );
    let prompt = term
        .wait_for("~ # ", 0, Duration::from_secs(1500))
        .expect("no `~ # ` prompt on the terminal");
    let mut shell = Shell {
        term,
        at: prompt,
        commands: 0,
    };

    // The kernel's own console messages (a warning about a slow interrupt under Bochs, say)
    // would land in the middle of the output read below: they stay in its log only.
    let (output, status) = shell.run("dmesg -n 1");
    assert_eq!(status, 0, "dmesg -n 1: {output}");

    // Lavender takes core 3 too, so that a core limit has cores to choose from.
    let (output, status) = shell.run("vmctl move-core 3 --to lavender");
    assert_eq!(status, 0, "move-core 3: {output}");

    // `--cores 2`: the workers run on both of Lavender's cores.
    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/primes --cores 2"));
    assert!(
        output.contains("counted 17984 primes below 200000") && output.contains("(ok)"),
        "primes: {output}"
    );
    assert!(
        output.contains("on cores 0xc "),
        "primes --cores 2: {output}"
    );
    assert_eq!(status, 0, "primes: {output}");
    let both = pid_of(&output);

    // `--cores 1`: every thread of the process runs on one core, though two are Lavender's.
    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/primes --cores 1"));
    assert!(
        output.contains("counted 17984 primes below 200000") && output.contains("(ok)"),
        "primes --cores 1: {output}"
    );
    assert!(
        output.contains("on cores 0x4 ") || output.contains("on cores 0x8 "),
        "primes --cores 1 ran on more than one core: {output}"
    );
    assert_eq!(status, 0, "primes --cores 1: {output}");
    let one = pid_of(&output);
    let rows = shell.ps();
    let listed = row(&rows, both);
    assert_eq!(listed["cores"], 2, "{listed}");
    assert_eq!(listed["ran_on"], serde_json::json!([2, 3]), "{listed}");
    let listed = row(&rows, one);
    assert_eq!(listed["cores"], 1, "{listed}");
    assert_eq!(
        listed["ran_on"].as_array().map(Vec::len),
        Some(1),
        "primes --cores 1 ran on: {listed}"
    );

    // Ctrl-Z stops an attached `vmctl exec` and its process; `fg` continues both, and the
    // program finishes with its output and status.
    let command = format!("vmctl exec {PROGRAMS}/primes --cores 1 rounds=4");
    let output = shell.suspend(&command, "threads x 4 rounds");
    let stopped = pid_of(&output);
    let listed = row(&shell.ps(), stopped);
    assert_eq!(listed["state"], "stopped", "after Ctrl-Z: {listed}");
    let (output, status) = shell.run("fg");
    assert!(
        output.contains("done: 4 rounds, 0 wrong") && output.contains("duplicated 0 (ok)"),
        "primes after fg: {output}"
    );
    assert_eq!(status, 0, "primes after fg: {output}");
    let listed = row(&shell.ps(), stopped);
    assert_eq!(listed["state"], "exited", "after fg: {listed}");
    assert_eq!(listed["status"], 0, "after fg: {listed}");

    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/status 3"));
    assert_eq!(status, 3, "status 3: {output}");

    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/fault"));
    assert_eq!(status, 139, "fault: {output}");
    assert!(output.contains("killed by signal 11 (SIGSEGV)"), "{output}");
    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/status 0"));
    assert_eq!(status, 0, "Lavender after the fault: {output}");

    let (output, status) = shell.run(&format!(
        "A=$(ls /bin | vmctl exec {PROGRAMS}/wc -l); B=$(ls /bin | wc -l); echo \"W\"\"C:$A:$B\""
    ));
    assert_eq!(status, 0, "{output}");
    let counts = output
        .lines()
        .find_map(|line| line.strip_prefix("WC:"))
        .unwrap_or_else(|| panic!("no counts: {output}"));
    let (lavender, busybox) = counts.split_once(':').expect("two counts");
    assert!(
        busybox.trim().parse::<u32>().is_ok_and(|n| n > 20),
        "{counts}"
    );
    assert_eq!(
        lavender.trim(),
        busybox.trim(),
        "wc -l through Lavender vs busybox"
    );

    let (output, status) = shell.run(&format!(
        "P=$(vmctl exec --detach {PROGRAMS}/spin); echo \"P\"\"ID:$P\""
    ));
    assert_eq!(status, 0, "{output}");
    let pid: u64 = output
        .lines()
        .find_map(|line| line.strip_prefix("PID:"))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid from --detach: {output}"));
    shell.run("sleep 1");
    let running = row(&shell.ps(), pid);
    assert_eq!(running["program"], "spin", "{running}");
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["threads"], 1, "{running}");
    let (output, status) = shell.run("vmctl stop $P");
    assert_eq!(status, 0, "stop: {output}");
    let stopped = row(&shell.ps(), pid);
    shell.run("sleep 2");
    let still = row(&shell.ps(), pid);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(
        stopped["cpu_us"], still["cpu_us"],
        "CPU time grew while stopped"
    );
    let (output, status) = shell.run("vmctl cont $P");
    assert_eq!(status, 0, "cont: {output}");
    shell.run("sleep 2");
    let again = row(&shell.ps(), pid);
    assert_eq!(again["state"], "running", "{again}");
    assert!(
        again["cpu_us"].as_u64() > still["cpu_us"].as_u64(),
        "CPU time did not grow after cont: {still} -> {again}"
    );
    let (output, status) = shell.run("vmctl kill $P");
    assert_eq!(status, 0, "kill: {output}");
    shell.run("sleep 1");
    let killed = row(&shell.ps(), pid);
    assert_eq!(killed["state"], "killed", "{killed}");
    assert_eq!(killed["status"], 137, "{killed}");
    let (output, _) = shell.run("vmctl ps");
    assert!(
        output.contains("PROGRAM") && output.contains("spin"),
        "vmctl ps table: {output}"
    );

    // Ctrl-C in an attached vmctl ends the remote process as SIGINT ends a local one: its
    // notification ends vmctl with 130 (128 + SIGINT).
    let (output, status) = shell.interrupt(&format!("vmctl exec {PROGRAMS}/spin threads=2"));
    assert_eq!(status, 130, "Ctrl-C: {output}");
    assert!(output.contains("killed by signal 2 (SIGINT)"), "{output}");

    for (command, expected, message) in [
        (
            "vmctl exec --cores 3 /usr/lib/tandem/lavender/status 0",
            125,
            "Lavender may hold at most 2 cores (2, 3)",
        ),
        (
            "vmctl exec --cores 0 /usr/lib/tandem/lavender/status 0",
            2,
            "--cores",
        ),
        ("vmctl exec /nonexistent/program", 127, "no such file"),
        ("vmctl exec /etc/passwd", 126, "not an ELF file"),
        (
            "printf '\\177ELF\\001\\001\\001\\000\\000\\000\\000\\000\\000\\000\\000\\000\\002\\000\\050\\000' > /tmp/arm; vmctl exec /tmp/arm",
            126,
            "wrong architecture",
        ),
        (
            // An x86-64 ELF header of a fixed-address executable (ET_EXEC), as Linux runs.
            "{ printf '\\177ELF\\002\\001\\001\\000\\000\\000\\000\\000\\000\\000\\000\\000\\002\\000\\076\\000'; head -c 200 /dev/zero; } > /tmp/exe; vmctl exec /tmp/exe",
            126,
            "not a valid Lavender program",
        ),
        (
            "head -c 400000 /bin/busybox > /tmp/big; vmctl exec /tmp/big",
            126,
            "larger than Lavender can take",
        ),
        ("vmctl kill 4000000", 3, "no process 4000000"),
        (
            "su -s /bin/sh nobody -c 'vmctl exec /usr/lib/tandem/lavender/status 0'",
            125,
            "needs root",
        ),
        ("su -s /bin/sh nobody -c 'vmctl stop 1'", 6, "needs root"),
    ] {
        let (output, status) = shell.run(command);
        assert_eq!(status, expected, "`{command}`: {output}");
        assert!(output.contains(message), "`{command}`: {output}");
    }
    let (output, status) = shell.run(&format!("vmctl exec {PROGRAMS}/status 0"));
    assert_eq!(status, 0, "Lavender after the refusals: {output}");

    let status = shell.term.stop(Duration::from_secs(120));
    assert_eq!(status.and_then(|s| s.code()), Some(130));
}
