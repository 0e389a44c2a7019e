//! Core-allocation policies: pure decision functions over what the hypervisor observes
//! (per-core idle time and exit rates, the guests' load reports) that name at most one core
//! move at a time, with its reason and the inputs it was decided on. Host-tested
//! (`cargo test -p hypervisor`, with recorded load traces in `tests.rs`); the bare-metal
//! engine (`policy_engine`) samples the machine, calls [`Policy::decide`] and carries the
//! decision out through the core manager, as any other move.
//!
//! Every policy keeps the same bounds ([`Bounds`]): a guest never loses its boot core, never
//! holds a core outside its allowed set, and holds `min_cores..=max_cores` once the policy
//! moves its cores; and the same damping ([`Damper`]): a move may have to be proposed in
//! several consecutive rounds, a core that reached a guest stays there for [`CORE_HOLD_US`]
//! (so no load, steady or not, takes a core from a guest more than once per hold), a guest
//! that just gained or lost a core waits a little before the next move, and a core whose
//! revoke its owner declined is left alone for a while.
//!
//! * `static` never moves a core (the boot partition is the baseline).
//! * `autonomous` ([`autonomous`]) wants for each guest as many cores as its measured busy
//!   time needs, with a band between growing and shrinking.
//! * `cooperative` ([`cooperative`]) wants what each guest's last report asks for.
//!
//! Both then share the cores out the same way ([`targets`]): wants within the bounds when
//! they fit; when they do not, each guest gets its minimum and the rest in proportion to
//! what it wants beyond it, so a guest that claims more than it uses gets no more than its
//! maximum and its share. And both move the same way ([`first_move`]): a guest below its
//! target takes a core from the pool or from a guest above its target; a core a guest holds
//! beyond its target that no guest below its target may take goes back to the hypervisor's
//! pool ([`Why::Unwanted`], a `Decision` whose `to` is `None`), so it is not left granted
//! and idle, and the next guest that asks gets it from the pool without a revoke. Going back
//! to the pool starts no hold and no cool-down: the guest that released a core has it back
//! at its next request (Lavender's next job, within a sampling period),
//! while the hold on the core's arrival still keeps a square-wave load to one release per
//! hold. A core its holder gave up of its own accord (to the pool, or offered to a guest
//! that asked) is lent, and goes back to that guest at its next request whatever the hold
//! on its arrival (see [`Damper`]). Lavender releases once it has offered a core for 10 ms
//! ([`RELEASE_AFTER_LAVENDER_US`]);
//! Linux, whose offline and online cost it tens of milliseconds, only after a second of
//! offering it ([`RELEASE_AFTER_LINUX_US`]). Autonomous releases as cooperative does, from
//! what it measures, so the two differ by what they know of the guests, not by what they
//! may do with a core: cooperative also hears when an offer is final ([`Report::final_offer`]:
//! the guest's work that ran on the core ended) and releases such a core without the wait.

pub mod autonomous;
pub mod cooperative;
#[cfg(test)]
mod tests;

use heapless::Vec;

pub use crate::partition::PolicyName;
use crate::partition::MAX_GUESTS;

/// A guest's load as the hypervisor measured it over the last sampling period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Busy time summed over the cores it held, per-mille of one core (2000 = two cores busy).
    pub busy_sum: u32,
    /// Cores that were sampled.
    pub cores: u8,
    /// VM exits per millisecond over its cores.
    pub exits_per_ms: u32,
    /// Mean busy per-mille of its cores over about the last [`RECENT_US`]: an exponential
    /// mean of the sampling periods' means ([`Measured::after`]). A period is short enough
    /// for a busy guest's cores to idle through it (threads waiting at a barrier); this is
    /// what a guest's claim to keep its cores is checked against.
    pub recent_busy_permille: u16,
}

/// The time constant of [`Measured::recent_busy_permille`] (µs).
pub const RECENT_US: u64 = 50_000;

impl Measured {
    /// Mean busy per-mille of its cores.
    pub fn busy_mean(&self) -> u16 {
        (self.busy_sum / u32::from(self.cores.max(1))).min(1000) as u16
    }

    /// This period's measurement with its recent mean: `before`'s moved toward this
    /// period's busy mean by the share of [`RECENT_US`] the period lasted (`window_us`);
    /// this period's mean alone when nothing was measured before.
    pub fn after(self, before: &Measured, window_us: u64) -> Self {
        let now = i64::from(self.busy_mean());
        let recent = if before.cores == 0 {
            now
        } else {
            let old = i64::from(before.recent_busy_permille);
            old + (now - old) * window_us.min(RECENT_US) as i64 / RECENT_US as i64
        };
        Self {
            recent_busy_permille: recent.clamp(0, 1000) as u16,
            ..self
        }
    }
}

/// What the guest said about its workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hint {
    #[default]
    Unknown,
    Compute,
    IoBound,
}

impl Hint {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Compute => "compute",
            Self::IoBound => "io",
        }
    }
}

/// A guest's last load report (its control channel), as the cooperative policy reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// When it arrived (µs since boot).
    pub at_us: u64,
    pub runnable: u32,
    /// Busy per-mille summed over the cores it reported.
    pub busy_sum: u32,
    pub cores: u8,
    /// Cores it asks to gain (positive) or offers (negative).
    pub request: i16,
    /// Since when its reports have made this request (µs since boot): the report where its
    /// load stepped across its core count.
    pub request_since_us: u64,
    pub hint: Hint,
    /// None of its live work can use the cores it offers (the work that ran on them ended):
    /// they may go back to the pool at once (see [`cooperative`]).
    pub final_offer: bool,
}

/// One guest as a policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestView {
    pub id: u8,
    pub bounds: Bounds,
    /// Cores it runs on now.
    pub held: u64,
    pub measured: Measured,
    pub report: Option<Report>,
    /// How long it must have held cores beyond its target, with no guest wanting them,
    /// before one goes back to the hypervisor's pool (µs): what giving a core up and taking
    /// it back costs the guest ([`RELEASE_AFTER_LAVENDER_US`], [`RELEASE_AFTER_LINUX_US`]).
    pub release_after_us: u64,
}

impl GuestView {
    pub fn held_count(&self) -> u8 {
        self.held.count_ones() as u8
    }
}

/// What the partition configuration allows a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub boot_core: usize,
    /// Cores it may ever hold (bit mask).
    pub allowed: u64,
    pub min: u8,
    pub max: u8,
}

impl Bounds {
    /// Whether `core` may leave a guest that holds `held` cores.
    fn may_give(&self, core: usize, held: u8) -> bool {
        core != self.boot_core && held > self.min
    }

    /// Whether `core` may join a guest that holds `held` cores.
    fn may_take(&self, core: usize, held: u8) -> bool {
        self.allowed & (1 << core) != 0 && held < self.max
    }
}

/// Everything a decision is made on.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    pub now_us: u64,
    /// Cores parked in the hypervisor's pool (a policy may grant them).
    pub free: u64,
    pub guests: &'a [GuestView],
}

/// Why a policy moved a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Autonomous: the receiver's cores were busy and the giver's idle.
    BusiestFromIdlest,
    /// Cooperative: the receiver asked for cores and the giver offered or had spare ones.
    Requested,
    /// Cooperative: both want more than there is; the cores follow each one's share.
    FairShare,
    /// The receiver held fewer cores than its minimum.
    BelowMinimum,
    /// The giver held the core beyond its target and no guest wanted it: it goes back to the
    /// hypervisor's pool.
    Unwanted,
}

impl Why {
    pub fn name(self) -> &'static str {
        match self {
            Self::BusiestFromIdlest => "busiest_from_idlest",
            Self::Requested => "requested",
            Self::FairShare => "fair_share",
            Self::BelowMinimum => "below_minimum",
            Self::Unwanted => "unwanted",
        }
    }
}

/// What one side of a move looked like when it was decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side {
    pub held: u8,
    /// The load the policy read: measured busy (autonomous) or reported busy (cooperative),
    /// mean per-mille over the guest's cores.
    pub busy_permille: u16,
    pub runnable: u32,
    pub exits_per_ms: u32,
    /// How many cores the policy read that it wants.
    pub wants: u8,
    /// How many it should hold after the arbitration.
    pub target: u8,
    /// When the guest's report the policy read arrived (µs since boot; 0: none read).
    pub report_at_us: u64,
    /// Since when that guest's reports made their current request (µs since boot; 0: no
    /// report): the load step a move answers, for either policy.
    pub request_since_us: u64,
    /// The report the policy read said its offer is final ([`Report::final_offer`]; only
    /// `cooperative` reads it).
    pub final_offer: bool,
}

/// One core move a policy decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub policy: PolicyName,
    pub core: usize,
    /// `None`: the core comes from the hypervisor's pool.
    pub from: Option<u8>,
    /// `None`: the core goes back to the hypervisor's pool.
    pub to: Option<u8>,
    pub why: Why,
    pub giver: Side,
    pub taker: Side,
    pub at_us: u64,
}

/// How a decided move ended, as the policy must hear it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveOutcome {
    Done,
    /// The owner kept the core (it declined the revoke, or missed the deadline and the
    /// revoke was called off).
    Declined,
    /// Anything else (the target did not start the core; the core changed hands).
    Failed,
}

/// A core-allocation policy.
pub trait Policy {
    fn name(&self) -> PolicyName;
    /// At most one move, from what is observed now.
    fn decide(&mut self, seen: &Observation) -> Option<Decision>;
    /// How the last decided move ended.
    fn outcome(&mut self, decision: &Decision, outcome: MoveOutcome, now_us: u64);
    /// Whether a move is proposed but not yet confirmed (the engine asks again each period).
    fn pending(&self) -> bool {
        false
    }
}

/// `static`: the boot partition, never changed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Static;

impl Policy for Static {
    fn name(&self) -> PolicyName {
        PolicyName::Static
    }

    fn decide(&mut self, _: &Observation) -> Option<Decision> {
        None
    }

    fn outcome(&mut self, _: &Decision, _: MoveOutcome, _: u64) {}
}

/// The policy in force: one of the three, switched at run time.
pub enum Active {
    Static(Static),
    Autonomous(autonomous::Autonomous),
    Cooperative(cooperative::Cooperative),
}

impl Active {
    /// A fresh policy (no history: the first decision follows the first observation that
    /// holds long enough).
    pub fn new(name: PolicyName) -> Self {
        match name {
            PolicyName::Static => Self::Static(Static),
            PolicyName::Autonomous => Self::Autonomous(autonomous::Autonomous::default()),
            PolicyName::Cooperative => Self::Cooperative(cooperative::Cooperative::default()),
        }
    }

    pub fn policy(&mut self) -> &mut dyn Policy {
        match self {
            Self::Static(p) => p,
            Self::Autonomous(p) => p,
            Self::Cooperative(p) => p,
        }
    }
}

/// How many cores guests may share out: those they hold and the free ones some guest may
/// hold.
fn usable_cores(seen: &Observation) -> u8 {
    let held = seen.guests.iter().fold(0u64, |m, g| m | g.held);
    let allowed = seen.guests.iter().fold(0u64, |m, g| m | g.bounds.allowed);
    (held | (seen.free & allowed)).count_ones() as u8
}

/// How many cores each guest should hold, given what each wants: its want within its
/// bounds when all wants fit in `cores`; otherwise its minimum plus a share of the rest in
/// proportion to what it wants beyond its minimum (largest remainder; a tie goes to the
/// guest holding more now, so a balanced contest moves nothing).
pub fn targets(guests: &[GuestView], wants: &[u8], cores: u8) -> Vec<u8, MAX_GUESTS> {
    let clamped: Vec<u8, MAX_GUESTS> = guests
        .iter()
        .zip(wants)
        .map(|(g, &w)| w.clamp(g.bounds.min, g.bounds.max))
        .collect();
    let total: u32 = clamped.iter().map(|&w| u32::from(w)).sum();
    if total <= u32::from(cores) {
        return clamped;
    }
    let mins: u32 = guests.iter().map(|g| u32::from(g.bounds.min)).sum();
    let rest = u32::from(cores).saturating_sub(mins);
    let extra: Vec<u32, MAX_GUESTS> = guests
        .iter()
        .zip(&clamped)
        .map(|(g, &w)| u32::from(w - g.bounds.min))
        .collect();
    let weight: u32 = extra.iter().sum::<u32>().max(1);
    let mut out: Vec<u8, MAX_GUESTS> = guests
        .iter()
        .zip(&extra)
        .map(|(g, &e)| g.bounds.min + (rest * e / weight) as u8)
        .collect();
    let mut left = rest - extra.iter().map(|&e| rest * e / weight).sum::<u32>();
    while left > 0 {
        // The largest remainder still below its want; ties to the larger holder.
        let next = (0..guests.len())
            .filter(|&i| out[i] < clamped[i])
            .max_by_key(|&i| ((rest * extra[i]) % weight, guests[i].held_count()));
        let Some(i) = next else { break };
        out[i] += 1;
        left -= 1;
    }
    out
}

/// A move [`first_move`] found: the core, its giver (`None`: the pool) and its taker (an
/// index into the observation's guests; `None`: the pool).
pub type Found = (usize, Option<u8>, Option<usize>);

/// The first move that brings holdings toward `targets`: the guest furthest below its
/// target takes a free core it may hold, or else one from the guest furthest above its
/// target (never a boot core, never below the giver's minimum, never beyond the taker's
/// maximum or outside its allowed set, never a core `blocked` says to leave alone, asked with
/// the guest it asks about and the move's taker, `None` for the pool). When no
/// guest below its target may take a core that a guest holds beyond its target, that core
/// goes back to the pool, from the guest furthest above its target among those
/// `may_release` lets give one up (by index): a core nobody wants is not left granted and
/// idle, and the next guest that asks gets it from the pool without a revoke.
pub fn first_move(
    seen: &Observation,
    targets: &[u8],
    blocked: impl Fn(usize, u8, Option<u8>) -> bool,
    may_release: impl Fn(usize) -> bool,
) -> Option<Found> {
    let gap = |i: usize| i32::from(targets[i]) - i32::from(seen.guests[i].held_count());
    let mut takers: Vec<usize, MAX_GUESTS> =
        (0..seen.guests.len()).filter(|&i| gap(i) > 0).collect();
    takers.sort_unstable_by_key(|&i| core::cmp::Reverse(gap(i)));
    let mut givers: Vec<usize, MAX_GUESTS> =
        (0..seen.guests.len()).filter(|&i| gap(i) < 0).collect();
    givers.sort_unstable_by_key(|&i| gap(i));
    for &t in &takers {
        let taker = &seen.guests[t];
        let may_take = |core: usize| {
            taker.bounds.may_take(core, taker.held_count())
                && !blocked(core, taker.id, Some(taker.id))
        };
        if let Some(core) = cores(seen.free).find(|&c| may_take(c)) {
            return Some((core, None, Some(t)));
        }
        for &g in &givers {
            let giver = &seen.guests[g];
            let core = cores(giver.held).find(|&c| {
                giver.bounds.may_give(c, giver.held_count())
                    && may_take(c)
                    && !blocked(c, giver.id, Some(taker.id))
            });
            if let Some(core) = core {
                return Some((core, Some(giver.id), Some(t)));
            }
        }
    }
    // A taker kept back only by damping gets the core from its holder when that ends.
    let wanted = |core: usize| {
        takers.iter().any(|&t| {
            let taker = &seen.guests[t];
            taker.bounds.may_take(core, taker.held_count())
        })
    };
    for &g in givers.iter().filter(|&&g| may_release(g)) {
        let giver = &seen.guests[g];
        let core = cores(giver.held).find(|&c| {
            giver.bounds.may_give(c, giver.held_count())
                && !wanted(c)
                && !blocked(c, giver.id, None)
        });
        if let Some(core) = core {
            return Some((core, Some(giver.id), None));
        }
    }
    None
}

fn cores(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |c| mask & (1 << c) != 0)
}

/// How long a core that reached a guest stays with it before any policy moves it again
/// (µs): whatever the load does, a core leaves a guest (to another guest or to the pool) at
/// most once per this time. A core in the pool is not held: going back to the pool starts
/// no hold, so the core may come back from there to the guest that released it (or go to
/// another guest) at once.
pub const CORE_HOLD_US: u64 = 100_000;

/// [`GuestView::release_after_us`] for Lavender: 10 ms. Lavender gives a core up in tens of
/// microseconds and takes one from the pool as fast, so a core it offers for 10 ms goes
/// back to the pool and comes back at its next request to grow, within a sampling period.
/// A shorter gap is not worth it: a job that sleeps a few milliseconds between rounds
/// (whose steadied offer stands through each sleep, `vmcall_proto::demand`) would send the
/// core to the pool and back every hold for no other guest's gain, while 10 ms is a fifth
/// of a delegated-I/O phase of some 45 ms (the `hpc` workload under Bochs).
pub const RELEASE_AFTER_LAVENDER_US: u64 = 10_000;

/// [`GuestView::release_after_us`] for Linux: a second. Linux takes some 15 ms (virtual
/// time under Bochs) to offline a CPU and 10 ms to online one; an idle Linux CPU halts and
/// costs nothing but being in the way of a guest that would take it, which then waits for
/// the offline. A CPU given up after a second of idling costs Linux at most some 2.5% of
/// that second should its load come back, and the next guest that asks gets the core from
/// the pool at once.
pub const RELEASE_AFTER_LINUX_US: u64 = 1_000_000;

/// Damping shared by the policies: a move is made only once the same move was proposed
/// `confirm` rounds in a row; a core that reached a guest is not moved again for
/// [`CORE_HOLD_US`]; no core moves into or out of a guest within `cooldown_us` of its last
/// move to or from another guest or from the pool (a release to the pool starts none, so the
/// guest that released a core may have it back at its next request); a core whose owner
/// declined a revoke is not asked again for `decline_us`; a guest gives a core back to the
/// pool only once it has held cores beyond both its target and what it keeps by its own
/// account for its [`GuestView::release_after_us`]; the hold does not keep a lent core from
/// its lender.
#[derive(Clone, Debug)]
pub struct Damper {
    confirm: u8,
    cooldown_us: u64,
    decline_us: u64,
    /// (core, giver, taker id; `None`: the pool).
    proposed: Option<(usize, Option<u8>, Option<u8>)>,
    streak: u8,
    last_move_us: [Option<u64>; MAX_GUESTS],
    /// (core, when it last reached a guest (µs), the guest that lent it, if it was lent: see
    /// [`Damper::outcome`]).
    core_moved: Vec<(usize, u64, Option<u8>), 8>,
    /// (core in the pool, the guest that gave it back).
    released_by: Vec<(usize, u8), 8>,
    /// (core, owner, until µs).
    declined: Vec<(usize, u8, u64), 8>,
    /// Per guest: since when it has held cores beyond its target and what it keeps (µs), as
    /// the rounds saw.
    over_since: [Option<u64>; MAX_GUESTS],
    /// The last round wanted a move that only a hold, a cool-down or a release's wait
    /// ([`GuestView::release_after_us`]) kept back.
    held_back: bool,
}

impl Damper {
    pub const fn new(confirm: u8, cooldown_us: u64, decline_us: u64) -> Self {
        Self {
            confirm,
            cooldown_us,
            decline_us,
            proposed: None,
            streak: 0,
            last_move_us: [None; MAX_GUESTS],
            core_moved: Vec::new(),
            released_by: Vec::new(),
            declined: Vec::new(),
            over_since: [None; MAX_GUESTS],
            held_back: false,
        }
    }

    /// Whether `core` must be left alone by guest `guest` (giving or taking) now, in a move
    /// whose taker is `taker` (`None`: the pool).
    pub fn blocked(&self, core: usize, guest: u8, taker: Option<u8>, now_us: u64) -> bool {
        self.waiting(core, guest, taker, now_us) || self.was_declined(core, guest, now_us)
    }

    /// Whether a hold or a cool-down, which end by themselves, keep `core` and `guest` apart
    /// in a move to `taker`. The hold does not keep a lent core from its lender: a guest that
    /// gave a core up of its own accord (back to the pool, or offered to a guest that asked,
    /// [`Why::Requested`]) has it back at its next request, once the cool-down allows. A
    /// guest gives a core up at most once per hold (the hold on the core's arrival), and a
    /// lent core that comes back is not lent again, so a lent core comes back at most once
    /// per hold too.
    fn waiting(&self, core: usize, guest: u8, taker: Option<u8>, now_us: u64) -> bool {
        let cooling = self
            .last_move_us
            .get(usize::from(guest))
            .copied()
            .flatten()
            .is_some_and(|at| now_us.saturating_sub(at) < self.cooldown_us);
        let holding = self.core_moved.iter().any(|&(c, at, lender)| {
            c == core
                && now_us.saturating_sub(at) < CORE_HOLD_US
                && (lender.is_none() || lender != taker)
        });
        cooling || holding
    }

    fn was_declined(&self, core: usize, guest: u8, now_us: u64) -> bool {
        self.declined
            .iter()
            .any(|&(c, g, until)| c == core && g == guest && now_us < until)
    }

    /// The first move toward `targets` that no damping keeps back; remembers whether one
    /// was kept back only by a hold, a cool-down or a release's wait (see
    /// [`Damper::pending`]). `keeps`: per
    /// guest, the cores it keeps by its own account (what it asks for itself, before any
    /// check the arbitration makes of a claim): a core goes back to the pool only when the
    /// guest holds more than that as well as more than its target, so a claim the
    /// arbitration discounts may lose a contested core but never sends an uncontested one
    /// to the pool and back at the guest's next report.
    pub fn first_move(
        &mut self,
        seen: &Observation,
        targets: &[u8],
        keeps: &[u8],
    ) -> Option<Found> {
        let now = seen.now_us;
        for ((guest, &target), &keep) in seen.guests.iter().zip(targets).zip(keeps) {
            if let Some(since) = self.over_since.get_mut(usize::from(guest.id)) {
                *since = (guest.held_count() > target.max(keep)).then(|| since.unwrap_or(now));
            }
        }
        let may_release = |i: usize| {
            let guest = &seen.guests[i];
            self.over_since
                .get(usize::from(guest.id))
                .copied()
                .flatten()
                .is_some_and(|since| now.saturating_sub(since) >= guest.release_after_us)
        };
        let found = first_move(
            seen,
            targets,
            |core, guest, taker| self.blocked(core, guest, taker, now),
            may_release,
        );
        // Kept back by a hold or a cool-down, or by the time a release waits for: the
        // release may be due before the guest's next report.
        self.held_back = found.is_none()
            && first_move(
                seen,
                targets,
                |core, guest, _| self.was_declined(core, guest, now),
                |_| true,
            )
            .is_some();
        found
    }

    /// Counts this round's proposal (the move [`Damper::first_move`] found, if any); whether
    /// it has been proposed enough rounds to act on.
    pub fn confirmed(&mut self, seen: &Observation, found: Option<Found>) -> bool {
        let proposal =
            found.map(|(core, from, taker)| (core, from, taker.map(|t| seen.guests[t].id)));
        if proposal.is_some() && proposal == self.proposed {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.proposed = proposal;
            self.streak = u8::from(proposal.is_some());
        }
        proposal.is_some() && self.streak >= self.confirm
    }

    /// Whether a proposal waits for more rounds, or a wanted move for a hold or a cool-down
    /// to end (the engine looks again each sampling period meanwhile).
    pub fn pending(&self) -> bool {
        self.proposed.is_some() || self.held_back
    }

    /// Notes how a decided move ended.
    pub fn outcome(&mut self, decision: &Decision, outcome: MoveOutcome, now_us: u64) {
        self.proposed = None;
        self.streak = 0;
        match outcome {
            // Back to the pool: no hold and no cool-down (see [`CORE_HOLD_US`]).
            MoveOutcome::Done if decision.to.is_none() => {
                if let Some(from) = decision.from {
                    self.released_by.retain(|&(c, _)| c != decision.core);
                    if self.released_by.is_full() {
                        self.released_by.remove(0);
                    }
                    let _ = self.released_by.push((decision.core, from));
                }
            }
            MoveOutcome::Done => {
                // Lent: the core left a guest that gave it up of its own accord (back to the
                // pool, then taken by another guest; or offered and moved at another guest's
                // request) and reached another guest. A lent core that goes back to its
                // lender is not lent again.
                let returning = self.core_moved.iter().any(|&(c, _, lender)| {
                    c == decision.core && lender.is_some() && lender == decision.to
                });
                let lender = match decision.from {
                    None => self
                        .released_by
                        .iter()
                        .find(|&&(c, _)| c == decision.core)
                        .map(|&(_, g)| g)
                        .filter(|&g| Some(g) != decision.to),
                    Some(giver) if decision.why == Why::Requested && !returning => Some(giver),
                    Some(_) => None,
                };
                self.released_by.retain(|&(c, _)| c != decision.core);
                for guest in decision.from.into_iter().chain(decision.to) {
                    if let Some(at) = self.last_move_us.get_mut(usize::from(guest)) {
                        *at = Some(now_us);
                    }
                }
                self.core_moved.retain(|&(c, at, _)| {
                    c != decision.core && now_us.saturating_sub(at) < CORE_HOLD_US
                });
                if self.core_moved.is_full() {
                    self.core_moved.remove(0);
                }
                let _ = self.core_moved.push((decision.core, now_us, lender));
            }
            MoveOutcome::Declined => {
                if let Some(owner) = decision.from {
                    self.declined.retain(|&(_, _, until)| until > now_us);
                    if self.declined.is_full() {
                        self.declined.remove(0);
                    }
                    let _ = self
                        .declined
                        .push((decision.core, owner, now_us + self.decline_us));
                }
            }
            MoveOutcome::Failed => {}
        }
    }
}

/// Builds the decision for a move found by [`first_move`].
fn decision(
    policy: PolicyName,
    seen: &Observation,
    found: Found,
    why: Why,
    side: impl Fn(usize) -> Side,
) -> Decision {
    let (core, from, taker) = found;
    let giver = from
        .and_then(|id| seen.guests.iter().position(|g| g.id == id))
        .map(&side)
        .unwrap_or_default();
    Decision {
        policy,
        core,
        from,
        to: taker.map(|t| seen.guests[t].id),
        why,
        giver,
        taker: taker.map(&side).unwrap_or_default(),
        at_us: seen.now_us,
    }
}
