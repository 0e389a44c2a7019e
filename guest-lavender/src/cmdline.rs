//! Lavender's command line, from the boot-info page: space-separated `key=value` words.
//!
//! | word                  | meaning                                                        |
//! |-----------------------|----------------------------------------------------------------|
//! | `log=LEVEL`           | `off`, `error`, `warn`, `info` (default), `debug`, `trace`     |
//! | `test=isolation`      | run the isolation attacks below after boot                     |
//! | `test=user`           | run the `hostile` user program (bad system calls, then a read  |
//! |                       | of kernel memory, which kills it) before the workload          |
//! | `test=leave_traces`   | leave secrets and a blocked, armed APIC on the boot core, then   |
//! |                       | release it (the hypervisor must scrub it before anyone else)   |
//! | `test=inherit`        | report what each started core holds on arrival (a scrubbed core |
//! |                       | holds nothing of its last guest)                               |
//! | `read=ADDR`           | attack: read 8 bytes at guest-physical `ADDR`                  |
//! | `write=ADDR`          | attack: write 8 bytes at guest-physical `ADDR`                 |
//! | `ipi=APIC_ID`         | attack: send a fixed IPI to x2APIC ID `APIC_ID`                |
//! | `ioapic=APIC_ID`      | attack (needs the IOAPIC): aim redirection entries at x2APIC   |
//! |                       | ID `APIC_ID`, at the hypervisor's cores and at its vectors     |
//! | `workload=primes`     | run the `primes` user program from boot (`idle`: the `idle` one) |
//! | `threads=N`           | primes worker threads, 1..=64 (default 8)                      |
//! | `limit=N`             | count the primes below `N`, at most 10^8 (default 200000)      |
//! | `rounds=N`            | run the worker `N` times, 1..=10000 (default 1)                |
//! | `tsc_khz=N`           | the TSC frequency in kHz, overriding CPUID (like Linux's       |
//! |                       | `tsc_early_khz=`): for platforms whose CPUID leaves are wrong  |
//! | `load_markers=on`     | also print each significant load report as a `lavender_load`   |
//! |                       | marker (`off`, the default: reports go only to the hypervisor, |
//! |                       | over the control channel)                                      |
//! | `ignore_revoke=CORE`  | fault test: core `CORE` (1..=63) never makes its release call |
//! |                       | when revoked: it leaves the scheduler, then spins with         |
//! |                       | interrupts off until the hypervisor takes it by force          |
//! | `fault=KIND`          | fault test, `fault_after_ms` after the scheduler starts:       |
//! |                       | `triple_fault` (the first core to see it triple-faults),       |
//! |                       | `panic` (the first core to see it panics, and the panic handler|
//! |                       | reports it to the hypervisor) or `hang` (every core spins with |
//! |                       | interrupts off)                                                |
//! | `fault_after_ms=N`    | when `fault=` strikes, 1..=600000 (default 1000)               |
//!
//! Numbers are decimal or `0x` hexadecimal. The parser never fails: a word it cannot use is
//! reported through a callback and ignored, so a typo costs one attack, not the boot.

use core::fmt;

use log::LevelFilter;

/// Highest guest-physical address an attack may name, exclusive: 2^47. Lavender reaches memory
/// through an identity map, so the address must also be a virtual address, and with 4-level
/// paging the canonical lower half ends at 2^47 (Intel SDM Vol. 1 §3.3.7.1).
pub const IDENTITY_MAP_LIMIT: u64 = 1 << 47;

/// The isolation attacks requested by `test=isolation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IsolationPlan {
    pub read: Option<u64>,
    pub write: Option<u64>,
    pub ipi: Option<u32>,
    /// The x2APIC ID of another partition's core, for the IOAPIC attacks.
    pub ioapic: Option<u32>,
}

impl IsolationPlan {
    /// How many attacks the plan performs.
    pub fn attack_count(&self) -> usize {
        usize::from(self.read.is_some())
            + usize::from(self.write.is_some())
            + usize::from(self.ipi.is_some())
            + usize::from(self.ioapic.is_some())
    }
}

/// The parallel primes worker (`workload=primes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimesPlan {
    pub threads: u32,
    pub limit: u64,
    pub rounds: u32,
}

impl Default for PrimesPlan {
    fn default() -> Self {
        Self {
            threads: 8,
            limit: 200_000,
            rounds: 1,
        }
    }
}

/// Most worker threads `threads=` accepts.
pub const MAX_WORKER_THREADS: u64 = 64;
/// Largest `tsc_khz=`: 100 GHz.
pub const MAX_TSC_KHZ: u64 = 100_000_000;
/// Largest `limit=`: what the primes program's independent sieve checks
/// (`lavender_user::primes::SIEVE_LIMIT`; a unit test keeps the two equal).
pub const MAX_PRIMES_LIMIT: u64 = 100_000_000;
/// Most `rounds=`.
pub const MAX_ROUNDS: u64 = 10_000;
/// Highest core `ignore_revoke=` names (core indices are below 64; core 0, the boot processor, is never one of Lavender's revocable cores in the fault tests).
pub const MAX_CORE_INDEX: u64 = 63;
/// Latest `fault_after_ms=`: 10 minutes.
pub const MAX_FAULT_AFTER_MS: u64 = 600_000;

/// A fault Lavender causes on purpose, to test that the hypervisor contains it (`fault=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A triple fault: the first core to reach the fault's time loads an empty IDT and raises
    /// an exception, which can be delivered nowhere (a crash the hypervisor sees as a VM exit).
    TripleFault,
    /// Every core spins with interrupts off at its next timer tick: a hang no exit reveals.
    Hang,
    /// The first core to reach the fault's time panics: a kernel bug as Lavender meets it,
    /// reported by its panic handler (`PANIC`).
    Panic,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TripleFault => "triple_fault",
            Self::Hang => "hang",
            Self::Panic => "panic",
        }
    }
}

/// `fault=KIND` with `fault_after_ms=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    pub after_ms: u64,
}

/// `fault_after_ms=` when the command line names none.
pub const DEFAULT_FAULT_AFTER_MS: u64 = 1_000;

/// What the command line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub log_level: LevelFilter,
    /// `Some` when `test=isolation` is present (possibly with no attack words at all).
    pub isolation: Option<IsolationPlan>,
    /// `Some` when `workload=primes` is present.
    pub primes: Option<PrimesPlan>,
    /// `workload=idle`: run the idle program.
    pub idle: bool,
    /// `test=user`: run the hostile program.
    pub user_test: bool,
    /// `test=leave_traces`: poison the boot core, then give it back.
    pub leave_traces: bool,
    /// `test=inherit`: report the state each started core arrives with.
    pub check_inherited: bool,
    /// `tsc_khz=`: the TSC frequency, when CPUID must not be trusted.
    pub tsc_khz: Option<u64>,
    /// `load_markers=on`: load reports are also printed (`lavender_load`), for tests and
    /// benchmarks that read them from the console.
    pub load_markers: bool,
    /// `ignore_revoke=CORE`: the core that withholds its release when revoked.
    pub ignore_revoke: Option<u32>,
    /// `fault=`: the fault to cause, and when.
    pub fault: Option<FaultPlan>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            isolation: None,
            primes: None,
            idle: false,
            user_test: false,
            leave_traces: false,
            check_inherited: false,
            tsc_khz: None,
            load_markers: false,
            ignore_revoke: None,
            fault: None,
        }
    }
}

/// A word of the command line that was ignored, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem<'a> {
    pub word: &'a str,
    pub reason: Reason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not `key=value`, or a key Lavender does not know.
    UnknownWord,
    /// The key appeared before; the first value is kept.
    Duplicate,
    /// The value is not a number, or out of range for the key.
    BadValue,
    /// `test=` names no test Lavender has.
    UnknownTest,
    /// An attack word without `test=isolation`.
    AttackWithoutTest,
    /// `workload=` names no workload Lavender has.
    UnknownWorkload,
    /// A worker word without `workload=primes`.
    WorkerWithoutWorkload,
    /// `fault=` names no fault Lavender can cause.
    UnknownFault,
    /// `fault_after_ms=` without `fault=`.
    FaultWordWithoutFault,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownWord => "unknown word",
            Self::Duplicate => "duplicate key, the first one counts",
            Self::BadValue => "bad value",
            Self::UnknownTest => "unknown test",
            Self::AttackWithoutTest => "attack words need test=isolation",
            Self::UnknownWorkload => "unknown workload",
            Self::WorkerWithoutWorkload => "worker words need workload=primes",
            Self::UnknownFault => "unknown fault (triple_fault, panic or hang)",
            Self::FaultWordWithoutFault => "fault_after_ms needs fault=",
        })
    }
}

/// Parses `text`, calling `report` once for every ignored word, in command-line order.
pub fn parse<'a>(text: &'a str, mut report: impl FnMut(Problem<'a>)) -> Cmdline {
    let mut cmdline = Cmdline::default();
    let mut seen = SeenKeys::default();
    let mut attacks = IsolationPlan::default();
    // Attack words are judged after the whole line is read: `test=isolation` may come last.
    let mut attack_words: [Option<&'a str>; 4] = [None; 4];
    let mut primes = PrimesPlan::default();
    let mut primes_wanted = false;
    let mut worker_words: [Option<&'a str>; 3] = [None; 3];
    let mut fault_kind = None;
    let mut fault_after_ms = None;

    for word in text.split_ascii_whitespace() {
        let mut problem = |reason| report(Problem { word, reason });
        let Some((key, value)) = word.split_once('=') else {
            problem(Reason::UnknownWord);
            continue;
        };
        let Some(key) = Key::from_name(key) else {
            problem(Reason::UnknownWord);
            continue;
        };
        if !seen.first_time(key) {
            problem(Reason::Duplicate);
            continue;
        }
        let accepted = match key {
            Key::Log => parse_level(value).map(|level| cmdline.log_level = level),
            Key::Test if value == "isolation" => {
                cmdline.isolation = Some(IsolationPlan::default());
                Some(())
            }
            Key::Test if value == "user" => {
                cmdline.user_test = true;
                Some(())
            }
            Key::Test if value == "leave_traces" => {
                cmdline.leave_traces = true;
                Some(())
            }
            Key::Test if value == "inherit" => {
                cmdline.check_inherited = true;
                Some(())
            }
            Key::Test => {
                problem(Reason::UnknownTest);
                continue;
            }
            Key::Read => parse_address(value).map(|address| attacks.read = Some(address)),
            Key::Write => parse_address(value).map(|address| attacks.write = Some(address)),
            Key::Ipi => parse_number(value)
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| attacks.ipi = Some(id)),
            Key::IoApic => parse_number(value)
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| attacks.ioapic = Some(id)),
            Key::Workload if value == "primes" => {
                primes_wanted = true;
                Some(())
            }
            Key::Workload if value == "idle" => {
                cmdline.idle = true;
                Some(())
            }
            Key::Workload => {
                problem(Reason::UnknownWorkload);
                continue;
            }
            Key::Threads => parse_bounded(value, MAX_WORKER_THREADS)
                .map(|threads| primes.threads = threads as u32),
            Key::Limit => parse_bounded(value, MAX_PRIMES_LIMIT).map(|limit| primes.limit = limit),
            Key::Rounds => {
                parse_bounded(value, MAX_ROUNDS).map(|rounds| primes.rounds = rounds as u32)
            }
            Key::TscKhz => parse_bounded(value, MAX_TSC_KHZ).map(|khz| cmdline.tsc_khz = Some(khz)),
            Key::LoadMarkers => parse_switch(value).map(|on| cmdline.load_markers = on),
            Key::IgnoreRevoke => parse_bounded(value, MAX_CORE_INDEX)
                .map(|core| cmdline.ignore_revoke = Some(core as u32)),
            Key::Fault if value == "triple_fault" => {
                fault_kind = Some(FaultKind::TripleFault);
                Some(())
            }
            Key::Fault if value == "hang" => {
                fault_kind = Some(FaultKind::Hang);
                Some(())
            }
            Key::Fault if value == "panic" => {
                fault_kind = Some(FaultKind::Panic);
                Some(())
            }
            Key::Fault => {
                problem(Reason::UnknownFault);
                continue;
            }
            Key::FaultAfterMs => {
                parse_bounded(value, MAX_FAULT_AFTER_MS).map(|ms| fault_after_ms = Some((ms, word)))
            }
        };
        match (accepted, key.attack_index(), key.worker_index()) {
            (None, _, _) => problem(Reason::BadValue),
            (Some(()), Some(index), _) => attack_words[index] = Some(word),
            (Some(()), None, Some(index)) => worker_words[index] = Some(word),
            (Some(()), None, None) => {}
        }
    }

    if primes_wanted {
        cmdline.primes = Some(primes);
    } else {
        for word in worker_words.into_iter().flatten() {
            report(Problem {
                word,
                reason: Reason::WorkerWithoutWorkload,
            });
        }
    }

    match (fault_kind, fault_after_ms) {
        (Some(kind), after) => {
            cmdline.fault = Some(FaultPlan {
                kind,
                after_ms: after.map_or(DEFAULT_FAULT_AFTER_MS, |(ms, _)| ms),
            });
        }
        (None, Some((_, word))) => report(Problem {
            word,
            reason: Reason::FaultWordWithoutFault,
        }),
        (None, None) => {}
    }

    match cmdline.isolation.as_mut() {
        Some(plan) => *plan = attacks,
        None => {
            for word in attack_words.into_iter().flatten() {
                report(Problem {
                    word,
                    reason: Reason::AttackWithoutTest,
                });
            }
        }
    }
    cmdline
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Log,
    Test,
    Read,
    Write,
    Ipi,
    IoApic,
    Workload,
    Threads,
    Limit,
    Rounds,
    TscKhz,
    LoadMarkers,
    IgnoreRevoke,
    Fault,
    FaultAfterMs,
}

impl Key {
    const ALL: [Key; 15] = [
        Key::Log,
        Key::Test,
        Key::Read,
        Key::Write,
        Key::Ipi,
        Key::IoApic,
        Key::Workload,
        Key::Threads,
        Key::Limit,
        Key::Rounds,
        Key::TscKhz,
        Key::LoadMarkers,
        Key::IgnoreRevoke,
        Key::Fault,
        Key::FaultAfterMs,
    ];

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|key| key.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Test => "test",
            Self::Read => "read",
            Self::Write => "write",
            Self::Ipi => "ipi",
            Self::IoApic => "ioapic",
            Self::Workload => "workload",
            Self::Threads => "threads",
            Self::Limit => "limit",
            Self::Rounds => "rounds",
            Self::TscKhz => "tsc_khz",
            Self::LoadMarkers => "load_markers",
            Self::IgnoreRevoke => "ignore_revoke",
            Self::Fault => "fault",
            Self::FaultAfterMs => "fault_after_ms",
        }
    }

    /// Position in the list of attack words, for keys that name an attack.
    fn attack_index(self) -> Option<usize> {
        match self {
            Self::Read => Some(0),
            Self::Write => Some(1),
            Self::Ipi => Some(2),
            Self::IoApic => Some(3),
            _ => None,
        }
    }

    /// Position in the list of primes-worker words, for keys that tune the worker.
    fn worker_index(self) -> Option<usize> {
        match self {
            Self::Threads => Some(0),
            Self::Limit => Some(1),
            Self::Rounds => Some(2),
            _ => None,
        }
    }
}

#[derive(Default)]
struct SeenKeys([bool; Key::ALL.len()]);

impl SeenKeys {
    fn first_time(&mut self, key: Key) -> bool {
        !core::mem::replace(&mut self.0[key as usize], true)
    }
}

/// `on` or `off`.
fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    value.parse().ok()
}

/// A number in `1..=max`.
fn parse_bounded(value: &str, max: u64) -> Option<u64> {
    parse_number(value).filter(|number| (1..=max).contains(number))
}

fn parse_address(value: &str) -> Option<u64> {
    parse_number(value).filter(|address| *address < IDENTITY_MAP_LIMIT)
}

/// Decimal, or hexadecimal with a `0x` / `0X` prefix. `_` separators are allowed in either
/// (`0x1_0000_0000`), as in Rust literals, because long addresses are easier to read with them.
fn parse_number(value: &str) -> Option<u64> {
    let (digits, radix) = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    if digits.is_empty() || digits.starts_with('_') {
        return None;
    }
    digits
        .bytes()
        .filter(|byte| *byte != b'_')
        .try_fold(0u64, |number, byte| {
            let digit = char::from(byte).to_digit(radix)?;
            number
                .checked_mul(u64::from(radix))?
                .checked_add(u64::from(digit))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_tests() {
        let (cmdline, problems) = parse_all("ignore_revoke=2 fault=hang fault_after_ms=1500");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cmdline.ignore_revoke, Some(2));
        assert_eq!(
            cmdline.fault,
            Some(FaultPlan {
                kind: FaultKind::Hang,
                after_ms: 1500
            })
        );
        let (cmdline, _) = parse_all("fault=triple_fault");
        assert_eq!(
            cmdline.fault,
            Some(FaultPlan {
                kind: FaultKind::TripleFault,
                after_ms: DEFAULT_FAULT_AFTER_MS
            })
        );
        let (cmdline, problems) = parse_all("fault=panic fault_after_ms=45000");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            cmdline.fault,
            Some(FaultPlan {
                kind: FaultKind::Panic,
                after_ms: 45_000
            })
        );
        let (cmdline, problems) = parse_all(
            "ignore_revoke=0 ignore_revoke=64 fault=reboot fault_after_ms=0 fault_after_ms=5",
        );
        assert_eq!(cmdline.ignore_revoke, None);
        assert_eq!(cmdline.fault, None);
        let reasons: Vec<_> = problems.iter().map(|(w, r)| (w.as_str(), *r)).collect();
        assert_eq!(
            reasons,
            [
                ("ignore_revoke=0", Reason::BadValue),
                ("ignore_revoke=64", Reason::Duplicate),
                ("fault=reboot", Reason::UnknownFault),
                ("fault_after_ms=0", Reason::BadValue),
                ("fault_after_ms=5", Reason::Duplicate),
            ]
        );
        let (_, problems) = parse_all("fault_after_ms=5");
        assert_eq!(problems[0].1, Reason::FaultWordWithoutFault);
    }

    #[test]
    fn user_test_and_idle_workload() {
        let (cmdline, problems) = parse_all("test=user workload=idle");
        assert!(problems.is_empty(), "{problems:?}");
        assert!(cmdline.user_test && cmdline.idle);
        assert_eq!(cmdline.primes, None);
    }

    #[test]
    fn load_markers_are_off_unless_asked_for() {
        assert!(!parse_all("").0.load_markers);
        let (cmdline, problems) = parse_all("load_markers=on workload=primes");
        assert!(problems.is_empty(), "{problems:?}");
        assert!(cmdline.load_markers);
        let (cmdline, problems) = parse_all("load_markers=yes");
        assert!(!cmdline.load_markers);
        assert_eq!(
            problems,
            [("load_markers=yes".to_string(), Reason::BadValue)]
        );
    }

    #[test]
    fn the_limit_matches_the_primes_program() {
        assert_eq!(MAX_PRIMES_LIMIT, lavender_user::primes::SIEVE_LIMIT);
    }

    fn parse_all(text: &str) -> (Cmdline, Vec<(String, Reason)>) {
        let mut problems = Vec::new();
        let cmdline = parse(text, |problem| {
            problems.push((problem.word.to_string(), problem.reason))
        });
        (cmdline, problems)
    }

    #[test]
    fn empty_line_is_a_normal_boot() {
        assert_eq!(parse_all(""), (Cmdline::default(), vec![]));
        assert_eq!(parse_all("   \t "), (Cmdline::default(), vec![]));
    }

    #[test]
    fn full_isolation_line() {
        let (cmdline, problems) =
            parse_all("test=isolation read=0x4000_0000 write=0X1000 ipi=3 log=debug");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cmdline.log_level, LevelFilter::Debug);
        let plan = cmdline.isolation.unwrap();
        assert_eq!(
            plan,
            IsolationPlan {
                read: Some(0x4000_0000),
                write: Some(0x1000),
                ipi: Some(3),
                ioapic: None,
            }
        );
        assert_eq!(plan.attack_count(), 3);
    }

    #[test]
    fn any_subset_of_attacks_and_test_word_anywhere() {
        let (cmdline, problems) = parse_all("ipi=0x10 test=isolation");
        assert!(problems.is_empty());
        assert_eq!(
            cmdline.isolation,
            Some(IsolationPlan {
                read: None,
                write: None,
                ipi: Some(16),
                ioapic: None,
            })
        );

        let (cmdline, _) = parse_all("test=isolation");
        assert_eq!(cmdline.isolation.unwrap().attack_count(), 0);

        let (cmdline, problems) = parse_all("test=isolation ioapic=2");
        assert!(problems.is_empty());
        let plan = cmdline.isolation.unwrap();
        assert_eq!((plan.ioapic, plan.attack_count()), (Some(2), 1));
    }

    #[test]
    fn bad_words_are_reported_and_ignored() {
        let (cmdline, problems) = parse_all(
            "test=isolation read=banana write=0x ipi=4294967296 nonsense =5 read=0x2000 foo=1 \
             write=0x1_0000_0000_0000_0000 write=99",
        );
        assert_eq!(
            problems,
            vec![
                ("read=banana".to_string(), Reason::BadValue),
                ("write=0x".to_string(), Reason::BadValue),
                ("ipi=4294967296".to_string(), Reason::BadValue),
                ("nonsense".to_string(), Reason::UnknownWord),
                ("=5".to_string(), Reason::UnknownWord),
                ("read=0x2000".to_string(), Reason::Duplicate),
                ("foo=1".to_string(), Reason::UnknownWord),
                (
                    "write=0x1_0000_0000_0000_0000".to_string(),
                    Reason::Duplicate
                ),
                ("write=99".to_string(), Reason::Duplicate),
            ]
        );
        // A key with a bad value still counts as seen, so a later repair is a duplicate: the
        // operator sees both words reported rather than a silent guess.
        assert_eq!(cmdline.isolation, Some(IsolationPlan::default()));
    }

    #[test]
    fn addresses_are_bounded_by_the_identity_map() {
        let (cmdline, problems) =
            parse_all("test=isolation read=0x7fff_ffff_ffff write=0x8000_0000_0000");
        assert_eq!(
            cmdline.isolation.unwrap().read,
            Some(IDENTITY_MAP_LIMIT - 1)
        );
        assert_eq!(
            problems,
            vec![("write=0x8000_0000_0000".to_string(), Reason::BadValue)]
        );
    }

    #[test]
    fn numbers_overflowing_u64_are_bad_values() {
        let (_, problems) = parse_all("test=isolation read=18446744073709551616 ipi=_1 write=0x_1");
        assert_eq!(problems.len(), 3);
        assert!(problems
            .iter()
            .all(|(_, reason)| *reason == Reason::BadValue));
    }

    #[test]
    fn attacks_without_test_mode_are_reported() {
        let (cmdline, problems) = parse_all("read=0x1000 log=warn ipi=1");
        assert_eq!(cmdline.isolation, None);
        assert_eq!(cmdline.log_level, LevelFilter::Warn);
        assert_eq!(
            problems,
            vec![
                ("read=0x1000".to_string(), Reason::AttackWithoutTest),
                ("ipi=1".to_string(), Reason::AttackWithoutTest)
            ]
        );
    }

    #[test]
    fn unknown_test_and_log_level() {
        let (cmdline, problems) = parse_all("test=speed log=loud");
        assert_eq!(cmdline, Cmdline::default());
        assert_eq!(
            problems,
            vec![
                ("test=speed".to_string(), Reason::UnknownTest),
                ("log=loud".to_string(), Reason::BadValue)
            ]
        );
    }

    #[test]
    fn primes_workload() {
        let (cmdline, problems) = parse_all("workload=primes threads=8 limit=200000");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            cmdline.primes,
            Some(PrimesPlan {
                threads: 8,
                limit: 200_000,
                rounds: 1
            })
        );
        let (cmdline, _) = parse_all("rounds=3 workload=primes");
        assert_eq!(
            cmdline.primes,
            Some(PrimesPlan {
                rounds: 3,
                ..PrimesPlan::default()
            })
        );
    }

    #[test]
    fn tsc_override() {
        let (cmdline, problems) = parse_all("tsc_khz=50000");
        assert!(problems.is_empty());
        assert_eq!(cmdline.tsc_khz, Some(50_000));
        let (cmdline, problems) = parse_all("tsc_khz=0");
        assert_eq!(cmdline.tsc_khz, None);
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn bad_workload_words() {
        let (cmdline, problems) =
            parse_all("threads=0 limit=200000000 workload=sort rounds=2 workload=idle");
        assert_eq!(cmdline.primes, None);
        assert_eq!(
            problems,
            vec![
                ("threads=0".to_string(), Reason::BadValue),
                ("limit=200000000".to_string(), Reason::BadValue),
                ("workload=sort".to_string(), Reason::UnknownWorkload),
                ("workload=idle".to_string(), Reason::Duplicate),
                ("rounds=2".to_string(), Reason::WorkerWithoutWorkload),
            ]
        );
    }

    #[test]
    fn non_ascii_input_does_not_confuse_the_parser() {
        let (cmdline, problems) = parse_all("test=isolation read=０x10 ipi=٣ write=0x10");
        assert_eq!(cmdline.isolation.unwrap().write, Some(0x10));
        assert_eq!(problems.len(), 2);
    }
}
