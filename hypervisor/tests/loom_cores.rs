//! Model check of the core manager's compare-and-swap word under every interleaving loom
//! finds: run with `RUSTFLAGS="--cfg loom" cargo test -p hypervisor --release --test
//! loom_cores` (`cargo xtask test` does).
#![cfg(loom)]

use hypervisor::cores::{CoreManager, IpiSenders, Reason, Refused, Requester, WakeFlag};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
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

/// A sender posts a request to a parked core's mailbox and wakes it if it sleeps, while the
/// core goes to sleep (`WakeFlag`). The core always sees the request; the sender sends at
/// most one wake IPI; and every IPI sent is one the core knows it is owed, so that it takes
/// it before it enters a guest. `halt_waits`: the core's halt ends only with the IPI; or it
/// ends at once (an NMI or another interrupt woke it), and the core looks again.
fn post_and_sleep_race(halt_waits: bool) {
    loom::model(move || {
        let flag = Arc::new(WakeFlag::new());
        let posted = Arc::new(AtomicBool::new(false));
        let ipis_sent = Arc::new(AtomicUsize::new(0));
        let sender = {
            let (flag, posted, ipis_sent) = (flag.clone(), posted.clone(), ipis_sent.clone());
            thread::spawn(move || {
                posted.store(true, SeqCst);
                if flag.take() {
                    ipis_sent.fetch_add(1, SeqCst);
                }
            })
        };
        let mut owed = 0;
        loop {
            flag.raise();
            if !posted.load(SeqCst) && halt_waits {
                // Halted: the flag was up at the last look, so a sender will take it.
                while ipis_sent.load(SeqCst) == 0 {
                    thread::yield_now();
                }
            }
            if flag.lower() {
                owed += 1;
            }
            if posted.load(SeqCst) {
                break;
            }
            thread::yield_now();
        }
        sender.join().unwrap();
        assert_eq!(
            ipis_sent.load(SeqCst),
            owed,
            "an IPI sent but not owed, or owed but not sent"
        );
        assert!(owed <= 1);
    });
}

#[test]
fn a_sleeping_core_sees_its_request_and_owes_every_wake_ipi() {
    post_and_sleep_race(true);
}

#[test]
fn a_core_woken_by_something_else_still_owes_every_wake_ipi() {
    post_and_sleep_race(false);
}

/// A guest sends an IPI to a core of its own while the core leaves it for the other guest.
/// The sender checks that the core runs its vCPU, then checks again and sends counted among
/// the core's senders (`IpiSenders`); the core parks, waits for its senders, cleans its APIC,
/// is granted to the other guest and enters it. The IPI is written before the clean-up, which
/// takes it, or not at all: it never reaches the other guest.
#[test]
fn an_interrupt_for_a_guest_never_reaches_the_next_one() {
    loom::model(|| {
        let m = Arc::new(CoreManager::<1>::new());
        let senders = Arc::new(IpiSenders::new());
        // Guest 0's interrupt, pending in the core's APIC.
        let pending = Arc::new(AtomicBool::new(false));
        let generation = m.grant(0, 0, BY, Reason::Grant, 1).unwrap();
        m.startup(0, 0, 2).unwrap();
        m.enter(0, 0, generation, 3).unwrap();
        let sender = {
            let (m, senders, pending) = (m.clone(), senders.clone(), pending.clone());
            thread::spawn(move || {
                if m.runs(0, 0) {
                    senders.send(|| {
                        let runs = m.runs(0, 0);
                        if runs {
                            pending.store(true, SeqCst);
                        }
                        runs
                    });
                }
            })
        };
        m.park(0, 0, BY, Reason::Released, 4).unwrap();
        senders.wait_until_sent();
        pending.store(false, SeqCst);
        let generation = m.grant(0, 1, BY, Reason::Grant, 5).unwrap();
        m.startup(0, 1, 6).unwrap();
        m.enter(0, 1, generation, 7).unwrap();
        sender.join().unwrap();
        assert!(
            !pending.load(SeqCst),
            "guest 0's interrupt was sent after the core's clean-up"
        );
    });
}
