//! The core-move test (`core_test=SEED:CYCLES` on the command line), one client of the
//! core manager, stepped by core 0's event loop: it grants and revokes the cores a guest may
//! hold, other than its boot core, in a seeded random sequence, through the real control channel and the real
//! STARTUP IPI and CORE_RELEASE paths, and reports bring-up and release times from the
//! manager's move records, in TSC time (virtual time under Bochs with `clock: sync=none`).

use heapless::Vec;
use vmcall_proto::cores::CoreId;
use vmcall_proto::hypercall::CoreState;
use vmcall_proto::message::CoreEvent;

use crate::arch::cpu;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::cmdline::CoreTest;
use crate::cores::{MoveRecord, Reason, Requester, Stage, CORES};
use crate::faults;
use crate::guest::control::CONTROL_VECTOR;
use crate::guest::{self, Guest, GuestState};
use crate::random_moves::{next_action, summarize, Action, Rng, Summary};
use crate::vcpu;
use crate::{console, time};

/// How long a guest has to start a granted core before the grant is withdrawn.
const GRANT_TIMEOUT_US: u64 = 200_000;
/// The release deadline given with each revoke; past it the core is taken by force.
const RELEASE_DEADLINE_US: u32 = 50_000;
/// How long the guest gets to set up its control channel before the first move.
const READY_TIMEOUT_US: u64 = 2_000_000;
const MAX_SAMPLES: usize = 512;
/// Time between the end of one move and the start of the next. A move ends, for the test, when
/// the core has entered the guest or is parked, but the guest then still takes it in: a new
/// core runs its set-up up to its first thread, and after a release the core the hypervisor
/// woke takes the leaving core's threads (tens of µs, interrupts off). A move started at once
/// would wait behind that work and time it too; real moves (a policy's, `vmctl`'s) come
/// milliseconds apart.
const MOVE_SPACING_US: u64 = 200;

type Samples = Vec<u64, MAX_SAMPLES>;

/// The stages of a bring-up and of a release, each from the previous stamp (TSC, µs).
#[derive(Default)]
struct Stages {
    /// Grant posted -> the guest's STARTUP IPI handled: the doorbell, the guest's
    /// handling of the grant and its STARTUP.
    grant_to_startup: Samples,
    /// STARTUP IPI handled -> the parked core took the start from its mailbox.
    startup_to_woken: Samples,
    /// Mailbox taken -> first VM entry (VMCS set-up).
    woken_to_entry: Samples,
    /// Revoke posted -> the guest's `CORE_RELEASE` on that core handled.
    revoke_to_release_call: Samples,
    /// `CORE_RELEASE` handled -> core parked.
    release_call_to_parked: Samples,
}

impl Stages {
    fn bringup(&mut self, r: &MoveRecord) {
        for (samples, from, to) in [
            (&mut self.grant_to_startup, Stage::Granted, Stage::Startup),
            (&mut self.startup_to_woken, Stage::Startup, Stage::Woken),
            (&mut self.woken_to_entry, Stage::Woken, Stage::Entered),
        ] {
            let _ = samples.push(time::us_for_ticks(r.between(from, to)));
        }
    }

    fn release(&mut self, r: &MoveRecord) {
        for (samples, from, to) in [
            (
                &mut self.revoke_to_release_call,
                Stage::Revoked,
                Stage::ReleaseCalled,
            ),
            (
                &mut self.release_call_to_parked,
                Stage::ReleaseCalled,
                Stage::Parked,
            ),
        ] {
            let _ = samples.push(time::us_for_ticks(r.between(from, to)));
        }
    }
}

/// What the core test asks of core 0's event loop after a step.
pub enum Step {
    /// Step again at once: a move is in flight and its stages are stamped by other cores.
    Poll,
    /// Step again by this TSC (or sooner, on any wake-up of core 0).
    At(u64),
    /// The test is over (its `core_test_done` marker is printed).
    Done,
}

/// Where the test is.
enum Phase {
    /// The guest settles until this TSC: before the first move it attaches its end of the
    /// control channel; after each move it finishes taking it in ([`MOVE_SPACING_US`]).
    Settling { until: u64 },
    /// The next move is chosen; with nothing movable, the test waits for a core to come
    /// back to the pool until `waiting_until`.
    Choose { waiting_until: Option<u64> },
    /// A grant is posted; the core must enter the guest by `deadline`.
    AwaitEntry {
        core: usize,
        generation: u32,
        deadline: u64,
    },
    /// A revoke is posted; the core must be parked by `deadline`, or it is taken by NMI.
    AwaitPark { core: usize, deadline: u64 },
    /// The core is being taken by NMI (`forcing`: the manager agreed); it parks by
    /// `deadline`.
    AwaitForcedPark {
        core: usize,
        forcing: bool,
        deadline: u64,
    },
}

/// A running core-move test: one client of the core manager, stepped by core 0's event loop
/// (`monitor::run`) between its other work.
pub struct Run {
    guest: &'static Guest,
    test: CoreTest,
    candidates: u64,
    rng: Rng,
    /// Cycles begun (a move the manager refused counts, as it always did).
    begun: u32,
    phase: Phase,
    bringup: Samples,
    release: Samples,
    startup_to_entry: Samples,
    /// When each grant was posted (core, TSC): the guest reports when its first thread ran on
    /// the core, and the harness pairs the two for the whole bring-up (grant -> first thread).
    grant_posted: Vec<(usize, u64), MAX_SAMPLES>,
    stages: Stages,
    grants: u32,
    revokes: u32,
    forced: u32,
    timeouts: u32,
    done: u32,
}

impl Run {
    /// Starts the test on the first guest with a control channel.
    pub fn start(test: CoreTest) -> Option<Self> {
        let Some(guest) = guest::all().iter().find(|g| g.control.is_some()) else {
            log::warn!("core_test: no guest has a control channel; nothing to test");
            return None;
        };
        let boot = guest.config.boot_core.index();
        let candidates = guest.config.allowed_cores.0 & !(1 << boot);
        console::marker("core_test_start", |o| {
            o.str("guest", guest.name())
                .u64("seed", test.seed)
                .u64("cycles", test.cycles.into())
                .hex("cores", candidates);
        });
        Some(Self {
            guest,
            test,
            candidates,
            rng: Rng::new(test.seed),
            begun: 0,
            phase: Phase::Settling {
                until: cpu::read_tsc() + time::ticks_for_us(READY_TIMEOUT_US),
            },
            bringup: Vec::new(),
            release: Vec::new(),
            startup_to_entry: Vec::new(),
            grant_posted: Vec::new(),
            stages: Stages::default(),
            grants: 0,
            revokes: 0,
            forced: 0,
            timeouts: 0,
            done: 0,
        })
    }

    /// Grantable (parked) and revocable (owned by the guest) candidate cores.
    fn movable(&self) -> (u64, u64) {
        let in_state = |state| {
            (0..64)
                .filter(|c| self.candidates & (1 << c) != 0 && CORES.state(*c) == state)
                .fold(0u64, |m, c| m | 1 << c)
        };
        (
            in_state(CoreState::Parked),
            in_state(CoreState::Owned) & CORES.cores_of(self.guest.id),
        )
    }

    /// Advances the test as far as it goes without waiting.
    pub fn step(&mut self) -> Step {
        let guest = self.guest;
        loop {
            let now = cpu::read_tsc();
            let running = guest.state() == GuestState::Running;
            match self.phase {
                Phase::Settling { until } => {
                    if running && now < until {
                        return Step::At(until);
                    }
                    self.phase = Phase::Choose {
                        waiting_until: None,
                    };
                }
                Phase::Choose { waiting_until } => {
                    if !running || self.begun >= self.test.cycles {
                        return self.finish();
                    }
                    // When nothing is movable, the cores may all be another guest's for now:
                    // wait (bounded) for one to come back to the pool.
                    let (parked, owned) = self.movable();
                    if (parked, owned) == (0, 0) {
                        let until =
                            waiting_until.unwrap_or(now + time::ticks_for_us(READY_TIMEOUT_US));
                        if now < until {
                            self.phase = Phase::Choose {
                                waiting_until: Some(until),
                            };
                            return Step::At(until);
                        }
                    }
                    self.begun += 1;
                    match next_action(&mut self.rng, parked, owned) {
                        None => return self.finish(),
                        Some(Action::Grant(core)) => self.grant(core),
                        Some(Action::Revoke(core)) => self.revoke(core),
                    }
                }
                Phase::AwaitEntry {
                    core,
                    generation,
                    deadline,
                } => {
                    let r = record(core);
                    if r.generation == generation && r.at(Stage::Entered) != 0 {
                        let _ = self.bringup.push(time::us_for_ticks(
                            r.between(Stage::Granted, Stage::Entered),
                        ));
                        let _ = self.startup_to_entry.push(time::us_for_ticks(
                            r.between(Stage::Startup, Stage::Entered),
                        ));
                        self.stages.bringup(&r);
                    } else if now > deadline || !running {
                        self.timeouts += 1;
                        log::warn!(
                            "core_test: '{}' did not start granted cpu{core}; grant withdrawn",
                            guest.name()
                        );
                        let by = Requester::Hypervisor;
                        if let Err(e) = CORES.withdraw(core, guest.id, by, Reason::Withdrawn, now) {
                            log::warn!("core_test: withdrawing cpu{core}: {e:?}");
                        }
                    } else {
                        return Step::Poll;
                    }
                    self.moved();
                }
                Phase::AwaitPark { core, deadline } => {
                    let r = record(core);
                    if r.at(Stage::Parked) != 0 {
                        let _ = self
                            .release
                            .push(time::us_for_ticks(r.between(Stage::Revoked, Stage::Parked)));
                        self.stages.release(&r);
                        self.moved();
                    } else if now > deadline || !running {
                        self.forced += 1;
                        let forcing = faults::force(guest, core, Requester::Hypervisor);
                        self.phase = Phase::AwaitForcedPark {
                            core,
                            forcing,
                            deadline: now + time::ticks_for_us(GRANT_TIMEOUT_US),
                        };
                    } else {
                        return Step::Poll;
                    }
                }
                Phase::AwaitForcedPark {
                    core,
                    forcing,
                    deadline,
                } => {
                    let r = record(core);
                    let parked = r.at(Stage::Parked) != 0;
                    if !parked && now <= deadline && running {
                        return Step::Poll;
                    }
                    if forcing && parked {
                        faults::taken(guest, core, RELEASE_DEADLINE_US);
                    }
                    let _ = self
                        .release
                        .push(time::us_for_ticks(r.between(Stage::Revoked, Stage::Parked)));
                    self.moved();
                }
            }
        }
    }

    fn moved(&mut self) {
        self.done += 1;
        self.phase = Phase::Settling {
            until: cpu::read_tsc() + time::ticks_for_us(MOVE_SPACING_US),
        };
    }

    fn grant(&mut self, core: usize) {
        let guest = self.guest;
        let (generation, granted_at) = match vcpu::grant(core, guest.id, Requester::Hypervisor) {
            Ok(grant) => grant,
            Err(e) => {
                log::warn!("core_test: cannot grant cpu{core}: {e:?}");
                return;
            }
        };
        // The granted core is not running yet: the guest hears of it at once, on a core it
        // runs on (the bookkeeping here waits until after the doorbell).
        notify(
            guest,
            CoreEvent::Grant {
                core: core_id(core),
            },
            CORES.first_owned(guest.id),
        );
        self.grants += 1;
        let _ = self.grant_posted.push((core, granted_at));
        self.phase = Phase::AwaitEntry {
            core,
            generation,
            deadline: cpu::read_tsc() + time::ticks_for_us(GRANT_TIMEOUT_US),
        };
    }

    fn revoke(&mut self, core: usize) {
        let guest = self.guest;
        if let Err(e) = CORES.revoke(core, guest.id, Requester::Hypervisor, cpu::read_tsc()) {
            log::warn!("core_test: cannot revoke cpu{core}: {e:?}");
            return;
        }
        self.revokes += 1;
        // Straight to the core that must leave: it can act on the revoke itself, without a
        // hop through another core.
        notify(
            guest,
            CoreEvent::Revoke {
                core: core_id(core),
                deadline_us: RELEASE_DEADLINE_US,
                negotiable: false,
            },
            Some(core),
        );
        self.phase = Phase::AwaitPark {
            core,
            deadline: cpu::read_tsc() + time::ticks_for_us(RELEASE_DEADLINE_US.into()),
        };
    }

    /// Prints the figures; the test is over.
    fn finish(&mut self) -> Step {
        let guest = self.guest;
        let (grants, revokes, forced, timeouts, done) = (
            self.grants,
            self.revokes,
            self.forced,
            self.timeouts,
            self.done,
        );
        let bringup = summarize(&mut self.bringup);
        let release = summarize(&mut self.release);
        let startup_to_entry = summarize(&mut self.startup_to_entry);
        log::info!(
            "core_test: {done} moves ({grants} grants, {revokes} revokes, {forced} forced, {timeouts} timeouts); \
             bring-up median {} us worst {} us; release median {} us worst {} us (TSC time)",
            bringup.median, bringup.worst, release.median, release.worst
        );
        let stages = &mut self.stages;
        let grant_posted = &self.grant_posted;
        console::marker("core_test_done", |o| {
            o.str("guest", guest.name())
                .u64("moves", done.into())
                .u64("grants", grants.into())
                .u64("revokes", revokes.into())
                .u64("forced_releases", forced.into())
                .u64("grant_timeouts", timeouts.into())
                .str("clock", "tsc")
                .u64("tsc_hz", time::tsc_hz());
            o.object("bringup_us", |s| summary(s, &bringup));
            o.object("release_us", |s| summary(s, &release));
            // The hypervisor's share of a bring-up: STARTUP IPI handled -> vCPU entered.
            o.object("startup_ipi_to_entry_us", |s| summary(s, &startup_to_entry));
            // Each stage's median and worst, in the order the stages happen.
            o.object("stages_us", |o| {
                for (name, samples) in [
                    ("grant_to_startup", &mut stages.grant_to_startup),
                    ("startup_to_woken", &mut stages.startup_to_woken),
                    ("woken_to_entry", &mut stages.woken_to_entry),
                    ("revoke_to_release_call", &mut stages.revoke_to_release_call),
                    ("release_call_to_parked", &mut stages.release_call_to_parked),
                ] {
                    let s = summarize(samples);
                    o.object(name, |o| summary(o, &s));
                }
            });
            o.array("grants_posted", |a| {
                for &(core, tsc) in grant_posted {
                    a.object(|o| {
                        o.u64("core", core as u64).u64("tsc", tsc);
                    });
                }
            });
        });
        Step::Done
    }
}

fn record(core: usize) -> MoveRecord {
    CORES.record(core).expect("a core of the machine")
}

fn summary<W: core::fmt::Write>(o: &mut vmcall_proto::marker::JsonObject<'_, W>, s: &Summary) {
    o.u64("count", s.count as u64)
        .u64("median", s.median)
        .u64("worst", s.worst);
}

fn core_id(core: usize) -> CoreId {
    CoreId::new(core as u64).expect("core indices are below MAX_CPUS")
}

/// Queues `event` and rings the guest's control doorbell on core `at`.
fn notify(guest: &Guest, event: CoreEvent, at: Option<usize>) {
    let Some(control) = &guest.control else {
        return;
    };
    if let Err(e) = control.send(event) {
        log::warn!(
            "core_test: cannot queue {event:?} for '{}': {e}",
            guest.name()
        );
    }
    if let Some(core) = at {
        LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), CONTROL_VECTOR);
    }
}
