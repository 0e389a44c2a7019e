//! A virtual CPU: one guest running on one physical core. Sets up the VMCS, enters the
//! guest, and handles each VM exit on purpose (see `exits`); anything unexpected stops
//! that guest with a diagnostic and parks the core, never the hypervisor.

pub mod doorbell;
mod exits;
mod hypercalls;
pub mod ioapic_access;
pub mod mailbox;
mod scrub;
pub mod setup;

use log::{error, info};
use vmcall_proto::hypercall::{CoreState, Wake};

use crate::arch::cpu;
use crate::arch::descriptors::HostTables;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::{self, CPUS};
use crate::arch::vmx::VmxRegion;
use crate::arch::vmx::{self, FixedBits, GuestRegisters};
use crate::console;
use crate::cores::{Reason, Refused, Requester, Stage, CORES};
use crate::guest::{self, Guest, GuestState};
use crate::partition::{ViolationPolicy, MAX_GUESTS};
use crate::platform::MAX_CPUS;
use crate::vmx::caps::VmxCapabilityMsrs;
use crate::vmx::exit::ExitReason;
use crate::vmx::vmcs::{entry, VmcsField as F};
use mailbox::{Start, StartRequest};
use setup::SetupError;

/// What to do after an exit was handled.
pub enum Next {
    Resume,
    /// Leave the guest on this core, for this reason.
    Park(End),
}

/// Why a vCPU stopped running on its core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest handed the core back (`CORE_RELEASE`, which parked the core), asking for
    /// `wake` once the core is scrubbed.
    Released { wake: Option<Wake> },
    /// The guest missed its release deadline and the hypervisor took the core.
    ForcedOff,
    /// The guest halted with interrupts disabled on its last running core.
    Halted,
    /// This vCPU halted with interrupts disabled while others of its guest run: the core
    /// stays the guest's, awaiting a STARTUP IPI (an offlined Linux CPU).
    Offline,
    /// The hypervisor stopped the guest (violation, unexpected exit, broken state).
    Stopped,
    /// The grant was withdrawn before the vCPU entered: the core is not the guest's.
    GrantWithdrawn,
}

impl End {
    /// Who ended the tenure, and why, for the core's move record.
    fn cause(self) -> (Requester, Reason) {
        match self {
            End::Released { .. } => (Requester::Guest, Reason::Released),
            End::ForcedOff => (Requester::Hypervisor, Reason::Deadline),
            End::Halted | End::Offline => (Requester::Guest, Reason::Halted),
            End::Stopped | End::GrantWithdrawn => (Requester::Hypervisor, Reason::Stopped),
        }
    }
}

pub struct Vcpu {
    pub guest: &'static Guest,
    pub core: usize,
    pub regs: GuestRegisters,
    fixed: FixedBits,
}

impl Vcpu {
    fn read(&self, field: F) -> u64 {
        vmx::vmread(field)
    }

    /// Writes a guest or control field; a failure means the VMCS is broken, so the guest
    /// is stopped.
    fn write(&mut self, field: F, value: u64) -> Result<(), Next> {
        vmx::vmwrite(field, value)
            .map_err(|e| self.stop("vmwrite_failed", format_args!("VMWRITE {field:?}: {e}")))
    }

    /// Skips the instruction that exited (its length is in the VMCS, SDM Vol. 3C §28.2.5).
    fn advance_rip(&mut self) -> Next {
        let rip = self.read(F::GuestRip) + self.read(F::ExitInstructionLength);
        match self.write(F::GuestRip, rip) {
            Ok(()) => Next::Resume,
            Err(next) => next,
        }
    }

    /// Delivers #GP(0) at the current instruction on the next entry (SDM Vol. 3C §27.6).
    fn inject_general_protection(&mut self) -> Next {
        const VECTOR_GP: u64 = 13;
        const TYPE_HARDWARE_EXCEPTION: u64 = 3 << 8;
        const DELIVER_ERROR_CODE: u64 = 1 << 11;
        const VALID: u64 = 1 << 31;
        let info = VECTOR_GP | TYPE_HARDWARE_EXCEPTION | DELIVER_ERROR_CODE | VALID;
        match self
            .write(F::EntryInterruptionInfo, info)
            .and_then(|()| self.write(F::EntryExceptionErrorCode, 0))
        {
            Ok(()) => Next::Resume,
            Err(next) => next,
        }
    }

    /// Delivers an NMI to the guest on the next entry (SDM Vol. 3C §27.6, type 2).
    fn inject_nmi(&mut self) -> Next {
        const VECTOR_NMI: u64 = 2;
        const TYPE_NMI: u64 = 2 << 8;
        const VALID: u64 = 1 << 31;
        match self.write(F::EntryInterruptionInfo, VECTOR_NMI | TYPE_NMI | VALID) {
            Ok(()) => Next::Resume,
            Err(next) => next,
        }
    }

    /// The guest's current privilege level: DPL of SS (SDM Vol. 3A §5.5).
    fn cpl(&self) -> u8 {
        ((self.read(F::GuestSsAccessRights) >> 5) & 3) as u8
    }

    /// The guest touched something outside its partition: report it and apply the
    /// guest's policy. `target` names what was touched.
    fn violation(&mut self, kind: &str, target: u64) -> Next {
        let policy = self.guest.config.on_violation;
        let action = match policy {
            ViolationPolicy::Stop => "stopped",
            ViolationPolicy::Fault => "fault_injected",
        };
        self.report_refusal(
            kind,
            None,
            target,
            action,
            format_args!("{kind} of {target:#x}"),
        );
        match policy {
            ViolationPolicy::Stop => {
                self.stop("isolation_violation", format_args!("{kind} of {target:#x}"))
            }
            ViolationPolicy::Fault => self.inject_general_protection(),
        }
    }

    /// Reports an attempt of the guest that was refused: an error line and an
    /// `isolation_violation` marker, at most as often as the guest's warning limit allows
    /// (the marker after a quiet spell says how many were left out).
    fn report_refusal(
        &self,
        kind: &str,
        reason: Option<&str>,
        target: u64,
        action: &str,
        what: core::fmt::Arguments,
    ) {
        let Some(suppressed) = self.guest.warnings.admit(crate::time::now_us()) else {
            return;
        };
        let rip = self.read(F::GuestRip);
        error!(
            "guest '{}' cpu{}: {what} at RIP {rip:#x} refused ({action})",
            self.guest.name(),
            self.core
        );
        console::marker("isolation_violation", |o| {
            o.str("guest", self.guest.name())
                .u64("cpu", self.core as u64)
                .str("kind", kind)
                .hex("target", target)
                .hex("rip", rip)
                .str("action", action);
            if let Some(reason) = reason {
                o.str("reason", reason);
            }
            if suppressed > 0 {
                o.u64("suppressed", suppressed);
            }
        });
    }

    /// Stops the guest: a diagnostic with the exit's context, then every core of the
    /// guest parks (the others notice at their next exit).
    fn stop(&self, code: &str, detail: core::fmt::Arguments) -> Next {
        let reason = self.read(F::ExitReason);
        let (qualification, rip, gpa) = (
            self.read(F::ExitQualification),
            self.read(F::GuestRip),
            self.read(F::GuestPhysicalAddress),
        );
        error!(
            "guest '{}' stopped on cpu{}: {detail} (exit reason {}, qualification {qualification:#x}, RIP {rip:#x}, GPA {gpa:#x})",
            self.guest.name(),
            self.core,
            reason & 0xffff
        );
        console::marker("guest_stopped", |o| {
            o.str("guest", self.guest.name())
                .u64("cpu", self.core as u64)
                .str("code", code)
                .display("detail", &detail)
                .u64("exit_reason", reason & 0xffff)
                .str("exit_name", ExitReason::from_basic(reason as u16).name())
                .hex("qualification", qualification)
                .hex("rip", rip)
                .hex("gpa", gpa);
        });
        self.guest.set_state(GuestState::Stopped);
        kick_out(self.guest, self.core);
        Next::Park(End::Stopped)
    }
}

/// Grants parked CPU `core` to guest `guest`: the core prepares the guest's vCPU at once,
/// so the guest's INIT/STARTUP later only has to set the start address (it is woken to read
/// its mailbox if it sleeps; a core that grants itself as it parks reads it once it has
/// cleaned up). Returns the grant's generation and when it was made (TSC).
pub fn grant(core: usize, guest: u8, by: Requester) -> Result<(u32, u64), Refused> {
    let now = cpu::read_tsc();
    let generation = CORES.grant(core, guest, by, Reason::Grant, now)?;
    mailbox::post_prepare(core, guest);
    mailbox::wake(core);
    Ok((generation, now))
}

/// Makes every other core of a guest that stopped or halted leave it at once: the ones
/// running its vCPUs get an NMI (their vCPU sees the guest's state at that exit, or
/// before its next entry if the NMI reaches it in the hypervisor), and grants it has not
/// started are withdrawn.
pub fn kick_out(guest: &Guest, except: usize) {
    for core in (0..MAX_CPUS).filter(|&c| c != except) {
        let word = CORES.word(core);
        if word.runs(guest.id) {
            send_to_vcpu(core, guest.id, || {
                LocalApic::X2Apic.send_nmi(CPUS[core].apic_id())
            });
        } else if word.owner == Some(guest.id) {
            let _ = CORES.withdraw(
                core,
                guest.id,
                Requester::Hypervisor,
                Reason::Stopped,
                cpu::read_tsc(),
            );
        }
    }
}

/// Sends an interrupt at the vCPU of `guest` on `core`, counted among the core's senders
/// ([`crate::cores::IpiSenders`]): `write_icr` runs only if the vCPU still runs there, and
/// before the core, if it leaves the guest, cleans its APIC. Whether it ran.
pub fn send_to_vcpu(core: usize, guest: u8, write_icr: impl FnOnce()) -> bool {
    CPUS[core].ipi_senders.send(|| {
        let runs = CORES.runs(core, guest);
        if runs {
            write_icr();
        }
        runs
    })
}

/// A parked core's VMX state: its VMCS region, the capabilities it adjusts controls
/// against (read once: they do not change), and which guest's vCPU its VMCS holds ready.
struct CoreVmx<'a> {
    core: usize,
    /// A VMCS per guest id: a core that moves between the guests keeps each one's vCPU set
    /// up while it serves the other, so a hand-over needs no set-up of the VMCS.
    vmcs: &'a mut [VmxRegion; MAX_GUESTS],
    capabilities: Option<(VmxCapabilityMsrs, FixedBits)>,
    /// By guest id: its VMCS holds a vCPU set up and not launched since, waiting for a
    /// STARTUP IPI: everything but the start address (SDM Vol. 3C §25.11.3: VMCLEAR keeps
    /// the data and makes the launch state "clear", so VMLAUNCH may follow).
    prepared: [bool; MAX_GUESTS],
}

impl CoreVmx<'_> {
    /// Makes the VMCS current and writes every field for a vCPU of `guest` starting as
    /// `start`, unless `stop` says to give up first (the VMCS is then not prepared).
    fn set_up(
        &mut self,
        guest: &Guest,
        start: Start,
        host: &HostTables,
        stop: &dyn Fn() -> bool,
    ) -> Result<FixedBits, SetupError> {
        let id = usize::from(guest.id);
        self.prepared[id] = false;
        if stop() {
            return Err(SetupError::Interrupted);
        }
        let Some((caps, fixed)) = &self.capabilities else {
            return Err(SetupError::Capabilities);
        };
        let revision = crate::vmx::caps::VmxFeatures::decode(caps).vmcs_revision;
        self.vmcs[id]
            .make_current_vmcs(revision)
            .map_err(SetupError::MakeCurrent)?;
        setup::configure(guest, start, caps, fixed, host, stop)?;
        Ok(*fixed)
    }

    /// Prepares a vCPU of `guest` for its STARTUP IPI while the core is parked, unless `stop`
    /// says the core has something more urgent to do before it is done.
    fn prepare(&mut self, guest: &Guest, host: &HostTables, stop: &dyn Fn() -> bool) {
        if self.prepared[usize::from(guest.id)] {
            return;
        }
        match self.set_up(guest, Start::RealMode { vector: 0 }, host, stop) {
            Ok(_) => self.prepared[usize::from(guest.id)] = true,
            Err(SetupError::Interrupted) => {}
            Err(e) => log::warn!(
                "cpu{}: cannot prepare a vCPU of '{}' ({e}); it is set up at its start",
                self.core,
                guest.name()
            ),
        }
    }

    /// The VMCS ready for `start` of `guest`: the prepared one with its start address set
    /// when there is one, else a full set-up.
    fn ready(
        &mut self,
        guest: &Guest,
        start: Start,
        host: &HostTables,
    ) -> Result<FixedBits, SetupError> {
        let id = usize::from(guest.id);
        let prepared = core::mem::take(&mut self.prepared[id]);
        match (prepared, start, &self.capabilities) {
            (true, Start::RealMode { vector }, Some((_, fixed))) => {
                self.vmcs[id].load_vmcs().map_err(SetupError::MakeCurrent)?;
                setup::set_startup_vector(vector)?;
                Ok(*fixed)
            }
            _ => self.set_up(guest, start, host, &|| false),
        }
    }
}

/// The life of a core after boot: parked in the hypervisor until its mailbox asks it to
/// run a vCPU, then back to parked when the vCPU ends, any number of times.
pub fn core_loop(core: usize, host: &HostTables) -> ! {
    let Some(vmcs) = percpu::claim_vmcs_regions(core) else {
        error!("cpu{core}: VMCS regions already claimed; this core stays parked");
        cpu::halt_forever()
    };
    let mut vmx = CoreVmx {
        core,
        vmcs,
        capabilities: vmx::read_capabilities().ok().zip(vmx::fixed_bits()),
        prepared: [false; MAX_GUESTS],
    };
    // Every guest that may hold this core has its vCPU prepared before the core's first
    // request, unless a start comes first (a boot core's): a STARTUP that follows its grant
    // closely (Lavender's, some 17 µs under Bochs) then finds its VMCS ready on the first move
    // of a core that served another guest since boot too (set up at that grant instead, it
    // held Lavender's first entry 25 µs after its STARTUP).
    for guest in guest::all()
        .iter()
        .filter(|g| g.config.allowed_cores.0 & (1 << core) != 0)
    {
        vmx.prepare(guest, host, &|| mailbox::has_request(core));
    }
    // The guest whose vCPU last ran here, while its VMCS is to be made ready again.
    let mut left: Option<&'static Guest> = None;
    loop {
        if let Some(guest) = mailbox::take_prepare(core).and_then(guest::by_id) {
            if CORES.owner(core) == Some(guest.id) {
                vmx.prepare(guest, host, &|| false);
            }
        }
        if let Some(request) = mailbox::take_start(core) {
            CORES.stamp(core, Stage::Woken, cpu::read_tsc());
            match guest::by_id(request.guest) {
                Some(guest) if guest.state() == GuestState::Running => {
                    let (end, last_exit) = run(guest, core, request, &mut vmx, host);
                    leave(guest, core, end, last_exit);
                    log::debug!(
                        "cpu{core}: vCPU of '{}' ended ({end:?}); core parked",
                        guest.name()
                    );
                    left = Some(guest);
                }
                _ => {
                    let _ = CORES.withdraw(
                        core,
                        request.guest,
                        Requester::Hypervisor,
                        Reason::Stopped,
                        cpu::read_tsc(),
                    );
                }
            }
            // A grant made as the core parked comes first: its target's STARTUP may be on
            // its way.
            continue;
        }
        // The core may go back to the guest it left: its vCPU is made ready again, unless a
        // request comes first (the other guest's STARTUP, which finds that guest's VMCS
        // ready from its last visit or prepared at its grant). An interrupted preparation
        // leaves that VMCS to be set up in full at its guest's next grant here. A core
        // granted to another guest as it parked first gives that guest's STARTUP the time it
        // usually takes to come: begun before it, the preparation would only be cut short
        // by it (after its first group of fields, some 3 µs under Bochs, on every move from
        // Linux to Lavender).
        if let Some(guest) = left.filter(|g| g.state() == GuestState::Running) {
            if awaits_startup_of_another(core, guest.id)
                && mailbox::poll_for_request(
                    core,
                    cpu::read_tsc() + crate::time::ticks_for_us(STARTUP_GRACE_US),
                )
            {
                continue;
            }
            vmx.prepare(guest, host, &|| mailbox::has_request(core));
            if !mailbox::has_request(core) {
                left = None;
            }
        }
        // Parked, the core serves the monitor while no guest's exit may come soon enough for
        // it (a move in flight, the console's output). So does a core granted to a guest while
        // it waits for the guest's STARTUP: the passes it takes are passes the guests' cores
        // do not pay for, Linux's busy with the hotplug that sends the STARTUP (left to them,
        // Linux's online took 1.7 ms longer under Bochs).
        if !crate::monitor::has_own_core() {
            crate::monitor::serve_while_busy(|| mailbox::has_request(core));
        }
        mailbox::sleep_until_request(core);
    }
}

/// How long a core granted to a guest waits for its STARTUP IPI before it prepares the
/// VMCS of the guest it left (µs). Lavender sends its STARTUP some 17 µs after the grant
/// under Bochs; Linux only after its hotplug's first steps, 1.5 ms or more, so the
/// preparation still ends long before a Linux STARTUP.
const STARTUP_GRACE_US: u64 = 100;

/// Whether `core` is granted to a guest other than `left` and awaits its STARTUP IPI.
fn awaits_startup_of_another(core: usize, left: u8) -> bool {
    let word = CORES.word(core);
    word.state == CoreState::Granted && word.awaits_startup && word.owner != Some(left)
}

/// The vCPU of `guest` on this core (CPU `core`) ended on `last_exit`: the core goes back to
/// the pool (or stays granted to the guest, offline), then loses every trace of the guest.
///
/// The core is parked first (a release parked it in its hypercall already), before the last
/// exit's accounting and its clean-up, so that a release completes as soon as possible: a
/// grant only posts to this core's mailbox, which `core_loop` reads after the clean-up, so
/// nothing of this guest reaches the next one.
fn leave(guest: &Guest, core: usize, end: End, last_exit: LastExit) {
    if end == End::GrantWithdrawn {
        return;
    }
    let (by, why) = match end {
        // A CPU Linux took offline because it was asked to: the core goes back to the pool.
        End::Offline if CORES.state(core) == CoreState::Releasing => {
            (Requester::Guest, Reason::Released)
        }
        _ => end.cause(),
    };
    let offline = end == End::Offline && CORES.offline(core, guest.id).is_ok();
    let left_at = cpu::read_tsc();
    // A release parked the core in its hypercall already.
    let parked = matches!(end, End::Released { .. });
    if !offline && !parked {
        if let Err(e) = CORES.park(core, guest.id, by, why, left_at) {
            error!(
                "cpu{core}: the core manager refused to park '{}': {e:?}",
                guest.name()
            );
        }
    }
    // No vCPU of the guest runs here any more: once the senders that may have seen one are
    // done, no interrupt for the guest is still to be sent here, and the clean-up below
    // takes what was sent.
    CPUS[core].ipi_senders.wait_until_sent();
    // A move waiting for this core grants it now, which tells the target (Lavender sends its
    // STARTUP while this core cleans up), and the monitor takes whatever else is due: a grant
    // only posts to this core's mailbox, read after the clean-up.
    crate::moves::core_parked(core);
    crate::monitor::wake();
    crate::core_idle::IDLE[core].left(left_at);
    // The last exit's time runs to the park (see `vmx::exit::ExitTimes`).
    if let (Some((slot, exited)), Some(accounts)) =
        (last_exit, CPUS[core].exit_times.of_guest(guest.id))
    {
        accounts.record(slot, cpu::read_tsc().saturating_sub(exited));
    }
    // Interrupts the guest's IOAPIC entries aimed at this core go to another of its cores.
    ioapic_access::retarget(core, guest.id);
    let low_vectors = scrub::core_state();
    if let End::Released { wake: Some(wake) } = end {
        send_wake(guest, wake);
    }
    if low_vectors != 0 {
        report_low_vectors(guest, core, low_vectors);
    }
}

/// The guest left interrupts with vectors 16..31 (the processor's exceptions) pending on a
/// core it left, through APIC registers that pass through (the self-IPI register, an LVT
/// entry): they were acknowledged and dropped, never run as the hypervisor's exception
/// handlers. Reported like any refused attempt (rate-limited).
fn report_low_vectors(guest: &Guest, core: usize, vectors: u32) {
    let Some(suppressed) = guest.warnings.admit(crate::time::now_us()) else {
        return;
    };
    error!(
        "guest '{}' cpu{core}: left exception vectors {vectors:#x} pending in its APIC; dropped",
        guest.name()
    );
    console::marker("isolation_violation", |o| {
        o.str("guest", guest.name())
            .u64("cpu", core as u64)
            .str("kind", "exception_vector_pending")
            .hex("target", u64::from(vectors))
            .u64("vector", u64::from(vectors.trailing_zeros()))
            .str("action", "dropped");
        if suppressed > 0 {
            o.u64("suppressed", suppressed);
        }
    });
}

/// Sends the interrupt a guest asked for with its release, now that the core is parked:
/// the hypervisor does it for the guest, whose own IPI would have been a VM exit on its way
/// out. Checked again, since the target may have left the guest meanwhile.
fn send_wake(guest: &Guest, wake: Wake) {
    if hypercalls::may_wake(guest.id, wake) {
        let target = wake.core.index();
        send_to_vcpu(target, guest.id, || {
            LocalApic::X2Apic.send_fixed(CPUS[target].apic_id(), wake.vector)
        });
    }
}

/// The exit a vCPU ended on, not accounted yet: its counter slot and TSC.
type LastExit = Option<(usize, u64)>;

/// Runs a vCPU of `guest` on this core (CPU `core`) until it ends; why, and the exit it
/// ended on.
fn run(
    guest: &'static Guest,
    core: usize,
    request: StartRequest,
    vmx: &mut CoreVmx,
    host: &HostTables,
) -> (End, LastExit) {
    let start = request.start;
    // The grant the request was made for must still hold: it may have been withdrawn (and
    // given again, to this guest or another) since the request was posted.
    let word = CORES.word(core);
    if word.owner != Some(guest.id) || word.generation != request.generation {
        log::debug!(
            "cpu{core}: start of '{}' for a withdrawn grant dropped",
            guest.name()
        );
        return (End::GrantWithdrawn, None);
    }
    let fixed = match vmx.ready(guest, start, host) {
        Ok(fixed) => fixed,
        Err(e) => return (setup_failed(guest, core, &e), None),
    };
    // A boot core gets its entry arguments; a core started by SIPI starts from reset.
    let regs = match start {
        Start::Entry64 => GuestRegisters {
            rdi: guest.entry.rdi,
            rsi: guest.entry.rsi,
            ..Default::default()
        },
        Start::RealMode { .. } => GuestRegisters::default(),
    };
    let mut vcpu = Vcpu {
        guest,
        core,
        regs,
        fixed,
    };
    let rip = vcpu.read(F::GuestRip) + (vcpu.read(F::GuestCsBase));
    // A serial line costs milliseconds of (emulated) transmit time: cores a guest starts
    // at run time are logged at debug level only, so bring-up stays in microseconds.
    match start {
        Start::Entry64 => {
            info!(
                "guest '{}': entering at {rip:#x} on cpu{core}",
                guest.name()
            );
            console::marker("vcpu_started", |o| {
                o.str("guest", guest.name())
                    .u64("cpu", core as u64)
                    .hex("rip", rip)
                    .str("mode", "entry64");
            });
        }
        Start::RealMode { vector } => {
            log::debug!(
                "guest '{}': cpu{core} started by SIPI at {rip:#x} (vector {vector:#x})",
                guest.name()
            );
        }
    }
    // The last check of the grant and the change to `Owned` are one step.
    if CORES
        .enter(core, guest.id, request.generation, cpu::read_tsc())
        .is_err()
    {
        log::debug!(
            "cpu{core}: grant to '{}' withdrawn before entry",
            guest.name()
        );
        return (End::GrantWithdrawn, None);
    }
    let mut launched = false;
    // The exit being handled (its counter slot) and the TSC when it happened: its time in
    // the hypervisor is accounted just before the next entry, two RDTSCs per exit. The
    // vCPU's last exit is accounted once the core is parked (`leave`).
    let mut handling: Option<(usize, u64)> = None;
    let accounts = CPUS[core].exit_times.of_guest(guest.id);
    let account = |handling: Option<(usize, u64)>| {
        if let (Some((slot, exited)), Some(accounts)) = (handling, accounts) {
            accounts.record(slot, cpu::read_tsc().saturating_sub(exited));
        }
    };
    // The preemption-timer value loaded on each entry (the policy engine's sampling period).
    let mut timer = None;
    let idle = &crate::core_idle::IDLE[core];
    loop {
        let mut wanted = crate::policy_engine::preemption_timer_value();
        if !crate::monitor::has_own_core() {
            // Without a core of its own the hypervisor works here, between two entries.
            wanted = crate::monitor::run_if_due(core, wanted);
        }
        if timer != Some(wanted) && vcpu.write(F::PreemptionTimerValue, wanted.into()).is_ok() {
            timer = Some(wanted);
        }
        // Checked before every entry: an NMI asking the vCPU to leave may have reached
        // the core while it was in the hypervisor, where it is not an exit.
        if CORES.force_requested(core) {
            log::warn!(
                "guest '{}' missed its release deadline: cpu{core} taken back",
                guest.name()
            );
            exits::keep_forced_state(&vcpu);
            return (End::ForcedOff, handling);
        }
        if guest.state() != GuestState::Running {
            return (End::Stopped, handling);
        }
        account(handling.take());
        if let Err(e) = vmx::enter_guest(&mut vcpu.regs, launched) {
            vcpu.stop("vm_entry_failed", format_args!("VM entry failed: {e}"));
            return (End::Stopped, None);
        }
        let exited = cpu::read_tsc();
        launched = true;
        let raw = vcpu.read(F::ExitReason);
        let reason = ExitReason::from_basic(raw as u16);
        if idle.is_halted() {
            const ACTIVITY_HLT: u64 = 1;
            // The exit an interrupt makes while the vCPU halts is its wake-up, whatever
            // activity state the processor saved with it.
            let still_halted = !matches!(reason, ExitReason::ExternalInterrupt)
                && vcpu.read(F::GuestActivityState) == ACTIVITY_HLT;
            idle.exit(exited, still_halted);
        }
        let slot = reason.slot().0;
        handling = Some((slot, exited));
        guest.exits.count(slot);
        CPUS[core].exits.count(slot);
        // Bit 31: the VM entry itself failed (SDM Vol. 3C §28.8); the guest never ran.
        let next = if raw & (1 << 31) != 0 {
            vcpu.stop(
                "vm_entry_failed",
                format_args!("VM entry failed checking guest state ({})", reason.name()),
            )
        } else {
            exits::handle(&mut vcpu, reason)
        };
        if let Next::Park(end) = next {
            if matches!(end, End::Halted | End::Stopped) {
                crate::monitor::wake();
            }
            return (end, handling);
        }
    }
}

fn setup_failed(guest: &Guest, core: usize, why: &dyn core::fmt::Display) -> End {
    error!(
        "guest '{}': cannot set up its vCPU on cpu{core}: {why}",
        guest.name()
    );
    console::marker("guest_stopped", |o| {
        o.str("guest", guest.name())
            .u64("cpu", core as u64)
            .str("code", "vcpu_setup_failed")
            .display("detail", why);
    });
    guest.set_state(GuestState::Stopped);
    kick_out(guest, core);
    End::Stopped
}

/// EFER.LMA follows CR0.PG while EFER.LME is set, and the IA-32e-mode-guest entry
/// control must match it (SDM Vol. 3C §27.3.1.1).
fn sync_long_mode(vcpu: &mut Vcpu, cr0: u64) -> Result<(), Next> {
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    const CR0_PG: u64 = 1 << 31;
    let efer = vcpu.read(F::GuestIa32Efer);
    let long_mode = efer & EFER_LME != 0 && cr0 & CR0_PG != 0;
    let efer = if long_mode {
        efer | EFER_LMA
    } else {
        efer & !EFER_LMA
    };
    vcpu.write(F::GuestIa32Efer, efer)?;
    let controls = vcpu.read(F::EntryControls);
    let ia32e = u64::from(entry::IA32E_MODE_GUEST);
    vcpu.write(
        F::EntryControls,
        if long_mode {
            controls | ia32e
        } else {
            controls & !ia32e
        },
    )
}
