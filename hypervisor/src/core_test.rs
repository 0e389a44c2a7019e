//! The core-move test (`core_test=SEED:CYCLES` on the command line), one client of the
//! core manager: the BSP grants and revokes the cores a guest may hold, other than its
//! boot core, in a seeded random sequence, through the real control channel and the real
//! INIT/SIPI and CORE_RELEASE paths, and reports bring-up and release times from the
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
use crate::monitor;
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

type Samples = Vec<u64, MAX_SAMPLES>;

/// The stages of a bring-up and of a release, each from the previous stamp (TSC, µs).
#[derive(Default)]
struct Stages {
    /// Grant posted -> the guest's STARTUP IPI handled: the doorbell, the guest's
    /// handling of the grant and its INIT/STARTUP.
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
            let _ = samples.push(ticks_to_us(r.between(from, to)));
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
            let _ = samples.push(ticks_to_us(r.between(from, to)));
        }
    }
}

pub fn run(test: CoreTest) {
    let Some(guest) = guest::all().iter().find(|g| g.control.is_some()) else {
        log::warn!("core_test: no guest has a control channel; nothing to test");
        return;
    };
    let boot = guest.config.boot_core.index();
    let candidates = guest.config.allowed_cores.0 & !(1 << boot);
    console::marker("core_test_start", |o| {
        o.str("guest", guest.name())
            .u64("seed", test.seed)
            .u64("cycles", test.cycles.into())
            .hex("cores", candidates);
    });
    // Give the guest time to attach its end of the control channel.
    wait_until(guest, READY_TIMEOUT_US, || false);

    let mut rng = Rng::new(test.seed);
    let (mut bringup, mut release): (Vec<u64, MAX_SAMPLES>, Vec<u64, MAX_SAMPLES>) =
        (Vec::new(), Vec::new());
    let mut startup_to_entry: Samples = Vec::new();
    // When each grant was posted (core, TSC): the guest reports when its first thread ran on
    // the core, and the harness pairs the two for the whole bring-up (grant -> first thread).
    let mut grant_posted: Vec<(usize, u64), MAX_SAMPLES> = Vec::new();
    let mut stages = Stages::default();
    let (mut grants, mut revokes, mut forced, mut timeouts, mut done) =
        (0u32, 0u32, 0u32, 0u32, 0u32);
    for _ in 0..test.cycles {
        if guest.state() != GuestState::Running {
            break;
        }
        // Grantable: parked; revocable: owned by this guest. When neither, the cores may
        // all be another guest's for now: wait (bounded) for one to come back to the pool.
        let movable = || {
            let in_state = |state| {
                (0..64)
                    .filter(|c| candidates & (1 << c) != 0 && CORES.state(*c) == state)
                    .fold(0u64, |m, c| m | 1 << c)
            };
            (
                in_state(CoreState::Parked),
                in_state(CoreState::Owned) & CORES.cores_of(guest.id),
            )
        };
        if movable() == (0, 0) {
            wait_until(guest, READY_TIMEOUT_US, || movable() != (0, 0));
        }
        let (parked, owned) = movable();
        match next_action(&mut rng, parked, owned) {
            None => break,
            Some(Action::Grant(core)) => {
                let (generation, granted_at) =
                    match vcpu::grant(core, guest.id, Requester::Hypervisor) {
                        Ok(grant) => grant,
                        Err(e) => {
                            log::warn!("core_test: cannot grant cpu{core}: {e:?}");
                            continue;
                        }
                    };
                // The granted core is not running yet: the guest hears of it at once, on a
                // core it runs on (the bookkeeping here waits until after the doorbell).
                notify(
                    guest,
                    CoreEvent::Grant {
                        core: core_id(core),
                    },
                    CORES.first_owned(guest.id),
                );
                grants += 1;
                let _ = grant_posted.push((core, granted_at));
                let record = || CORES.record(core).expect("a core of the machine");
                let entered = || {
                    let r = record();
                    r.generation == generation && r.at(Stage::Entered) != 0
                };
                if wait_until(guest, GRANT_TIMEOUT_US, entered) {
                    let r = record();
                    let _ = bringup.push(ticks_to_us(r.between(Stage::Granted, Stage::Entered)));
                    let _ = startup_to_entry
                        .push(ticks_to_us(r.between(Stage::Startup, Stage::Entered)));
                    stages.bringup(&r);
                } else {
                    timeouts += 1;
                    log::warn!(
                        "core_test: '{}' did not start granted cpu{core}; grant withdrawn",
                        guest.name()
                    );
                    let now = cpu::read_tsc();
                    let by = Requester::Hypervisor;
                    if let Err(e) = CORES.withdraw(core, guest.id, by, Reason::Withdrawn, now) {
                        log::warn!("core_test: withdrawing cpu{core}: {e:?}");
                    }
                }
            }
            Some(Action::Revoke(core)) => {
                let by = Requester::Hypervisor;
                if let Err(e) = CORES.revoke(core, guest.id, by, cpu::read_tsc()) {
                    log::warn!("core_test: cannot revoke cpu{core}: {e:?}");
                    continue;
                }
                revokes += 1;
                // Straight to the core that must leave: it can act on the revoke itself,
                // without a hop through another core.
                notify(
                    guest,
                    CoreEvent::Revoke {
                        core: core_id(core),
                        deadline_us: RELEASE_DEADLINE_US,
                    },
                    Some(core),
                );
                let record = || CORES.record(core).expect("a core of the machine");
                let parked = || record().at(Stage::Parked) != 0;
                let released = wait_until(guest, RELEASE_DEADLINE_US.into(), parked);
                if !released {
                    forced += 1;
                    if faults::force(guest, core, by) && wait_until(guest, GRANT_TIMEOUT_US, parked)
                    {
                        faults::taken(guest, core, RELEASE_DEADLINE_US);
                    }
                }
                let r = record();
                let _ = release.push(ticks_to_us(r.between(Stage::Revoked, Stage::Parked)));
                if released {
                    stages.release(&r);
                }
            }
        }
        done += 1;
    }
    let (bringup, release) = (summarize(&mut bringup), summarize(&mut release));
    let startup_to_entry = summarize(&mut startup_to_entry);
    log::info!(
        "core_test: {done} moves ({grants} grants, {revokes} revokes, {forced} forced, {timeouts} timeouts); \
         bring-up median {} us worst {} us; release median {} us worst {} us (TSC time)",
        bringup.median, bringup.worst, release.median, release.worst
    );
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
            for &(core, tsc) in &grant_posted {
                a.object(|o| {
                    o.u64("core", core as u64).u64("tsc", tsc);
                });
            }
        });
    });
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

/// Polls `done` (and the guest's control channel) until it holds or `timeout_us` pass.
fn wait_until(guest: &Guest, timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = cpu::read_tsc() + time::ticks_for_us(timeout_us);
    loop {
        if done() {
            return true;
        }
        monitor::poll_control(guest);
        console::drain_ready();
        if cpu::read_tsc() > deadline || guest.state() != GuestState::Running {
            return done();
        }
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
    }
}

fn ticks_to_us(ticks: u64) -> u64 {
    ticks / (time::tsc_hz() / 1_000_000).max(1)
}
