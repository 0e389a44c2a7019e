//! `cargo xtask test`: every test stage, then a summary.
//!
//! | stage | what |
//! |---|---|
//! | unit | `cargo test --workspace --exclude tandem-e2e` (host) |
//! | loom | `vmcall-proto`'s `loom_ring` and the hypervisor's `loom_cores` under `--cfg loom` (own target dir) |
//! | fuzz | each `vmcall-proto` fuzz target for a bounded time (nightly, cargo-fuzz) |
//! | build | the bare-metal ELFs and the Linux user-space binaries |
//! | image | the kernel, the initramfs and the default test ISO |
//! | e2e | the `tandem-e2e` scenarios, two at a time, each booting an emulator |
//!
//! The e2e scenarios get their inputs from the `TANDEM_*` environment variables below; the
//! stages after a failed build are skipped, the others all run so one report shows
//! everything.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{build, image, initramfs, kernel, partitions, tools};

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

    /// Seconds of fuzzing per fuzz target.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub fuzz_seconds: u64,

    /// Boot this Linux kernel (a bzImage) instead of the pinned Debian cloud kernel.
    #[arg(long, value_name = "PATH")]
    pub linux_kernel: Option<PathBuf>,
}

#[derive(Debug)]
enum Status {
    Passed,
    Failed(String),
    Skipped(String),
}

struct Stage {
    name: &'static str,
    status: Status,
    wall: Duration,
}

struct ScenarioResult {
    name: String,
    passed: bool,
    wall: Option<f64>,
    run_dir: PathBuf,
}

/// Runs one stage, timing it; an error is the stage failing.
fn stage(stages: &mut Vec<Stage>, name: &'static str, body: impl FnOnce() -> Result<Status>) {
    println!("\n==> stage: {name}");
    let started = Instant::now();
    let status = body().unwrap_or_else(|e| Status::Failed(format!("{e:#}")));
    let wall = started.elapsed();
    match &status {
        Status::Passed => println!("==> {name}: passed ({:.1}s)", wall.as_secs_f64()),
        Status::Failed(why) => println!("==> {name}: FAILED ({:.1}s): {why}", wall.as_secs_f64()),
        Status::Skipped(why) => println!("==> {name}: skipped: {why}"),
    }
    stages.push(Stage { name, status, wall });
}

pub fn run(args: TestArgs) -> Result<ExitCode> {
    let host = !args.e2e_only && args.scenario.is_none();
    let e2e = !args.unit_only;
    let mut stages = Vec::new();
    let mut scenarios = Vec::new();

    if host {
        stage(&mut stages, "unit tests", unit_tests);
        stage(&mut stages, "loom model check", loom);
        stage(&mut stages, "fuzz", || fuzz(args.fuzz_seconds));
    }
    if e2e {
        let mut built = None;
        stage(&mut stages, "bare-metal build", || {
            let bare_metal = build::bare_metal()?;
            build::linux_user()?;
            built = Some(bare_metal);
            Ok(Status::Passed)
        });
        let mut inputs = None;
        stage(&mut stages, "image", || {
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
            initramfs::write(&initramfs::agent_binary(), &initrd)?;
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
        stage(&mut stages, "e2e scenarios", || {
            let Some(inputs) = &inputs else {
                return Ok(Status::Skipped("no image".into()));
            };
            scenarios = e2e_scenarios(inputs, args.scenario.as_deref(), args.keep_logs)?;
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

fn unit_tests() -> Result<Status> {
    status_of(tools::cargo().args(["test", "--workspace", "--exclude", E2E_PACKAGE]))
}

/// The loom model checks: `vmcall-proto`'s ring and the hypervisor's core manager, each
/// under `--cfg loom` in its own target dir.
fn loom() -> Result<Status> {
    let root = crate::workspace_root();
    let checks = [("vmcall-proto", "loom_ring"), ("hypervisor", "loom_cores")];
    let mut ran = Vec::new();
    for (package, test) in checks {
        if !root
            .join(package)
            .join("tests")
            .join(format!("{test}.rs"))
            .is_file()
        {
            continue;
        }
        let status = status_of(
            tools::cargo()
                .env("RUSTFLAGS", "--cfg loom")
                // Its own target dir: `--cfg loom` would otherwise invalidate the normal build.
                .env("CARGO_TARGET_DIR", crate::target_dir().join("loom"))
                .args(["test", "-p", package, "--release", "--test", test]),
        )?;
        if !matches!(status, Status::Passed) {
            return Ok(status);
        }
        ran.push(test);
    }
    Ok(if ran.is_empty() {
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

fn fuzz(seconds: u64) -> Result<Status> {
    let dir = crate::workspace_root().join("vmcall-proto");
    if !dir.join("fuzz").is_dir() {
        return Ok(Status::Skipped("vmcall-proto/fuzz/ is absent".into()));
    }
    let nightly = nightly_cargo(&dir).arg("--version").output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!("fuzzing needs the nightly toolchain: rustup toolchain install nightly");
    }
    if !nightly_cargo(&dir)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("    cargo-fuzz is missing; installing it");
        tools::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"])).context(
            "cargo-fuzz is not installed and `cargo install cargo-fuzz --locked` failed",
        )?;
    }
    let list = tools::output(nightly_cargo(&dir).args(["fuzz", "list"]))?;
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        return Ok(Status::Skipped(
            "vmcall-proto/fuzz/ has no fuzz target".into(),
        ));
    }
    for target in &targets {
        let status = status_of(nightly_cargo(&dir).args([
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={seconds}"),
        ]))?;
        if !matches!(status, Status::Passed) {
            return Ok(status);
        }
    }
    Ok(Status::Passed)
}

struct E2eInputs {
    hypervisor: PathBuf,
    guests: image::GuestImages,
    iso: PathBuf,
}

/// Runs the scenario test binary, echoing its output, and collects each scenario's result.
fn e2e_scenarios(
    inputs: &E2eInputs,
    filter: Option<&str>,
    keep_logs: bool,
) -> Result<Vec<ScenarioResult>> {
    let runs = crate::runs_dir();
    let mut cmd = tools::cargo();
    cmd.args(["test", "-p", E2E_PACKAGE, "--test", E2E_TEST_TARGET, "--"])
        // Each scenario is mostly one single-threaded emulator: two fill the two cores.
        .args(["--test-threads", "2"])
        // Scenarios print their figures (boot times, core-move statistics): show them.
        .arg("--show-output")
        .args(filter)
        .env(ENV_HYPERVISOR, &inputs.hypervisor)
        .env(ENV_LINUX_KERNEL, &inputs.guests.linux_kernel)
        .env(ENV_LAVENDER, &inputs.guests.lavender)
        .env(ENV_INITRD, &inputs.guests.initrd)
        .env(ENV_ISO, &inputs.iso)
        .env(ENV_RUNS_DIR, &runs)
        .env(ENV_KEEP_LOGS, if keep_logs { "1" } else { "0" })
        .stdout(Stdio::piped());
    println!("    $ {}", tools::describe(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", tools::describe(&cmd)))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut results = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((name, passed)) = libtest_result(&line) {
            let run_dir = runs.join(name);
            results.push(ScenarioResult {
                name: name.to_string(),
                passed,
                wall: recorded_wall(&run_dir),
                run_dir,
            });
        }
    }
    let status = child.wait()?;
    if !status.success() && results.iter().all(|r| r.passed) {
        // The binary failed without a failing scenario: it did not build, or crashed.
        bail!("`{}` failed ({status})", tools::describe(&cmd));
    }
    Ok(results)
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
        let (verdict, note) = match &stage.status {
            Status::Passed => ("passed", String::new()),
            Status::Failed(why) => ("FAILED", format!("  {}", first_line(why))),
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
    }
    let passed = scenarios.iter().filter(|s| s.passed).count();
    println!("{passed} passed, {} failed", scenarios.len() - passed);
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
}
