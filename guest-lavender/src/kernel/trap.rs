//! Exception handling: per-core recovery points for probes, and the report for everything else.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_lavender::descriptors::{slot_of_tss_selector, MAX_CORE_SLOTS};
use guest_lavender::exceptions::{mnemonic, recovery_target, ArmedProbe};

use crate::kernel::arch::idt::ExceptionFrame;
use crate::kernel::{arch, console};

const PAGE_FAULT: u8 = 14;

/// What a probe (`arch::probe`) observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The instruction completed; for a read, the value read.
    Completed(u64),
    /// The hypervisor refused it with #GP.
    Faulted { error_code: u64 },
}

/// One core's recovery point. Only the owning core touches it, in program order with its own
/// exception handler, so the atomics are for `static` access, not for ordering between cores.
struct RecoveryPoint {
    /// Address of the armed probe instruction; 0 = disarmed.
    fault_rip: AtomicU64,
    resume_rip: AtomicU64,
    /// Error code of the #GP that was recovered, for the probe's report.
    error_code: AtomicU64,
}

impl RecoveryPoint {
    const fn new() -> Self {
        Self {
            fault_rip: AtomicU64::new(0),
            resume_rip: AtomicU64::new(0),
            error_code: AtomicU64::new(0),
        }
    }

    fn armed(&self) -> Option<ArmedProbe> {
        let fault_rip = self.fault_rip.load(Ordering::SeqCst);
        (fault_rip != 0).then(|| ArmedProbe {
            fault_rip,
            resume_rip: self.resume_rip.load(Ordering::SeqCst),
        })
    }
}

static RECOVERY: [RecoveryPoint; MAX_CORE_SLOTS] = [const { RecoveryPoint::new() }; MAX_CORE_SLOTS];

/// This core's slot, from its task register; `None` before `gdt::load`.
fn current_slot() -> Option<usize> {
    slot_of_tss_selector(arch::cpu::task_register())
}

/// An armed recovery point; [`RecoveryGuard::disarm`] it right after the probe.
#[must_use]
pub struct RecoveryGuard {
    slot: usize,
}

/// Arms this core's recovery point: a #GP at `fault_rip` resumes at `resume_rip`.
pub fn arm_recovery(fault_rip: u64, resume_rip: u64) -> RecoveryGuard {
    let slot = current_slot().expect("probes run only after the GDT and TSS are loaded");
    let point = &RECOVERY[slot];
    point.error_code.store(0, Ordering::SeqCst);
    point.resume_rip.store(resume_rip, Ordering::SeqCst);
    point.fault_rip.store(fault_rip, Ordering::SeqCst);
    RecoveryGuard { slot }
}

impl RecoveryGuard {
    /// Disarms and returns the error code of the #GP it recovered (0 if none).
    pub fn disarm(self) -> u64 {
        let point = &RECOVERY[self.slot];
        point.fault_rip.store(0, Ordering::SeqCst);
        point.error_code.load(Ordering::SeqCst)
    }
}

/// Called for every exception with the interrupted state. Returns only after redirecting an
/// armed probe's #GP. An exception in user mode kills the process (the core goes on); any
/// other is a kernel bug: it is reported and stops the core.
pub fn handle(frame: &mut ExceptionFrame) {
    let vector = frame.vector as u8;
    if frame.came_from_user_mode() {
        let address = if vector == PAGE_FAULT {
            arch::cpu::page_fault_address()
        } else {
            0
        };
        crate::kernel::process::kill_for_fault(vector, mnemonic(vector), frame.rip, address);
    }
    let slot = current_slot();
    if let Some(point) = slot.map(|slot| &RECOVERY[slot]) {
        if let Some(resume_rip) = recovery_target(point.armed(), vector, frame.rip) {
            point.error_code.store(frame.error_code, Ordering::SeqCst);
            // One recovery per arming: a second fault at the same place is a real one.
            point.fault_rip.store(0, Ordering::SeqCst);
            frame.rip = resume_rip;
            return;
        }
    }
    report(frame, vector, slot);
    arch::cpu::halt_forever()
}

fn report(frame: &ExceptionFrame, vector: u8, slot: Option<usize>) {
    let name = mnemonic(vector);
    let cr2 = arch::cpu::page_fault_address();
    console::emergency_line(|out| {
        write!(
            out,
            "EXCEPTION vector {vector} ({name}) error code {:#x} at rip {:#x}, rsp {:#x}, cr2 {cr2:#x}, rflags {:#x}",
            frame.error_code, frame.rip, frame.rsp, frame.rflags
        )
    });
    console::emergency_marker("lavender_exception", |o| {
        o.u64("vector", u64::from(vector))
            .str("name", name)
            .hex("error_code", frame.error_code)
            .hex("rip", frame.rip)
            .hex("rsp", frame.rsp)
            .hex("cr2", cr2);
        if let Some(slot) = slot {
            o.u64("slot", slot as u64);
        }
    });
}
