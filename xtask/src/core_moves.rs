//! The core-move test's figures, from its markers: shared by `cargo xtask bench` (which
//! reports them) and the end-to-end scenario `bochs_lavender_cores_move_under_load` (which
//! checks the outcomes they imply and prints them).
//!
//! The hypervisor's `core_test_done` carries its own summaries (count, median, worst of the
//! bring-up, the release and each stage) and `grants_posted`, the TSC at which it posted each
//! grant. Lavender prints `lavender_core_online` for each core it brought up, with the TSC of
//! the core scheduler's first pass (`first_pass_tsc`), and `lavender_core_released` for each
//! core it handed back. Both sides read the same TSC, so a grant and the first pass on its
//! core subtract to the whole bring-up: grant posted to first thread running on the core.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::marker::Marker;

/// The partition configuration of the core-move run: Lavender alone, with its parallel
/// worker, allowed cores 1 to 3 (`tests/configs/<CONFIG>.toml`).
pub const CONFIG: &str = "lavender-cores";
/// The seeded schedule the e2e scenario runs and the bench runs by default.
pub const DEFAULT_SEED: u64 = 42;
pub const DEFAULT_CYCLES: u32 = 60;

/// Markers that mean the run went wrong, whatever the figures say.
pub const BAD_EVENTS: [&str; 4] = ["fatal", "panic", "guest_stopped", "isolation_violation"];

/// `tests/configs/lavender-cores.toml`.
pub fn config_path() -> PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("configs")
        .join(format!("{CONFIG}.toml"))
}

/// The hypervisor option that runs the core-move test.
pub fn core_test_option(seed: u64, cycles: u32) -> String {
    format!("core_test={seed}:{cycles}")
}

/// The hypervisor command line of a core-move run: the core test, and the guests' load
/// reports printed as `load_report` markers (off by default) for the scenario to check.
pub fn hv_cmdline(seed: u64, cycles: u32) -> String {
    format!(
        "log=info load_markers=on {}",
        core_test_option(seed, cycles)
    )
}

/// Whether a core-move run is over: the core test is done, the worker has exited, and a
/// load report after its exit says Lavender has nothing left to run. The load report is
/// Lavender's own marker of the report it sent: Lavender's console lines keep their order,
/// while the hypervisor's lines interleave with them late. By then every deferred
/// `lavender_core_online` / `lavender_core_released` marker has been printed.
pub fn finished(markers: &[Marker]) -> bool {
    let idle_load = |m: &Marker| m.ev() == "lavender_load" && m.value["runnable"] == 0;
    let exited = markers.iter().position(|m| m.ev() == "process_exit");
    markers.iter().any(|m| m.ev() == "core_test_done")
        && exited.is_some_and(|at| markers[at..].iter().any(idle_load))
}

/// Count, median, 90th percentile and worst of a set of samples (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub count: usize,
    /// The upper median of an even count, as the hypervisor's summaries use.
    pub median: u64,
    /// Nearest rank: the smallest sample at or above 90 % of them. `None` for the
    /// hypervisor's own summaries, which carry no percentile.
    pub p90: Option<u64>,
    pub worst: u64,
}

impl Stats {
    /// `None` for no samples.
    pub fn of(mut samples: Vec<u64>) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        Some(Stats {
            count: n,
            median: samples[n / 2],
            p90: Some(samples[(n * 9).div_ceil(10) - 1]),
            worst: samples[n - 1],
        })
    }

    /// A `{count, median, worst}` summary from `core_test_done`; `None` when it has no
    /// samples (the hypervisor prints zeros then).
    fn from_summary(summary: &Value) -> Result<Option<Stats>> {
        let field = |name: &str| {
            summary[name]
                .as_u64()
                .with_context(|| format!("summary without a number {name:?}: {summary}"))
        };
        let count = field("count")? as usize;
        Ok((count > 0).then_some(Stats {
            count,
            median: field("median")?,
            p90: None,
            worst: field("worst")?,
        }))
    }

    fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "median": self.median,
            "p90": self.p90,
            "worst": self.worst,
        })
    }
}

/// Where a measure's samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The hypervisor's summary in `core_test_done`.
    Hypervisor,
    /// One sample per Lavender marker.
    Lavender,
    /// A hypervisor grant paired with Lavender's first pass on the core.
    Paired,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Hypervisor => "hypervisor",
            Source::Lavender => "lavender",
            Source::Paired => "paired",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    /// Stable name for the saved results.
    pub key: &'static str,
    /// What is timed, from which event to which.
    pub label: &'static str,
    pub source: Source,
    /// `None` when there were no samples.
    pub stats: Option<Stats>,
}

/// A grant the hypervisor posted, and Lavender's first scheduler pass on that core after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub core: u64,
    /// TSC when the hypervisor posted the grant.
    pub tsc: u64,
    pub online: Option<Online>,
}

/// What a grant paired with.
#[derive(Debug, Clone, PartialEq)]
pub struct Online {
    /// Index into the run's `lavender_core_online` markers, in console order.
    pub marker: usize,
    /// Whether a thread ran on that first pass (else the core found nothing to run).
    pub thread: bool,
    /// Grant posted -> first pass, µs of TSC time.
    pub us: u64,
}

/// Everything the report and the checks need from one core-move run.
#[derive(Debug, Clone)]
pub struct CoreMoves {
    /// The `core_test_done` marker as printed.
    pub done: Value,
    pub tsc_hz: u64,
    pub moves: u64,
    pub grants_count: u64,
    pub revokes: u64,
    pub forced_releases: u64,
    pub grant_timeouts: u64,
    /// Every posted grant in order, paired or not.
    pub grants: Vec<Grant>,
    /// How many `lavender_core_online` / `lavender_core_released` markers there were.
    pub online_markers: usize,
    pub released_markers: usize,
    /// `lavender_core_online` markers (indices, console order) that no grant claimed.
    pub unclaimed_online: Vec<usize>,
    pub measures: Vec<Measure>,
}

impl CoreMoves {
    /// Reads the run's markers. Fails when `core_test_done` is missing, repeated or lacks a
    /// field, or a Lavender marker lacks one: those are broken runs, not figures.
    pub fn from_markers(markers: &[Marker]) -> Result<CoreMoves> {
        let events = |ev: &str| -> Vec<&Value> {
            markers
                .iter()
                .filter(|m| m.ev() == ev)
                .map(|m| &m.value)
                .collect()
        };
        let done = match events("core_test_done").as_slice() {
            [one] => (*one).clone(),
            others => bail!("expected one core_test_done marker, saw {}", others.len()),
        };
        let number = |value: &Value, name: &str| {
            value[name]
                .as_u64()
                .with_context(|| format!("no number {name:?} in {value}"))
        };
        let tsc_hz = number(&done, "tsc_hz")?;
        if tsc_hz == 0 {
            bail!("core_test_done gives a TSC of 0 Hz: {done}");
        }
        let us = |ticks: u64| (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz)) as u64;

        let posted = done["grants_posted"]
            .as_array()
            .with_context(|| format!("no grants_posted array in {done}"))?;
        let mut grants = posted
            .iter()
            .map(|g| {
                Ok(Grant {
                    core: number(g, "core")?,
                    tsc: number(g, "tsc")?,
                    online: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let online = events("lavender_core_online");
        let first_passes = online
            .iter()
            .map(|m| {
                let thread = m["thread"]
                    .as_bool()
                    .with_context(|| format!("no bool \"thread\" in {m}"))?;
                Ok((number(m, "core")?, number(m, "first_pass_tsc")?, thread))
            })
            .collect::<Result<Vec<_>>>()?;
        // Each grant takes the earliest first pass on its core after it and before the next
        // grant of that core: a grant that never came online (it timed out) then stays
        // unpaired instead of taking the next grant's first pass.
        let mut claimed = vec![false; first_passes.len()];
        for i in 0..grants.len() {
            let (core, tsc) = (grants[i].core, grants[i].tsc);
            let next_grant = grants[i + 1..]
                .iter()
                .find(|g| g.core == core)
                .map(|g| g.tsc);
            let pick = first_passes
                .iter()
                .enumerate()
                .filter(|&(j, &(c, at, _))| {
                    !claimed[j] && c == core && at > tsc && next_grant.is_none_or(|n| at < n)
                })
                .min_by_key(|&(_, &(_, at, _))| at);
            if let Some((j, &(_, at, thread))) = pick {
                claimed[j] = true;
                grants[i].online = Some(Online {
                    marker: j,
                    thread,
                    us: us(at - tsc),
                });
            }
        }
        let unclaimed_online = (0..claimed.len()).filter(|&j| !claimed[j]).collect();

        let released = events("lavender_core_released");
        let mut measures = Vec::new();
        let paired = |thread: bool| {
            Stats::of(
                grants
                    .iter()
                    .filter_map(|g| g.online.as_ref())
                    .filter(|o| o.thread == thread)
                    .map(|o| o.us)
                    .collect(),
            )
        };
        measures.push(Measure {
            key: "grant_to_first_thread",
            label: "grant posted -> first thread running on the core",
            source: Source::Paired,
            stats: paired(true),
        });
        measures.push(Measure {
            key: "grant_to_idle_first_pass",
            label: "grant posted -> first pass, no thread ready",
            source: Source::Paired,
            stats: paired(false),
        });
        let hypervisor = |summary: &Value| Stats::from_summary(summary);
        let stage = |name: &str| hypervisor(&done["stages_us"][name]);
        add(
            &mut measures,
            Source::Hypervisor,
            [
                (
                    "hv_bringup",
                    "grant posted -> vCPU entered",
                    hypervisor(&done["bringup_us"])?,
                ),
                (
                    "hv_grant_to_startup",
                    "  grant posted -> STARTUP IPI handled",
                    stage("grant_to_startup")?,
                ),
                (
                    "hv_startup_to_woken",
                    "  STARTUP IPI handled -> core woken",
                    stage("startup_to_woken")?,
                ),
                (
                    "hv_woken_to_entry",
                    "  core woken -> vCPU entered",
                    stage("woken_to_entry")?,
                ),
            ],
        );
        let lavender = |markers: &[&Value], field: &str| -> Result<Option<Stats>> {
            let samples = markers
                .iter()
                .map(|m| number(m, field))
                .collect::<Result<Vec<_>>>()?;
            Ok(Stats::of(samples))
        };
        add(
            &mut measures,
            Source::Lavender,
            [
                (
                    "lavender_prepare",
                    "grant handled -> STARTUP IPI sent",
                    lavender(&online, "prepare_us")?,
                ),
                (
                    "lavender_checkin",
                    "grant handled -> core checked in",
                    lavender(&online, "checkin_us")?,
                ),
                (
                    "lavender_bringup",
                    "grant handled -> first pass on the core",
                    lavender(&online, "bringup_us")?,
                ),
            ],
        );
        add(
            &mut measures,
            Source::Hypervisor,
            [
                (
                    "hv_release",
                    "revoke posted -> core parked",
                    hypervisor(&done["release_us"])?,
                ),
                (
                    "hv_revoke_to_release_call",
                    "  revoke posted -> CORE_RELEASE handled",
                    stage("revoke_to_release_call")?,
                ),
                (
                    "hv_release_call_to_parked",
                    "  CORE_RELEASE handled -> core parked",
                    stage("release_call_to_parked")?,
                ),
            ],
        );
        add(
            &mut measures,
            Source::Lavender,
            [
                (
                    "lavender_leave",
                    "revoke handled -> core leaving",
                    lavender(&released, "leave_us")?,
                ),
                (
                    "lavender_release",
                    "revoke handled -> release hypercall",
                    lavender(&released, "release_us")?,
                ),
            ],
        );

        Ok(CoreMoves {
            tsc_hz,
            moves: number(&done, "moves")?,
            grants_count: number(&done, "grants")?,
            revokes: number(&done, "revokes")?,
            forced_releases: number(&done, "forced_releases")?,
            grant_timeouts: number(&done, "grant_timeouts")?,
            grants,
            online_markers: online.len(),
            released_markers: released.len(),
            unclaimed_online,
            measures,
            done,
        })
    }

    /// Grants that no `lavender_core_online` marker answered.
    pub fn unpaired_grants(&self) -> Vec<&Grant> {
        self.grants.iter().filter(|g| g.online.is_none()).collect()
    }

    /// The measure named `key`.
    pub fn measure(&self, key: &str) -> Option<&Measure> {
        self.measures.iter().find(|m| m.key == key)
    }

    /// What is wrong with the run's outcome (empty when nothing): the counts add up, every
    /// grant that did not time out came online on its core, and every core Lavender brought
    /// up answers a grant. Timings are never judged here.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.grants_count + self.revokes != self.moves {
            problems.push(format!(
                "{} grants + {} revokes != {} moves",
                self.grants_count, self.revokes, self.moves
            ));
        }
        if self.grants.len() as u64 != self.grants_count {
            problems.push(format!(
                "grants_posted lists {} grants, the hypervisor counted {}",
                self.grants.len(),
                self.grants_count
            ));
        }
        let unpaired = self.unpaired_grants();
        if unpaired.len() as u64 > self.grant_timeouts {
            let list: Vec<String> = unpaired
                .iter()
                .map(|g| format!("core {} at TSC {}", g.core, g.tsc))
                .collect();
            problems.push(format!(
                "{} grants never came online (lavender_core_online) but only {} timed out: {}",
                unpaired.len(),
                self.grant_timeouts,
                list.join(", ")
            ));
        }
        if !self.unclaimed_online.is_empty() {
            problems.push(format!(
                "lavender_core_online markers {:?} (console order) answer no grant",
                self.unclaimed_online
            ));
        }
        let count = |key| {
            self.measure(key)
                .and_then(|m| m.stats)
                .map_or(0, |s| s.count as u64)
        };
        if count("hv_bringup") + self.grant_timeouts != self.grants_count {
            problems.push(format!(
                "{} bring-ups + {} grant timeouts != {} grants",
                count("hv_bringup"),
                self.grant_timeouts,
                self.grants_count
            ));
        }
        if count("hv_release") != self.revokes {
            problems.push(format!(
                "{} releases timed != {} revokes",
                count("hv_release"),
                self.revokes
            ));
        }
        if self.released_markers as u64 > self.revokes {
            problems.push(format!(
                "{} lavender_core_released markers for {} revokes",
                self.released_markers, self.revokes
            ));
        }
        problems
    }

    /// One line of counts, then the table: each measure's count, median, p90 and worst, in
    /// µs of TSC time.
    pub fn table(&self) -> String {
        let paired = self.grants.len() - self.unpaired_grants().len();
        let mut out = format!(
            "{} moves: {} grants ({} paired with lavender_core_online, {} timed out), {} revokes \
             ({} forced)\n",
            self.moves,
            self.grants_count,
            paired,
            self.grant_timeouts,
            self.revokes,
            self.forced_releases
        );
        let _ = writeln!(
            out,
            "{:<50} {:<10} {:>5} {:>7} {:>7} {:>7}",
            "measure (us of TSC time)", "source", "count", "median", "p90", "worst"
        );
        for m in &self.measures {
            let cell = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            let s = m.stats;
            let _ = writeln!(
                out,
                "{:<50} {:<10} {:>5} {:>7} {:>7} {:>7}",
                m.label,
                m.source.name(),
                s.map_or(0, |s| s.count),
                cell(s.map(|s| s.median)),
                cell(s.and_then(|s| s.p90)),
                cell(s.map(|s| s.worst)),
            );
        }
        out
    }

    /// The figures for the saved results.
    pub fn to_json(&self) -> Value {
        let measures: Vec<Value> = self
            .measures
            .iter()
            .map(|m| {
                json!({
                    "key": m.key,
                    "label": m.label.trim(),
                    "source": m.source.name(),
                    "stats_us": m.stats.map(Stats::to_json),
                })
            })
            .collect();
        let grants: Vec<Value> = self
            .grants
            .iter()
            .map(|g| {
                json!({
                    "core": g.core,
                    "tsc": g.tsc,
                    "first_pass_us": g.online.as_ref().map(|o| o.us),
                    "thread": g.online.as_ref().map(|o| o.thread),
                })
            })
            .collect();
        json!({
            "tsc_hz": self.tsc_hz,
            "moves": self.moves,
            "grants": self.grants_count,
            "revokes": self.revokes,
            "forced_releases": self.forced_releases,
            "grant_timeouts": self.grant_timeouts,
            "grants_unpaired": self.unpaired_grants().len(),
            "online_markers": self.online_markers,
            "released_markers": self.released_markers,
            "online_markers_unclaimed": self.unclaimed_online.len(),
            "measures": measures,
            "grant_pairs": grants,
            "core_test_done": self.done,
        })
    }
}

/// Appends one row per `(key, label, stats)` of `rows`, all from `source`.
fn add<const N: usize>(
    measures: &mut Vec<Measure>,
    source: Source,
    rows: [(&'static str, &'static str, Option<Stats>); N],
) {
    measures.extend(rows.map(|(key, label, stats)| Measure {
        key,
        label,
        source,
        stats,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::Port;

    fn markers(values: Vec<Value>) -> Vec<Marker> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, value)| Marker {
                port: Port::Com2,
                line: i + 1,
                value,
            })
            .collect()
    }

    fn summary(count: u64, median: u64, worst: u64) -> Value {
        json!({"count": count, "median": median, "worst": worst})
    }

    /// A `core_test_done` at 1 MHz (one tick per µs) with these grants and `revokes`
    /// revokes; every grant came up unless `timeouts` say otherwise.
    fn done(grants: &[(u64, u64)], revokes: u64, timeouts: u64) -> Value {
        let n = grants.len() as u64;
        let posted: Vec<Value> = grants
            .iter()
            .map(|&(core, tsc)| json!({"core": core, "tsc": tsc}))
            .collect();
        let stage = summary(n - timeouts, 5, 9);
        json!({
            "ev": "core_test_done", "guest": "lavender", "moves": n + revokes, "grants": n,
            "revokes": revokes, "forced_releases": 0, "grant_timeouts": timeouts,
            "clock": "tsc", "tsc_hz": 1_000_000,
            "bringup_us": summary(n - timeouts, 24, 30),
            "release_us": summary(revokes, 28, 40),
            "startup_ipi_to_entry_us": stage,
            "stages_us": {
                "grant_to_startup": stage, "startup_to_woken": stage, "woken_to_entry": stage,
                "revoke_to_release_call": summary(revokes, 20, 30),
                "release_call_to_parked": summary(revokes, 8, 10),
            },
            "grants_posted": posted,
        })
    }

    fn online(core: u64, first_pass_tsc: u64, thread: bool) -> Value {
        json!({
            "ev": "lavender_core_online", "core": core, "slot": 1, "prepare_us": 3,
            "checkin_us": 15, "bringup_us": 20, "thread": thread,
            "first_pass_tsc": first_pass_tsc,
        })
    }

    fn released(core: u64) -> Value {
        json!({"ev": "lavender_core_released", "core": core, "slot": 1, "leave_us": 4,
               "release_us": 6, "migrated": 1})
    }

    #[test]
    fn stats_median_p90_worst() {
        assert_eq!(Stats::of(vec![]), None);
        assert_eq!(
            Stats::of(vec![7]),
            Some(Stats {
                count: 1,
                median: 7,
                p90: Some(7),
                worst: 7
            })
        );
        // 1..=10 shuffled: upper median 6, nearest-rank p90 the 9th value.
        let s = Stats::of(vec![4, 10, 1, 7, 3, 9, 2, 8, 6, 5]).unwrap();
        assert_eq!((s.count, s.median, s.p90, s.worst), (10, 6, Some(9), 10));
        // 1..=20: p90 is the 18th value.
        let s = Stats::of((1..=20).rev().collect()).unwrap();
        assert_eq!((s.median, s.p90, s.worst), (11, Some(18), 20));
        // 1..=11: p90 rank ceil(9.9) = 10.
        assert_eq!(Stats::of((1..=11).collect()).unwrap().p90, Some(10));
    }

    #[test]
    fn each_grant_pairs_with_the_first_pass_on_its_core_after_it() {
        let run = markers(vec![
            // Online markers arrive late and out of order (deferred printing); a core-3
            // marker sits between core 2's grant and its own.
            online(3, 2_060, true),
            online(2, 1_044, true),
            online(2, 3_050, false),
            done(&[(2, 1_000), (3, 2_000), (2, 3_000)], 2, 0),
            released(2),
            released(3),
        ]);
        let moves = CoreMoves::from_markers(&run).unwrap();
        let paired: Vec<_> = moves
            .grants
            .iter()
            .map(|g| g.online.clone().map(|o| (o.marker, o.us, o.thread)))
            .collect();
        assert_eq!(
            paired,
            vec![
                Some((1, 44, true)),
                Some((0, 60, true)),
                Some((2, 50, false))
            ]
        );
        assert!(moves.problems().is_empty(), "{:?}", moves.problems());
        let thread = moves
            .measure("grant_to_first_thread")
            .unwrap()
            .stats
            .unwrap();
        assert_eq!((thread.count, thread.median, thread.worst), (2, 60, 60));
        let idle = moves.measure("grant_to_idle_first_pass").unwrap();
        assert_eq!(idle.stats.unwrap().count, 1);
        let hv = moves.measure("hv_bringup").unwrap().stats.unwrap();
        assert_eq!((hv.count, hv.median, hv.p90, hv.worst), (3, 24, None, 30));
        assert_eq!(
            moves
                .measure("lavender_leave")
                .unwrap()
                .stats
                .unwrap()
                .count,
            2
        );
    }

    #[test]
    fn a_first_pass_before_the_grant_or_after_the_next_grant_is_not_taken() {
        let run = markers(vec![
            // Before the first grant: belongs to no grant.
            online(2, 900, true),
            // After the second grant of core 2: that grant's, not the first's.
            online(2, 5_030, true),
            done(&[(2, 1_000), (2, 5_000)], 1, 1),
        ]);
        let moves = CoreMoves::from_markers(&run).unwrap();
        assert_eq!(moves.grants[0].online, None);
        assert_eq!(moves.grants[1].online.as_ref().map(|o| o.marker), Some(1));
        assert_eq!(moves.unclaimed_online, vec![0]);
        let problems = moves.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("answer no grant"), "{problems:?}");
    }

    #[test]
    fn a_grant_without_an_online_marker_is_reported() {
        let run = markers(vec![
            online(2, 1_040, true),
            // Core 3's grant never came online, and the hypervisor saw no timeout.
            done(&[(2, 1_000), (3, 2_000)], 0, 0),
        ]);
        let moves = CoreMoves::from_markers(&run).unwrap();
        let unpaired = moves.unpaired_grants();
        assert_eq!(unpaired.len(), 1);
        assert_eq!((unpaired[0].core, unpaired[0].tsc), (3, 2_000));
        let problems = moves.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("1 grants never came online")
                    && p.contains("core 3 at TSC 2000")),
            "{problems:?}"
        );
        assert!(moves.table().contains("1 paired"), "{}", moves.table());
        assert_eq!(moves.to_json()["grants_unpaired"], 1);
    }

    #[test]
    fn a_timed_out_grant_may_stay_unpaired() {
        let run = markers(vec![
            online(2, 1_040, true),
            done(&[(2, 1_000), (3, 2_000)], 0, 1),
        ]);
        let moves = CoreMoves::from_markers(&run).unwrap();
        assert_eq!(moves.unpaired_grants().len(), 1);
        assert!(moves.problems().is_empty(), "{:?}", moves.problems());
    }

    #[test]
    fn counts_that_do_not_add_up_are_problems() {
        let mut bad = done(&[(2, 1_000)], 1, 0);
        bad["moves"] = json!(4);
        bad["grants"] = json!(2);
        let run = markers(vec![online(2, 1_040, true), bad, released(2), released(2)]);
        let problems = CoreMoves::from_markers(&run).unwrap().problems();
        for expected in [
            "2 grants + 1 revokes != 4 moves",
            "grants_posted lists 1 grants, the hypervisor counted 2",
            "1 bring-ups + 0 grant timeouts != 2 grants",
            "2 lavender_core_released markers for 1 revokes",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "missing {expected:?} in {problems:?}"
            );
        }
    }

    #[test]
    fn broken_markers_are_errors() {
        let err = |run: Vec<Value>| {
            CoreMoves::from_markers(&markers(run))
                .unwrap_err()
                .to_string()
        };
        assert!(err(vec![online(2, 5, true)]).contains("saw 0"));
        let mut no_first_pass = online(2, 1_040, true);
        no_first_pass
            .as_object_mut()
            .unwrap()
            .remove("first_pass_tsc");
        assert!(err(vec![no_first_pass, done(&[(2, 1_000)], 0, 0)]).contains("first_pass_tsc"));
        let mut zero_hz = done(&[], 0, 0);
        zero_hz["tsc_hz"] = json!(0);
        assert!(err(vec![zero_hz]).contains("0 Hz"));
    }

    #[test]
    fn ticks_become_microseconds_at_the_reported_frequency() {
        let mut at_50mhz = done(&[(2, 50_000_000)], 0, 0);
        at_50mhz["tsc_hz"] = json!(50_000_000);
        // 2_200 ticks at 50 MHz: 44 µs.
        let run = markers(vec![online(2, 50_002_200, true), at_50mhz]);
        let moves = CoreMoves::from_markers(&run).unwrap();
        assert_eq!(moves.grants[0].online.as_ref().unwrap().us, 44);
    }

    #[test]
    fn finished_needs_the_test_done_and_idle_after_the_exit() {
        let ev = |ev: &str, runnable: u64| json!({"ev": ev, "runnable": runnable});
        let idle_before_exit = markers(vec![
            ev("lavender_load", 0),
            ev("core_test_done", 0),
            ev("process_exit", 0),
        ]);
        assert!(!finished(&idle_before_exit));
        let busy_after_exit = markers(vec![
            ev("core_test_done", 0),
            ev("process_exit", 0),
            ev("lavender_load", 3),
        ]);
        assert!(!finished(&busy_after_exit));
        let over = markers(vec![
            ev("process_exit", 0),
            ev("lavender_load", 0),
            ev("core_test_done", 0),
        ]);
        assert!(finished(&over));
    }

    #[test]
    fn table_has_every_measure_and_dashes_for_none() {
        let run = markers(vec![online(2, 1_040, true), done(&[(2, 1_000)], 0, 0)]);
        let table = CoreMoves::from_markers(&run).unwrap().table();
        assert!(table.starts_with("1 moves: 1 grants (1 paired"), "{table}");
        let row = |label: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no row {label:?} in\n{table}"))
                .split_whitespace()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("grant posted -> first thread"),
            vec!["40", "40", "40", "1"]
        );
        assert_eq!(
            row("grant posted -> vCPU entered"),
            vec!["30", "-", "24", "1"]
        );
        assert_eq!(
            row("revoke posted -> core parked"),
            vec!["-", "-", "-", "0"]
        );
    }
}
