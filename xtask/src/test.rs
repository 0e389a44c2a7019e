//! `cargo xtask test`: every test stage, then a summary.
//!
//! | stage | what |
//! |---|---|
//! | unit | `cargo test --workspace --exclude tandem-e2e` (host) |
//! | loom | `vmcall-proto`'s `loom_ring` and the hypervisor's `loom_cores` under `--cfg loom` (own target dir) |
//! | fuzz | each fuzz target (`vmcall-proto`'s, `guest-linux-pv`'s) for a bounded time (nightly, cargo-fuzz) |
//! | build | the bare-metal ELFs and the Linux user-space binaries |
//! | image | the kernel, the initramfs and the default test ISO |
//! | e2e | the `tandem-e2e` scenarios, two at a time, each booting an emulator |
//!
//! Before the stages, what rustup can give is installed ([`crate::toolchain`]): the targets
//! of `rust-toolchain.toml` and, when fuzzing, nightly and cargo-fuzz.
//!
//! The e2e scenarios get their inputs from the `TANDEM_*` environment variables below; the
//! stages after a failed build are skipped, the others all run so one report shows
//! everything. The summary counts every test that ran: each unit test (from libtest's
//! `test result:` lines), each loom test, each fuzz target, each scenario; a stage that
//! failed without failing a counted test (a build error, a crash) counts as one failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{build, bzimage, image, initramfs, kernel, partitions, toolchain, tools};

/// The end-to-end harness crate and its scenario test target.
pub const E2E_PACKAGE: &str = "tandem-e2e";
pub const E2E_TEST_TARGET: &str = "scenarios";

/// Environment given to the scenarios by `cargo xtask test`.
pub const ENV_HYPERVISOR: &str = "TANDEM_HYPERVISOR";
pub const ENV_LINUX_KERNEL: &str = "TANDEM_LINUX_KERNEL";
pub const ENV_LAVENDER: &str = "TANDEM_LAVENDER";
pub const ENV_INITRD: &str = "TANDEM_INITRD";
pub const ENV_ISO: &str = "TANDEM_ISO";
pub const ENV_RUNS_DIR: &str = "TANDEM_RUNS_DIR";
pub const ENV_KEEP_LOGS: &str = "TANDEM_KEEP_LOGS";

/// Each scenario writes this file into its run dir (read back for the summary).
pub const RESULT_FILE: &str = "result.json";

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Only the host stages: unit tests, loom model check, fuzzing.
    #[arg(long, conflicts_with = "e2e_only")]
    pub unit_only: bool,

    /// Only the bare-metal build, the image and the end-to-end scenarios.
    #[arg(long)]
    pub e2e_only: bool,

    /// Run only the scenarios whose name contains NAME (implies --e2e-only).
    #[arg(long, value_name = "NAME", conflicts_with = "unit_only")]
    pub scenario: Option<String>,

    /// Keep the console and emulator logs of passing scenarios too (failing ones always
    /// keep them) in target/tandem/runs/<scenario>/.
    #[arg(long)]
    pub keep_logs: bool,

    /// Seconds of fuzzing per fuzz target; 0 skips fuzzing. Fuzzing needs the nightly
    /// toolchain and cargo-fuzz: `test` installs them when missing (`rustup toolchain install
    /// nightly --profile minimal`, `cargo install cargo-fuzz --locked`) and a C++ compiler
    /// (Debian: g++) for libFuzzer.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub fuzz_seconds: u64,

    /// Boot this Linux kernel (a bzImage) instead of the pinned Debian cloud kernel. Its
    /// header (x86 boot protocol 2.12+, 64-bit entry) is checked before anything is built.
    #[arg(long, value_name = "PATH")]
    pub linux_kernel: Option<PathBuf>,

    /// Instead of the default scenarios, run only `nested_kvm` (the default run ends with
    /// it): Bochs boots Debian's generic kernel, which loads kvm_intel nested=1 and runs
    /// QEMU+KVM, which boots the test image with tests/configs/nested-kvm.toml; it passes
    /// when every core turns VMX on, Lavender says hello, the Linux agent is ready and its
    /// `vmctl` moves core 3 to Lavender and back (every view agreeing). It runs on Bochs 3.0
    /// with two fixes to its emulation, built from Debian's source on first use (1 to 2
    /// minutes; cached in target/tandem/cache/), then takes about 2 minutes on 2 cores
    /// (docs/nested-kvm.md). The summary gives each milestone's wall time; logs and
    /// result.json are in target/tandem/runs/nested_kvm/.
    #[arg(long, conflicts_with_all = ["unit_only", "scenario"])]
    pub nested_kvm: bool,

    /// Instead of the default scenarios, run only the full soak, `bochs_soak_core_moves` (not
    /// part of the default run: it takes hours under Bochs): the agent's `vmctl` moves core 3
    /// to Lavender and back 500 times (1,000 moves) while Linux runs a CPU load and Lavender
    /// its primes worker and delegated programs; it passes when every move completes with
    /// every view agreeing, every delegated program is right, nothing is lost (the agent's
    /// and its delegation server's open descriptors, Lavender's free frames, processes and
    /// threads back to their starting values) and Linux's log has no complaint. Its figures
    /// are printed. The default run's `bochs_vmctl_moves_cores_between_linux_and_lavender` is
    /// the short soak (20 round trips).
    #[arg(long, conflicts_with_all = ["unit_only", "scenario", "nested_kvm"])]
    pub soak: bool,

    /// With --nested-kvm: put the hypervisor and Lavender on the nested image with their
    /// debug info, to measure what stripping them saves.
    #[arg(long, requires = "nested_kvm")]
    pub keep_debug_info: bool,
}

#[derive(Debug)]
enum Status {
    Passed,
    Failed(String),
    Skipped(String),
}

/// How many tests passed and failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
    }

    /// One test's outcome.
    fn record(&mut self, passed: bool) {
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// The counts a stage reports: a failed stage is at least one failure, even when it
    /// failed before any test could (a compile error, a crashed test binary).
    fn of_stage(self, status: &Status) -> Counts {
        match status {
            Status::Failed(_) if self.failed == 0 => Counts { failed: 1, ..self },
            _ => self,
        }
    }
}

struct Stage {
    name: &'static str,
    status: Status,
    counts: Counts,
    wall: Duration,
}

struct ScenarioResult {
    name: String,
    passed: bool,
    wall: Option<f64>,
    run_dir: PathBuf,
    /// Lines printed under the scenario's in the summary (the nested scenario's milestones).
    details: Vec<String>,
}

/// Runs one stage, timing it; an error is the stage failing. The body adds the tests it ran
/// to the counts it is given.
fn stage(
    stages: &mut Vec<Stage>,
    name: &'static str,
    body: impl FnOnce(&mut Counts) -> Result<Status>,
) {
    println!("\n==> stage: {name}");
    let started = Instant::now();
    let mut counts = Counts::default();
    let status = body(&mut counts).unwrap_or_else(|e| Status::Failed(format!("{e:#}")));
    let counts = counts.of_stage(&status);
    let wall = started.elapsed();
    match &status {
        Status::Passed => println!("==> {name}: passed ({:.1}s)", wall.as_secs_f64()),
        Status::Failed(why) => println!("==> {name}: FAILED ({:.1}s): {why}", wall.as_secs_f64()),
        Status::Skipped(why) => println!("==> {name}: skipped: {why}"),
    }
    stages.push(Stage {
        name,
        status,
        counts,
        wall,
    });
}

pub fn run(args: TestArgs) -> Result<ExitCode> {
    let host = !args.e2e_only && args.scenario.is_none() && !args.nested_kvm && !args.soak;
    let e2e = !args.unit_only;
    let fuzzing = host && args.fuzz_seconds > 0;
    println!("==> cargo xtask {}", crate::version());
    // Bad input and missing tools are reported before anything is built.
    if let Some(kernel) = &args.linux_kernel {
        bzimage::check_file(kernel)?;
    }
    toolchain::ensure_targets()?;
    if fuzzing {
        toolchain::ensure_fuzzing()?;
    }
    let mut stages = Vec::new();
    let mut scenarios = Vec::new();

    if host {
        stage(&mut stages, "unit tests", unit_tests);
        stage(&mut stages, "loom model check", loom);
        stage(&mut stages, "fuzz", |counts| {
            if fuzzing {
                fuzz(args.fuzz_seconds, counts)
            } else {
                Ok(Status::Skipped("--fuzz-seconds 0".into()))
            }
        });
    }
    if e2e {
        let mut built = None;
        stage(&mut stages, "bare-metal build", |_| {
            let bare_metal = build::bare_metal()?;
            build::linux_user()?;
            built = Some(bare_metal);
            Ok(Status::Passed)
        });
        let mut inputs = None;
        stage(&mut stages, "image", |_| {
            let Some(bare_metal) = built.take() else {
                return Ok(Status::Skipped("the build failed".into()));
            };
            let kernel = kernel::linux_kernel(args.linux_kernel.as_deref())?;
            let iso = crate::tandem_dir().join("test").join("tandem.iso");
            let config = partitions::default_config();
            let packed = iso.with_extension("partitions");
            partitions::pack(&config, partitions::BuildMachine::default(), &packed)?;
            // The build stage built the agent; only the archive is written here.
            let initrd = iso.with_file_name("initramfs.cpio");
            let modules = kernel::doorbell_modules(args.linux_kernel.as_deref())?;
            initramfs::write(&initramfs::agent_binary(), &initrd, &modules)?;
            let guests = image::GuestImages {
                lavender: bare_metal.lavender,
                partitions: packed,
                linux_kernel: kernel,
                initrd,
            };
            let spec = image::ImageSpec::standard(&bare_metal.hypervisor, &guests, "log=info");
            image::build_iso(&spec, &iso)?;
            println!("    {}", iso.display());
            inputs = Some(E2eInputs {
                hypervisor: bare_metal.hypervisor,
                guests,
                iso,
            });
            Ok(Status::Passed)
        });
        if !args.nested_kvm {
            stage(&mut stages, "e2e scenarios", |counts| {
                let Some(inputs) = &inputs else {
                    return Ok(Status::Skipped("no image".into()));
                };
                scenarios = if args.soak {
                    e2e_scenarios(inputs, Selection::Ignored(SOAK_SCENARIO), args.keep_logs)?
                } else {
                    e2e_scenarios(
                        inputs,
                        Selection::Default(args.scenario.as_deref()),
                        args.keep_logs,
                    )?
                };
                for scenario in &scenarios {
                    counts.record(scenario.passed);
                }
                if scenarios.is_empty() {
                    bail!(
                        "no scenario ran{}",
                        args.scenario
                            .as_deref()
                            .map(|n| format!(" (none matches --scenario {n})"))
                            .unwrap_or_default()
                    );
                }
                Ok(if scenarios.iter().all(|s| s.passed) {
                    Status::Passed
                } else {
                    Status::Failed("some scenarios failed".into())
                })
            });
        }
        // The default run ends with the nested-KVM scenario; `--scenario` and `--soak` ask
        // for one scenario alone.
        if args.nested_kvm || (args.scenario.is_none() && !args.soak) {
            stage(&mut stages, "nested-kvm scenario", |counts| {
                let Some(inputs) = &inputs else {
                    return Ok(Status::Skipped("no image".into()));
                };
                let verdict = crate::nested_kvm::run(
                    &inputs.hypervisor,
                    &inputs.guests,
                    args.keep_debug_info,
                )?;
                counts.record(verdict.passed);
                scenarios.push(ScenarioResult {
                    name: crate::nested_kvm::SCENARIO.into(),
                    passed: verdict.passed,
                    wall: Some(verdict.wall.as_secs_f64()),
                    details: verdict.milestone_lines(),
                    run_dir: verdict.run_dir,
                });
                Ok(if verdict.passed {
                    Status::Passed
                } else {
                    Status::Failed(verdict.why)
                })
            });
        }
    }

    print_summary(&stages, &scenarios);
    let ok = stages
        .iter()
        .all(|s| !matches!(s.status, Status::Failed(_)));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status_of(cmd: &mut Command) -> Result<Status> {
    println!("    $ {}", tools::describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", tools::describe(cmd)))?;
    Ok(if status.success() {
        Status::Passed
    } else {
        Status::Failed(format!("`{}` failed ({status})", tools::describe(cmd)))
    })
}

/// Runs a `cargo test` command, echoing its output and adding up its `test result:` lines.
fn cargo_test(cmd: &mut Command, counts: &mut Counts) -> Result<Status> {
    println!("    $ {}", tools::describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", tools::describe(cmd)))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(binary) = libtest_summary(&line) {
            counts.add(binary);
        }
    }
    let status = child.wait()?;
    Ok(if status.success() {
        Status::Passed
    } else {
        Status::Failed(format!("`{}` failed ({status})", tools::describe(cmd)))
    })
}

fn unit_tests(counts: &mut Counts) -> Result<Status> {
    cargo_test(
        tools::cargo().args(["test", "--workspace", "--exclude", E2E_PACKAGE]),
        counts,
    )
}

/// The loom model checks: `vmcall-proto`'s ring and the hypervisor's core manager, each
/// under `--cfg loom` in its own target dir.
fn loom(counts: &mut Counts) -> Result<Status> {
    let root = crate::workspace_root();
    let checks = [("vmcall-proto", "loom_ring"), ("hypervisor", "loom_cores")];
    let mut ran = 0;
    for (package, test) in checks {
        let file = root.join(package).join("tests").join(format!("{test}.rs"));
        if !file.is_file() {
            continue;
        }
        let status = cargo_test(
            tools::cargo()
                .env("RUSTFLAGS", "--cfg loom")
                // Its own target dir: `--cfg loom` would otherwise invalidate the normal build.
                .env("CARGO_TARGET_DIR", crate::target_dir().join("loom"))
                .args(["test", "-p", package, "--release", "--test", test]),
            counts,
        )?;
        if !matches!(status, Status::Passed) {
            return Ok(status);
        }
        ran += 1;
    }
    Ok(if ran == 0 {
        Status::Skipped(
            "no loom tests (vmcall-proto/tests/loom_ring.rs, hypervisor/tests/loom_cores.rs)"
                .into(),
        )
    } else {
        Status::Passed
    })
}

/// `cargo +nightly ...` must go through rustup's `cargo` proxy, not the toolchain binary
/// in `$CARGO`, which does not understand `+toolchain`.
fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(dir);
    cmd
}

/// The crates with fuzz targets (each a `fuzz/` cargo-fuzz workspace of its own): the
/// messages and rings of `vmcall-proto`, and `vmctl`'s command line in `guest-linux-pv`.
const FUZZED_CRATES: [&str; 2] = ["vmcall-proto", "guest-linux-pv"];

/// Each fuzz target is one test: it passes when libFuzzer finds nothing in its time.
fn fuzz(seconds: u64, counts: &mut Counts) -> Result<Status> {
    let mut failed = Vec::new();
    let mut ran = 0;
    for krate in FUZZED_CRATES {
        let dir = crate::workspace_root().join(krate);
        if !dir.join("fuzz").is_dir() {
            continue;
        }
        // Nightly and cargo-fuzz were installed by `toolchain::ensure_fuzzing`.
        let list = tools::output(nightly_cargo(&dir).args(["fuzz", "list"]))?;
        let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        for target in &targets {
            let status = status_of(nightly_cargo(&dir).args([
                "fuzz",
                "run",
                target,
                "--",
                &format!("-max_total_time={seconds}"),
            ]))?;
            let passed = matches!(status, Status::Passed);
            counts.record(passed);
            ran += 1;
            if !passed {
                failed.push(format!("{krate}/{target}"));
            }
        }
    }
    Ok(if ran == 0 {
        Status::Skipped("no fuzz target (vmcall-proto/fuzz/, guest-linux-pv/fuzz/)".into())
    } else if failed.is_empty() {
        Status::Passed
    } else {
        Status::Failed(format!("fuzz target(s) failed: {}", failed.join(", ")))
    })
}

struct E2eInputs {
    hypervisor: PathBuf,
    guests: image::GuestImages,
    iso: PathBuf,
}

/// The full soak: an ignored scenario, run only by `--soak`.
const SOAK_SCENARIO: &str = "bochs_soak_core_moves";

/// Which scenarios run: the default ones (those matching a name filter), or one that is
/// ignored by default, by its exact name.
#[derive(Clone, Copy)]
enum Selection<'a> {
    Default(Option<&'a str>),
    Ignored(&'a str),
}

/// Roughly how long each scenario takes on CI (two at a time on two cores), in seconds. Only
/// the order depends on it: the longest start first, so that the two lanes end together
/// (longest-processing-time-first scheduling). A scenario missing here counts as
/// [`UNLISTED_WALL_S`] and so starts early.
const EXPECTED_WALL_S: &[(&str, u32)] = &[
    ("bochs_vmctl_moves_cores_between_linux_and_lavender", 350),
    ("bochs_policies_follow_a_phase_changing_load", 330),
    ("bochs_vmctl_exec_runs_lavender_programs", 230),
    ("bochs_faults_linux_sees_lavender_stopped", 170),
    ("bochs_lavender_delegates_file_calls", 140),
    ("bochs_both_guests_boot_to_a_quiet_shell", 65),
    ("bochs_faults_linux_hang_watchdog_stops_it", 60),
    ("bochs_linux_cpu_offline_online", 45),
    ("bochs_lavender_user_mode_isolation", 40),
    ("bochs_lavender_cores_move_under_load", 20),
    ("bochs_faults_guest_crash_stopped_other_runs_on", 15),
    ("bochs_faults_guest_hang_watchdog_stops_it", 15),
    ("bochs_faults_revoke_ignored_core_taken_by_force", 15),
    ("bochs_core_handover_carries_nothing", 15),
    ("bochs_ioapic_hostile_entries_refused", 15),
    ("bochs_lavender_boots_and_says_hello", 13),
    ("bochs_isolation_attack_stops_guest", 12),
    ("bochs_isolation_attacks_refused_fault_policy", 12),
    ("bochs_all_cores_vmx_on", 12),
    ("qemu_tcg_no_vmx_clear_error", 3),
    ("malformed_partition_config_refused_at_build_time", 1),
];
const UNLISTED_WALL_S: u32 = 600;
/// Each scenario is mostly one single-threaded emulator: two fill the two cores.
const E2E_LANES: usize = 2;

/// Runs the selected scenarios, [`E2E_LANES`] at a time, longest first, each in its own run
/// of the scenario test binary; prints each one's output whole when it ends, and collects
/// each scenario's result.
fn e2e_scenarios(
    inputs: &E2eInputs,
    selection: Selection<'_>,
    keep_logs: bool,
) -> Result<Vec<ScenarioResult>> {
    let binary = scenario_binary()?;
    let mut names = list_scenarios(&binary, selection)?;
    names.sort_by_key(|name| std::cmp::Reverse(expected_wall_s(name)));
    let runs = crate::runs_dir();
    let ignored = matches!(selection, Selection::Ignored(_));
    let command = |name: &str| {
        let mut cmd = Command::new(&binary);
        cmd.current_dir(crate::workspace_root().join("tests"))
            .args(["--exact", name, "--test-threads", "1"])
            // Scenarios print their figures (boot times, core-move statistics): show them.
            .arg("--show-output");
        if ignored {
            cmd.arg("--ignored");
        }
        cmd.env(ENV_HYPERVISOR, &inputs.hypervisor)
            .env(ENV_LINUX_KERNEL, &inputs.guests.linux_kernel)
            .env(ENV_LAVENDER, &inputs.guests.lavender)
            .env(ENV_INITRD, &inputs.guests.initrd)
            .env(ENV_ISO, &inputs.iso)
            .env(ENV_RUNS_DIR, &runs)
            .env(ENV_KEEP_LOGS, if keep_logs { "1" } else { "0" });
        cmd
    };
    println!(
        "    {} scenario(s), {E2E_LANES} at a time, longest first: $ {} --exact NAME ...",
        names.len(),
        binary.display()
    );
    let queue = std::sync::Mutex::new(
        names
            .iter()
            .enumerate()
            .collect::<std::collections::VecDeque<_>>(),
    );
    let results = std::sync::Mutex::new(Vec::new());
    let total = names.len();
    std::thread::scope(|scope| {
        for _ in 0..E2E_LANES {
            scope.spawn(|| loop {
                let Some((index, name)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                println!("    [{}/{total}] {name} started", index + 1);
                let started = Instant::now();
                let output = command(name).stdin(Stdio::null()).output();
                let outcome = match output {
                    Ok(out) => {
                        let text = format!(
                            "{}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let passed = text
                            .lines()
                            .filter_map(libtest_result)
                            .any(|(ran, passed)| ran == name && passed);
                        (passed && out.status.success(), text)
                    }
                    Err(e) => (
                        false,
                        format!("could not start {}: {e}\n", binary.display()),
                    ),
                };
                let (passed, text) = outcome;
                // A scenario in an area's module is `area::name`; its run dir is `name`.
                let short = name.rsplit_once("::").map_or(name.as_str(), |(_, n)| n);
                let run_dir = runs.join(short);
                let mut results = results.lock().unwrap();
                println!(
                    "==> scenario {name}: {} after {:.0} s\n{text}",
                    if passed { "passed" } else { "FAILED" },
                    started.elapsed().as_secs_f64()
                );
                results.push(ScenarioResult {
                    name: short.to_string(),
                    passed,
                    wall: recorded_wall(&run_dir),
                    run_dir,
                    details: Vec::new(),
                });
            });
        }
    });
    Ok(results.into_inner().unwrap())
}

/// The expected wall time of a scenario (its full libtest name), for ordering.
fn expected_wall_s(name: &str) -> u32 {
    let short = name.rsplit_once("::").map_or(name, |(_, n)| n);
    EXPECTED_WALL_S
        .iter()
        .find(|(known, _)| *known == short)
        .map_or(UNLISTED_WALL_S, |(_, s)| *s)
}

/// Builds the scenario test binary and returns its path (from cargo's JSON messages).
fn scenario_binary() -> Result<PathBuf> {
    let mut cmd = tools::cargo();
    cmd.args([
        "test",
        "-p",
        E2E_PACKAGE,
        "--test",
        E2E_TEST_TARGET,
        "--no-run",
    ])
    .args(["--message-format", "json-render-diagnostics"])
    .stdout(Stdio::piped());
    println!("    $ {}", tools::describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", tools::describe(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", tools::describe(&cmd), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == E2E_TEST_TARGET)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no scenario test binary")
}

/// The scenarios `selection` picks, by their full libtest names (`area::name`).
fn list_scenarios(binary: &Path, selection: Selection<'_>) -> Result<Vec<String>> {
    let list = |args: &[&str]| -> Result<Vec<String>> {
        let mut cmd = Command::new(binary);
        cmd.args(["--list", "--format", "terse"]).args(args);
        let out = tools::output(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.strip_suffix(": test"))
            .map(str::to_string)
            .collect())
    };
    match selection {
        Selection::Default(filter) => {
            // `--list` names the ignored scenarios too; they run only when named.
            let ignored = list(&["--ignored"])?;
            let mut names = list(filter.as_slice())?;
            names.retain(|name| !ignored.contains(name));
            Ok(names)
        }
        Selection::Ignored(name) => list(&["--ignored", "--exact", &format!("soak::{name}")]),
    }
}

/// The counts of one test binary from libtest's closing line, e.g.
/// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
fn libtest_summary(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_verdict, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    let (mut saw_passed, mut saw_failed) = (false, false);
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        match (what, n.parse::<u64>()) {
            ("passed", Ok(n)) => (counts.passed, saw_passed) = (n, true),
            ("failed", Ok(n)) => (counts.failed, saw_failed) = (n, true),
            _ => {}
        }
    }
    (saw_passed && saw_failed).then_some(counts)
}

/// `test NAME ... ok` / `test NAME ... FAILED` from libtest's output; ignored tests are
/// neither.
fn libtest_result(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("test ")?;
    let (name, verdict) = rest.split_once(" ... ")?;
    match verdict.trim() {
        "ok" => Some((name, true)),
        "FAILED" => Some((name, false)),
        _ => None,
    }
}

fn recorded_wall(run_dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(run_dir.join(RESULT_FILE)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["wall_seconds"].as_f64()
}

fn print_summary(stages: &[Stage], scenarios: &[ScenarioResult]) {
    println!("\n==> summary");
    for stage in stages {
        let counted = match stage.counts {
            Counts {
                passed: 0,
                failed: 0,
            } => String::new(),
            Counts { passed, failed } => format!("  ({passed} passed, {failed} failed)"),
        };
        let (verdict, note) = match &stage.status {
            Status::Passed => ("passed", counted),
            Status::Failed(why) => ("FAILED", format!("{counted}  {}", first_line(why))),
            Status::Skipped(why) => ("skipped", format!("  {why}")),
        };
        println!(
            "  stage     {:<34} {:<8} {:>7.1}s{note}",
            stage.name,
            verdict,
            stage.wall.as_secs_f64()
        );
    }
    for scenario in scenarios {
        let wall = scenario
            .wall
            .map(|w| format!("{w:>7.1}s"))
            .unwrap_or_else(|| "      ?s".into());
        let logs = if scenario.passed {
            String::new()
        } else {
            format!("  logs: {}", scenario.run_dir.display())
        };
        println!(
            "  scenario  {:<34} {:<8} {wall}{logs}",
            scenario.name,
            if scenario.passed { "passed" } else { "FAILED" },
        );
        for line in &scenario.details {
            println!("              {line}");
        }
    }
    println!("{}", closing_line(stages));
}

/// The summary's last line: every counted test of every stage.
fn closing_line(stages: &[Stage]) -> String {
    let mut total = Counts::default();
    for stage in stages {
        total.add(stage.counts);
    }
    format!("{} passed, {} failed", total.passed, total.failed)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_are_recognised() {
        assert_eq!(
            libtest_result("test bochs_all_cores_vmx_on ... ok"),
            Some(("bochs_all_cores_vmx_on", true))
        );
        assert_eq!(
            libtest_result("test qemu_tcg_no_vmx_clear_error ... FAILED"),
            Some(("qemu_tcg_no_vmx_clear_error", false))
        );
        assert_eq!(libtest_result("test slow ... ignored"), None);
        assert_eq!(
            libtest_result("test bochs_x has been running for over 60 seconds"),
            None
        );
        assert_eq!(libtest_result("test result: ok. 2 passed; 0 failed"), None);
    }

    #[test]
    fn libtest_summaries_are_counted() {
        assert_eq!(
            libtest_summary(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
                 finished in 0.31s"
            ),
            Some(Counts {
                passed: 12,
                failed: 0
            })
        );
        assert_eq!(
            libtest_summary(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Counts {
                passed: 3,
                failed: 2
            })
        );
        assert_eq!(
            libtest_summary("test result: ok. 0 passed; 0 failed; 0 ignored"),
            Some(Counts::default())
        );
        assert_eq!(libtest_summary("test foo ... ok"), None);
        assert_eq!(libtest_summary("test result: ok. lots passed"), None);
        assert_eq!(libtest_summary("running 12 tests"), None);
    }

    #[test]
    fn a_failed_stage_counts_at_least_one_failure() {
        let failed = Status::Failed("build error".into());
        assert_eq!(
            Counts::default().of_stage(&failed),
            Counts {
                passed: 0,
                failed: 1
            }
        );
        let some = Counts {
            passed: 4,
            failed: 2,
        };
        assert_eq!(some.of_stage(&failed), some);
        assert_eq!(some.of_stage(&Status::Passed), some);
        assert_eq!(
            Counts::default().of_stage(&Status::Skipped("no image".into())),
            Counts::default()
        );
    }

    #[test]
    fn the_summary_adds_every_stage() {
        let stage = |status, passed, failed| Stage {
            name: "s",
            status,
            counts: Counts { passed, failed },
            wall: Duration::ZERO,
        };
        let stages = [
            stage(Status::Passed, 240, 0),
            stage(Status::Passed, 1, 0),
            stage(Status::Failed("x".into()), 2, 1),
            stage(Status::Passed, 9, 1),
        ];
        assert_eq!(closing_line(&stages), "252 passed, 2 failed");
        assert_eq!(closing_line(&[]), "0 passed, 0 failed");
    }
}
