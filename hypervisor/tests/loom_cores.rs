//! Model check of the core manager's compare-and-swap word under every interleaving loom
//! finds: run with `RUSTFLAGS="--cfg loom" cargo test -p hypervisor --release --test
//! loom_cores` (`cargo xtask test` does).
#![cfg(loom)]

use hypervisor::cores::{CoreManager, Reason, Refused, Requester};
use loom::sync::Arc;
use loom::thread;

const BY: Requester = Requester::Hypervisor;

/// Two guests' grants race for one parked core: exactly one wins, and the core is its.
#[test]
fn racing_grants_have_one_winner() {
    loom::model(|| {
        let m = Arc::new(CoreManager::<1>::new());
        let other = {
            let m = m.clone();
            thread::spawn(move || m.grant(0, 1, BY, Reason::Grant, 1).is_ok())
        };
        let mine = m.grant(0, 0, BY, Reason::Grant, 1).is_ok();
        let theirs = other.join().unwrap();
        assert!(mine != theirs, "both or neither grant won");
        assert_eq!(m.owner(0), Some(if mine { 0 } else { 1 }));
    });
}

/// A STARTUP IPI (the only one a granted core needs) and the core's entry race a
/// withdrawal of the grant: either the vCPU enters (and the withdrawal is refused) or the
/// grant is withdrawn (and the entry is refused), never both.
#[test]
fn a_withdrawn_grant_is_never_entered() {
    loom::model(|| {
        let m = Arc::new(CoreManager::<1>::new());
        let generation = m.grant(0, 0, BY, Reason::Grant, 1).unwrap();
        let starter = {
            let m = m.clone();
            thread::spawn(move || m.startup(0, 0, 2).and_then(|g| m.enter(0, 0, g, 3)).is_ok())
        };
        let withdrawn = m.withdraw(0, 0, BY, Reason::Withdrawn, 4).is_ok();
        let entered = starter.join().unwrap();
        assert!(entered != withdrawn);
        let word = m.word(0);
        assert!(word.is_consistent());
        assert_eq!(word.owner.is_some(), entered);
        // A new grant after a withdrawal makes the old start stale.
        if withdrawn {
            m.grant(0, 0, BY, Reason::Grant, 5).unwrap();
            assert_eq!(m.enter(0, 0, generation, 6), Err(Refused::StaleGrant));
        }
    });
}

/// A forced release races the guest's own release: the core ends parked either way and
/// the force flag never outlives the tenure.
#[test]
fn force_and_release_race() {
    loom::model(|| {
        let m = Arc::new(CoreManager::<1>::new());
        let g = m.grant(0, 0, BY, Reason::Grant, 1).unwrap();
        m.enter(0, 0, g, 2).unwrap();
        m.revoke(0, 0, BY, 3).unwrap();
        let forcer = {
            let m = m.clone();
            thread::spawn(move || {
                let _ = m.force(0, 0, BY);
            })
        };
        m.park(0, 0, Requester::Guest, Reason::Released, 4).unwrap();
        forcer.join().unwrap();
        assert!(!m.force_requested(0));
        assert!(m.word(0).is_consistent());
    });
}
