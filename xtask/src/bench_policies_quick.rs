//! `cargo xtask bench --only policies-quick`: the core-allocation policies on one boot, a load
//! step each way under `autonomous` and under `cooperative`.
//!
//! The boot is the policies scenario's (`tests/configs/policies.toml`, the agent's
//! `tandem.selftest=policies`: Lavender's primes worker started and killed with `vmctl exec
//! --detach` / `vmctl kill`, CPU loops in Linux, the policies switched with `vmctl
//! rebalance`); this part reads its `policy_phase` and `policy_use` markers. Reported, in the
//! hypervisor's TSC time (virtual under Bochs with `clock: sync=none`, so deterministic for the
//! emulator settings, not the host's speed):
//!
//! * reaction: load step -> the policy's decision to move the core, where the step is the
//!   later of the two guests' load reports that started their current requests (both guests
//!   report whatever the policy); for `autonomous` toward Lavender, from the switch instead
//!   (Lavender was busy before it);
//! * moves per 100 ms per movable core over each steady phase;
//! * granted-but-idle: the share of the movable core's time, while a guest a policy gave it to
//!   held it, that the guest left idle, over each steady phase and over all of them; and,
//!   apart, the same share over the whole run, which includes the `static` phase (the core
//!   idle in Linux, where the boot partition put it, not a policy) and the phase changes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::session::Outcome;

/// The boot and the phases (wall time; Linux's boot under Bochs is most of it).
const TIMEOUT: Duration = Duration::from_secs(2400);
/// The goals (issue 15), for the table.
const GOAL_REACTION_US: u64 = 1_000;
const GOAL_MOVES_PER_100MS: f64 = 1.0;
const GOAL_IDLE_PERCENT: f64 = 5.0;

pub struct PoliciesQuickResult {
    pub report: String,
    pub problems: Vec<String>,
    pub json: Value,
}

fn config() -> std::path::PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("configs")
        .join("policies.toml")
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn percent(idle: u64, owned: u64) -> Option<f64> {
    (owned > 0).then(|| idle as f64 * 100.0 / owned as f64)
}

pub fn run() -> Result<PoliciesQuickResult> {
    let config = config();
    println!(
        "==> bench policies-quick: {} under Bochs (Linux boots first: several minutes)",
        config.display()
    );
    let mut session = crate::bench::boot("policies-quick", &config, String::new())?;
    let logs = session.run_dir().path().to_path_buf();
    let interrupted = crate::bench::interrupted()?;
    let started = Instant::now();
    let mut last_said = Instant::now();
    let outcome = session.watch(
        |markers| {
            markers.iter().any(|m| {
                matches!(
                    m.ev(),
                    "policies_done" | "agent_error" | "guest_stopped" | "fatal"
                )
            })
        },
        Some(TIMEOUT),
        &interrupted,
        |_, _| {
            if last_said.elapsed() >= Duration::from_secs(60) {
                println!(
                    "    {:>4.0}s  still running",
                    started.elapsed().as_secs_f64()
                );
                last_said = Instant::now();
            }
        },
    )?;
    session.stop()?;
    let markers = session.markers();
    if outcome != Outcome::Satisfied || !markers.iter().any(|m| m.ev() == "policies_done") {
        bail!(
            "the policies run did not finish: {outcome} (logs in {})",
            logs.display()
        );
    }
    let problems = crate::bench::unexpected_markers(
        markers,
        &["fatal", "panic", "guest_stopped", "agent_error"],
    );
    let find = |ev: &str, name: &str| {
        markers
            .iter()
            .find(|m| m.ev() == ev && m.value["phase"] == name)
            .map(|m| m.value.clone())
    };
    let phase = |name: &str| {
        find("policy_phase", name)
            .with_context(|| format!("no policy_phase '{name}' (logs in {})", logs.display()))
    };

    let mut report = format!(
        "policies-quick: one boot of {}, hypervisor TSC time (virtual under Bochs, clock \
         sync=none)\n",
        config
            .strip_prefix(crate::workspace_root())
            .unwrap_or(&config)
            .display()
    );
    report.push_str(&format!(
        "{:<12} {:<26} {:>14} {:>12} {:>13}\n",
        "policy", "load step", "reaction(us)", "measured", "move(us)"
    ));
    let mut reactions = Vec::new();
    for (name, policy, step, from_switch) in [
        ("autonomous", "autonomous", "lavender busy (switch)", true),
        (
            "autonomous_back",
            "autonomous",
            "linux busy, lavender idle",
            false,
        ),
        (
            "cooperative",
            "cooperative",
            "lavender busy, linux idle",
            false,
        ),
        (
            "cooperative_back",
            "cooperative",
            "linux busy, lavender idle",
            false,
        ),
    ] {
        let p = phase(name)?;
        let reaction = if from_switch {
            num(&p["reaction_us"])
        } else {
            num(&p["after_step_us"])
        };
        report.push_str(&format!(
            "{policy:<12} {step:<26} {reaction:>14} {:>12} {:>13}\n",
            if from_switch {
                "from switch"
            } else {
                "from step"
            },
            num(&p["move_total_us"])
        ));
        reactions.push(json!({
            "phase": name, "policy": policy, "step": step,
            "reaction_us": reaction, "from_switch": from_switch,
            "to": p["owner"], "reason": p["reason"],
            "move_total_us": num(&p["move_total_us"]),
        }));
    }
    let step_reaction = |policy: &str| -> Vec<u64> {
        reactions
            .iter()
            .filter(|r| r["policy"] == policy && r["from_switch"] == false)
            .map(|r| num(&r["reaction_us"]))
            .collect()
    };
    let (coop, auto) = (step_reaction("cooperative"), step_reaction("autonomous"));
    let coop_worst = coop.iter().copied().max().unwrap_or(0);
    let auto_best = auto.iter().copied().min().unwrap_or(0);
    report.push_str(&format!(
        "cooperative reaction: worst {coop_worst} us (goal <= {GOAL_REACTION_US} us and at most \
         half of autonomous's, {auto_best} us from its step)\n\n"
    ));

    report.push_str(&format!(
        "{:<26} {:>10} {:>7} {:>16} {:>11}\n",
        "steady phase", "window(us)", "moves", "per 100ms/core", "idle(%)"
    ));
    let mut steady = Vec::new();
    let (mut steady_idle, mut steady_owned) = (0, 0);
    for name in [
        "autonomous_steady",
        "cooperative_steady_start",
        "cooperative_steady",
        "cooperative_lavender_idle",
    ] {
        let end = phase(name)?;
        let start = find("policy_use", name)
            .with_context(|| format!("no policy_use '{name}' (logs in {})", logs.display()))?;
        let window = num(&end["end_us"]).saturating_sub(num(&start["at_us"]));
        let moves = num(&end["moves_during"]);
        // One movable core (the one Linux holds besides its boot core).
        let rate = moves as f64 * 100_000.0 / window.max(1) as f64;
        let (idle_us, owned_us) = (
            num(&end["core_idle_us"]).saturating_sub(num(&start["core_idle_us"])),
            num(&end["core_owned_us"]).saturating_sub(num(&start["core_owned_us"])),
        );
        steady_idle += idle_us;
        steady_owned += owned_us;
        let idle = percent(idle_us, owned_us);
        report.push_str(&format!(
            "{name:<26} {window:>10} {moves:>7} {rate:>16.2} {:>11}\n",
            idle.map_or("-".into(), |p| format!("{p:.1}"))
        ));
        steady.push(json!({
            "phase": name, "owner": end["owner"], "window_us": window, "moves": moves,
            "moves_per_100ms_per_core": rate, "granted_idle_percent": idle,
        }));
    }
    let last = phase("cooperative_lavender_idle")?;
    let granted = percent(steady_idle, steady_owned);
    let overall = percent(num(&last["core_idle_us"]), num(&last["core_owned_us"]));
    let shown = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.1}%"));
    report.push_str(&format!(
        "goals: <= {GOAL_MOVES_PER_100MS} move per 100 ms per core under steady load; \
         granted-but-idle <= {GOAL_IDLE_PERCENT}%: {} over the steady phases (the whole run, \
         with the static phase's idle Linux and the phase changes: {})\n",
        shown(granted),
        shown(overall)
    ));
    Ok(PoliciesQuickResult {
        report,
        problems,
        json: json!({
            "clock": {"source": "hypervisor_tsc", "virtual": true},
            "config": config,
            "reactions": reactions,
            "cooperative_worst_reaction_us": coop_worst,
            "autonomous_best_step_reaction_us": auto_best,
            "steady": steady,
            "granted_idle_percent_steady": granted,
            "movable_core_idle_percent_whole_run": overall,
            "wall_seconds": started.elapsed().as_secs(),
            "run_dir": logs,
        }),
    })
}
