//! `tandem.selftest=policy-bench:SEEDS:WORKLOADS` (for `cargo xtask bench --only policies`):
//! runs each workload of the comma-separated list under `static`, `autonomous` and
//! `cooperative`, for seeds 1..=SEEDS, in one boot, driven the way a user at the Linux shell
//! would: `vmctl rebalance` switches the policy, `vmctl exec` starts Lavender's batch job
//! (`phases`), `sh` loops make Linux busy.
//!
//! Before each run the policy goes back to `static` and the movable core back to Linux (the
//! boot partition), so every run starts from the same allocation. The agent only starts the
//! load and brackets each run with the hypervisor's clock (`since_us` of the switch, the
//! status page's `published_us` once the job ended); what happened in between (moves,
//! decisions, load reports) the benchmark reads from the hypervisor's own markers.
//!
//! Markers: `policy_bench_config` (every workload's parameters), one `policy_bench_run` per
//! run, `policy_bench_done`; a failure is an `agent_error` with code `policy_bench`.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::report;

const WORD: &str = "tandem.selftest=policy-bench:";
const VMCTL: &str = "/bin/vmctl";
const PHASES: &str = "/usr/lib/tandem/lavender/phases";
/// The file the I/O phase reads through delegation (under the served root).
const IO_FILE: &str = "policy-bench.dat";
const IO_FILE_BYTES: usize = 256 * 1024;
pub const POLICIES: [&str; 3] = ["static", "autonomous", "cooperative"];
/// How long the system is left alone after the reset, before a run starts.
const SETTLE: Duration = Duration::from_millis(300);

/// One workload: Lavender's batch job, and when (if ever) Linux becomes busy.
pub struct Workload {
    pub name: &'static str,
    /// What it models, for the report.
    pub about: &'static str,
    /// `phases` arguments (`io=` is added when `io` is set).
    pub job: &'static str,
    pub io: bool,
    /// Linux starts this many CPU-bound tasks ...
    pub linux_tasks: usize,
    /// ... this long after the job started (plus up to `linux_jitter_ms` drawn from the seed).
    pub linux_after_ms: u64,
    pub linux_jitter_ms: u64,
}

/// The workloads, by name. One unit of `work` is 1000 multiply-adds.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "step",
        about: "Lavender's 2-thread job starts while Linux idles; Linux runs 2 CPU-bound tasks later",
        job: "threads=2 work=4000 rounds=1",
        io: false,
        linux_tasks: 2,
        linux_after_ms: 300,
        linux_jitter_ms: 50,
    },
    Workload {
        name: "square-short",
        about: "Lavender's 2 threads compute, then sleep 5 ms, 60 times (period ~10 ms); Linux idles",
        job: "threads=2 work=25 rounds=60 idle_us=5000",
        io: false,
        linux_tasks: 0,
        linux_after_ms: 0,
        linux_jitter_ms: 0,
    },
    Workload {
        name: "square-long",
        about: "Lavender's 2 threads compute, then sleep 50 ms, 8 times (period ~100 ms); Linux idles",
        job: "threads=2 work=250 rounds=8 idle_us=50000",
        io: false,
        linux_tasks: 0,
        linux_after_ms: 0,
        linux_jitter_ms: 0,
    },
    Workload {
        name: "hpc",
        about: "Lavender computes (2 threads), reads 4 KiB 150 times through delegation (Linux serves), computes again",
        job: "threads=2 work=2000 rounds=1 calls=150",
        io: true,
        linux_tasks: 0,
        linux_after_ms: 0,
        linux_jitter_ms: 0,
    },
];

/// What the command line asks for: seeds and workloads.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub seeds: u32,
    pub workloads: Vec<&'static Workload>,
}

pub fn requested(cmdline: &str) -> Option<Request> {
    let spec = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(WORD))?;
    let (seeds, names) = spec.split_once(':')?;
    let seeds = seeds.parse().ok().filter(|s| (1..=100).contains(s))?;
    let workloads = names
        .split(',')
        .map(|n| WORKLOADS.iter().find(|w| w.name == n))
        .collect::<Option<Vec<_>>>()?;
    (!workloads.is_empty()).then_some(Request { seeds, workloads })
}

impl PartialEq for Workload {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub fn run(request: &Request, served_root: &std::path::Path) {
    if let Err(reason) = run_all(request, served_root) {
        report::emit(&report::error("policy_bench", &reason, |_| {}));
    }
}

fn vmctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new(VMCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {VMCTL}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vmctl {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status() -> Result<Value, String> {
    let text = vmctl(&["status", "--json"])?;
    serde_json::from_str(text.trim()).map_err(|e| format!("vmctl status --json: {e}"))
}

/// The cores `guest` holds on the status page.
fn held(page: &Value, guest: &str) -> Vec<u64> {
    page["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == guest))
        .and_then(|g| g["held"].as_array())
        .map(|h| h.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The policy back to `static` and every core back to the guest that held it at boot.
fn reset(boot: &[(u64, &'static str)]) -> Result<(), String> {
    vmctl(&["rebalance", "--policy", "static"])?;
    let page = status()?;
    for &(core, guest) in boot {
        if !held(&page, guest).contains(&core) {
            vmctl(&["move-core", &core.to_string(), "--to", guest])?;
        }
    }
    std::thread::sleep(SETTLE);
    Ok(())
}

/// A small deterministic generator: the seed's jitter.
fn jitter(seed: u32, salt: u64, range_ms: u64) -> u64 {
    let mut x = u64::from(seed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(salt);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    if range_ms == 0 {
        0
    } else {
        x % (range_ms + 1)
    }
}

fn spinners(count: usize) -> Result<Vec<Child>, String> {
    (0..count)
        .map(|_| {
            Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .map_err(|e| format!("starting Linux's load: {e}"))
        })
        .collect()
}

/// The `key=value` fields of the job's summary line (`phases: ...`).
fn summary(stdout: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("phases: "))
        .map(|rest| {
            rest.split_ascii_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn run_all(request: &Request, served_root: &std::path::Path) -> Result<(), String> {
    let data: Vec<u8> = (0..IO_FILE_BYTES)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::write(served_root.join(IO_FILE), data)
        .map_err(|e| format!("writing {IO_FILE}: {e}"))?;
    let page = status()?;
    let boot: Vec<(u64, &'static str)> = ["linux", "lavender"]
        .into_iter()
        .flat_map(|g| held(&page, g).into_iter().map(move |c| (c, g)))
        .collect();
    report::emit(&report::marker("policy_bench_config", |o| {
        o.u64("seeds", request.seeds.into());
        o.array("boot_cores", |a| {
            for &(core, guest) in &boot {
                a.object(|c| {
                    c.u64("core", core).str("guest", guest);
                });
            }
        });
        o.array("workloads", |a| {
            for w in &request.workloads {
                a.object(|j| {
                    j.str("name", w.name)
                        .str("about", w.about)
                        .str("job", w.job)
                        .bool("io", w.io)
                        .u64("linux_tasks", w.linux_tasks as u64)
                        .u64("linux_after_ms", w.linux_after_ms)
                        .u64("linux_jitter_ms", w.linux_jitter_ms);
                });
            }
        });
    }));
    for seed in 1..=request.seeds {
        for workload in &request.workloads {
            for (index, policy) in POLICIES.into_iter().enumerate() {
                reset(&boot)?;
                one_run(workload, policy, seed, index as u64)?;
            }
        }
    }
    reset(&boot)?;
    report::emit(&report::marker("policy_bench_done", |o| {
        o.bool("ok", true);
    }));
    Ok(())
}

fn one_run(workload: &Workload, policy: &str, seed: u32, salt: u64) -> Result<(), String> {
    let before = status()?;
    let declined_before = before["policy"]["declined"].as_u64().unwrap_or(0);
    let mut args = vec!["rebalance", "--policy", policy, "--json"];
    if policy == "autonomous" {
        args.extend(["--period-ms", "1"]);
    }
    let switched: Value = serde_json::from_str(vmctl(&args)?.trim())
        .map_err(|e| format!("vmctl rebalance --json: {e}"))?;
    let since_us = switched["since_us"].as_u64().unwrap_or(0);
    let mut job_args: Vec<String> =
        vec!["exec".into(), PHASES.into(), "--cores".into(), "2".into()];
    job_args.extend(workload.job.split_ascii_whitespace().map(String::from));
    if workload.io {
        job_args.push(format!("io={IO_FILE}"));
    }
    let mut job = Command::new(VMCTL)
        .args(&job_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vmctl exec {PHASES}: {e}"))?;
    let mut linux = Vec::new();
    if workload.linux_tasks > 0 {
        let after = workload.linux_after_ms + jitter(seed, salt, workload.linux_jitter_ms);
        std::thread::sleep(Duration::from_millis(after));
        linux = spinners(workload.linux_tasks)?;
    }
    let mut stdout = String::new();
    if let Some(mut out) = job.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    let exit = job
        .wait()
        .map_err(|e| format!("waiting for vmctl exec: {e}"))?;
    for mut task in linux {
        let _ = task.kill();
        let _ = task.wait();
    }
    let after = status()?;
    let fields = summary(&stdout);
    report::emit(&report::marker("policy_bench_run", |o| {
        o.str("workload", workload.name)
            .str("policy", policy)
            .u64("seed", seed.into())
            .u64("since_us", since_us)
            .u64("end_us", after["published_us"].as_u64().unwrap_or(0))
            .i64("exit", exit.code().unwrap_or(-1).into())
            .u64(
                "declined",
                after["policy"]["declined"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(declined_before),
            );
        o.object("job", |j| {
            for (key, value) in &fields {
                j.u64(key, *value);
            }
        });
    }));
    if !exit.success() || fields.is_empty() {
        return Err(format!(
            "the {} job under {policy} failed ({exit}): {}",
            workload.name,
            stdout.trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_parsed_strictly() {
        let r = requested("console=ttyS0 tandem.selftest=policy-bench:2:step,hpc").unwrap();
        assert_eq!(r.seeds, 2);
        assert_eq!(
            r.workloads.iter().map(|w| w.name).collect::<Vec<_>>(),
            ["step", "hpc"]
        );
        assert!(requested("tandem.selftest=policy-bench:0:step").is_none());
        assert!(requested("tandem.selftest=policy-bench:1:nope").is_none());
        assert!(requested("tandem.selftest=policy-bench:1").is_none());
        assert!(requested("tandem.selftest=policies").is_none());
    }

    #[test]
    fn summary_fields_are_read() {
        let out = "hello\nphases: makespan_us=12 calls=3 call_p50_us=4 errors=0\n";
        assert_eq!(
            summary(out),
            [
                ("makespan_us".to_string(), 12),
                ("calls".to_string(), 3),
                ("call_p50_us".to_string(), 4),
                ("errors".to_string(), 0)
            ]
        );
    }

    #[test]
    fn jitter_stays_in_range_and_depends_on_the_seed() {
        assert!((1..50).all(|s| jitter(s, 1, 50) <= 50));
        assert_eq!(jitter(3, 0, 0), 0);
        assert_ne!(
            (1..10).map(|s| jitter(s, 0, 50)).collect::<Vec<_>>(),
            vec![jitter(1, 0, 50); 9]
        );
    }
}
