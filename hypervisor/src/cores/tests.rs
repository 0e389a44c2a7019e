//! The manager under random sequences of moves (proptest) and under threads racing on the
//! same cores: every word stays consistent, a core changes hands only through the
//! hypervisor (parked in between), and every sequence can be brought back to all-parked.

use proptest::prelude::*;
use vmcall_proto::hypercall::CoreState;

use super::*;

const CORES_N: usize = 4;
const GUESTS: u8 = 3;

fn any_move() -> impl Strategy<Value = (usize, Move)> {
    let guest = 0..GUESTS;
    let mv = prop_oneof![
        guest.clone().prop_map(|guest| Move::Grant { guest }),
        guest.clone().prop_map(|guest| Move::Withdraw { guest }),
        (guest.clone(), 0u32..4).prop_map(|(guest, generation)| Move::Enter { guest, generation }),
        guest.clone().prop_map(|guest| Move::Revoke { guest }),
        guest.clone().prop_map(|guest| Move::Force { guest }),
        guest.clone().prop_map(|guest| Move::Cancel { guest }),
        guest.clone().prop_map(|guest| Move::Park { guest }),
        guest.clone().prop_map(|guest| Move::Offline { guest }),
        guest.clone().prop_map(|guest| Move::Init { guest }),
        guest.prop_map(|guest| Move::Startup { guest }),
    ];
    // One core past the end: moves of a core that does not exist are refused.
    (0..=CORES_N, mv)
}

/// Runs `mv` through the manager's named operation (so the records are exercised too).
fn run(m: &CoreManager<CORES_N>, core: usize, mv: Move, now: u64) -> Result<(), Refused> {
    let (by, why) = (Requester::Hypervisor, Reason::Grant);
    match mv {
        Move::Grant { guest } => m.grant(core, guest, by, why, now).map(|_| ()),
        Move::Withdraw { guest } => m.withdraw(core, guest, by, Reason::Withdrawn, now),
        Move::Enter { guest, generation } => m.enter(core, guest, generation, now),
        Move::Revoke { guest } => m.revoke(core, guest, by, now),
        Move::Force { guest } => m.force(core, guest, by),
        Move::Cancel { guest } => m.cancel(core, guest, by),
        Move::Park { guest } => m.park(core, guest, Requester::Guest, Reason::Released, now),
        Move::Offline { guest } => m.offline(core, guest),
        Move::Init { guest } => m.init(core, guest),
        Move::Startup { guest } => m.startup(core, guest, now).map(|_| ()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_moves_keep_every_core_consistent(moves in prop::collection::vec(any_move(), 0..200)) {
        let m = CoreManager::<CORES_N>::new();
        for (step, &(core, mv)) in moves.iter().enumerate() {
            let before = m.word(core);
            let result = run(&m, core, mv, step as u64 + 1);
            let after = m.word(core);
            prop_assert!(after.is_consistent(), "{mv:?}: {after:?}");
            if core >= CORES_N {
                prop_assert_eq!(result, Err(Refused::NoCore));
                continue;
            }
            // A granted core (a new grant, or an offlined CPU) awaits a STARTUP IPI, which
            // starts it once: a STARTUP is taken exactly when one is awaited.
            if let Move::Startup { guest } = mv {
                let awaited = before.owner == Some(guest)
                    && before.state == CoreState::Granted
                    && before.awaits_startup;
                prop_assert_eq!(result.is_ok(), awaited, "{:?} {:?}", mv, before);
                prop_assert!(result.is_err() || !after.awaits_startup);
            }
            if result.is_ok() && matches!(mv, Move::Grant { .. } | Move::Offline { .. }) {
                prop_assert!(after.awaits_startup, "{:?}: {:?}", mv, after);
            }
            match result {
                // A refused move changes nothing.
                Err(_) => prop_assert_eq!(before, after),
                Ok(()) => {
                    // Owners change only through the hypervisor: never straight from one
                    // guest to another.
                    if let (Some(a), Some(b)) = (before.owner, after.owner) {
                        prop_assert_eq!(a, b, "{:?} moved a core between guests", mv);
                    }
                    // A new tenure has a new generation; nothing else changes it.
                    if matches!(mv, Move::Grant { .. }) {
                        prop_assert_eq!(after.generation, before.generation.wrapping_add(1));
                        prop_assert_eq!(m.record(core).unwrap().at(Stage::Granted), step as u64 + 1);
                    } else {
                        prop_assert_eq!(after.generation, before.generation);
                    }
                    if after.state == CoreState::Owned && before.state == CoreState::Granted {
                        prop_assert_eq!(m.record(core).unwrap().at(Stage::Entered), step as u64 + 1);
                    }
                }
            }
        }
        // The masks partition the cores among the guests.
        let masks: Vec<u64> = (0..GUESTS).map(|g| m.cores_of(g)).collect();
        for (i, a) in masks.iter().enumerate() {
            for b in &masks[i + 1..] {
                prop_assert_eq!(a & b, 0);
            }
            prop_assert_eq!(m.running_cores(i as u8) & !a, 0);
            for core in 0..=CORES_N {
                prop_assert_eq!(m.runs(core, i as u8), m.running_cores(i as u8) & 1 << core != 0);
            }
        }
        // Every state can be wound back: each owner parks its cores.
        for core in 0..CORES_N {
            if let Some(owner) = m.owner(core) {
                prop_assert!(m.park(core, owner, Requester::Guest, Reason::Stopped, 0).is_ok());
            }
            prop_assert_eq!(m.word(core).state, CoreState::Parked);
        }
    }
}

#[test]
fn a_start_for_a_withdrawn_grant_does_not_enter() {
    let m = CoreManager::<2>::new();
    let generation = m
        .grant(1, 0, Requester::Hypervisor, Reason::Grant, 10)
        .unwrap();
    assert_eq!(m.startup(1, 0, 20), Ok(generation));
    // The grant is withdrawn before the core takes the start, then given to guest 1.
    m.withdraw(1, 0, Requester::Hypervisor, Reason::Withdrawn, 30)
        .unwrap();
    m.grant(1, 1, Requester::Hypervisor, Reason::Grant, 40)
        .unwrap();
    assert_eq!(m.enter(1, 0, generation, 50), Err(Refused::NotOwner));
    assert_eq!(m.enter(1, 1, generation, 50), Err(Refused::StaleGrant));
    assert_eq!(m.enter(1, 1, generation + 1, 60), Ok(()));
    let record = m.record(1).unwrap();
    assert_eq!(record.generation, generation + 1);
    assert_eq!(record.between(Stage::Granted, Stage::Entered), 20);
    assert_eq!(
        record.at(Stage::Startup),
        0,
        "the old tenure's stamps are gone"
    );
}

#[test]
fn a_forced_release_is_seen_until_the_core_parks() {
    let m = CoreManager::<2>::new();
    let g = m.grant(0, 1, Requester::Config, Reason::Boot, 1).unwrap();
    m.enter(0, 1, g, 2).unwrap();
    assert_eq!(
        m.force(0, 1, Requester::Hypervisor),
        Err(Refused::WrongState(CoreState::Owned))
    );
    m.revoke(0, 1, Requester::Hypervisor, 3).unwrap();
    assert!(!m.force_requested(0));
    m.force(0, 1, Requester::Hypervisor).unwrap();
    assert!(m.force_requested(0));
    m.park(0, 1, Requester::Hypervisor, Reason::Deadline, 4)
        .unwrap();
    assert!(!m.force_requested(0));
    let record = m.record(0).unwrap();
    assert_eq!(
        (record.by, record.why),
        (Requester::Hypervisor, Reason::Deadline)
    );
    assert_eq!(record.between(Stage::Revoked, Stage::Parked), 1);
}

/// Threads racing grants, withdrawals, starts and parks on two cores: at the end, each
/// core's successful acquisitions and returns alternate, and its word agrees.
#[test]
fn racing_threads_never_share_a_core() {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    let m = Arc::new(CoreManager::<2>::new());
    let held: Arc<[[AtomicI64; 2]; 3]> = Arc::new(Default::default());
    let threads: Vec<_> = (0..3u8)
        .map(|guest| {
            let (m, held) = (m.clone(), held.clone());
            std::thread::spawn(move || {
                for i in 0..20_000usize {
                    let core = i % 2;
                    let by = Requester::Hypervisor;
                    if m.grant(core, guest, by, Reason::Grant, 0).is_ok() {
                        held[usize::from(guest)][core].fetch_add(1, Ordering::SeqCst);
                    }
                    let w = m.word(core);
                    if w.owner == Some(guest) {
                        let _ = m.enter(core, guest, w.generation, 0);
                        if m.park(core, guest, by, Reason::Released, 0).is_ok() {
                            held[usize::from(guest)][core].fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for core in 0..2 {
        let holders: Vec<u8> = (0..3u8)
            .filter(|&g| held[usize::from(g)][core].load(Ordering::SeqCst) != 0)
            .collect();
        assert!(holders.len() <= 1, "core {core} held by {holders:?}");
        assert_eq!(holders.first().copied(), m.owner(core));
        for g in 0..3 {
            assert!((0..=1).contains(&held[g][core].load(Ordering::SeqCst)));
        }
    }
}

#[test]
fn a_stage_stamp_is_read_alone_until_the_next_grant_clears_it() {
    let m = CoreManager::<CORES_N>::new();
    m.grant(1, 0, Requester::Hypervisor, Reason::Grant, 10)
        .unwrap();
    m.startup(1, 0, 20).unwrap();
    m.enter(1, 0, 1, 30).unwrap();
    m.revoke(1, 0, Requester::Hypervisor, 40).unwrap();
    m.stamp(1, Stage::ReleaseCalled, 45);
    m.park(1, 0, Requester::Guest, Reason::Released, 50)
        .unwrap();
    // What a move reads of the tenure that ended, before it grants the core again.
    assert_eq!(m.stamp_of(1, Stage::Revoked), 40);
    assert_eq!(m.stamp_of(1, Stage::ReleaseCalled), 45);
    assert_eq!(m.stamp_of(1, Stage::Parked), 50);
    assert_eq!(
        m.stamp_of(1, Stage::Parked),
        m.record(1).unwrap().at(Stage::Parked)
    );
    m.grant(1, 2, Requester::Hypervisor, Reason::Grant, 60)
        .unwrap();
    assert_eq!(m.stamp_of(1, Stage::Parked), 0);
    assert_eq!(m.stamp_of(1, Stage::Granted), 60);
    // A core that does not exist has no stamps.
    assert_eq!(m.stamp_of(CORES_N, Stage::Granted), 0);
}
