//! Per-CPU data: one block per core, in `.bss`, sized by `platform::MAX_CPUS`. Each block
//! has a public part every core may read (APIC ID, bring-up state, the mailbox other cores
//! post requests to, the core's exit counts) and a private part only the core itself uses
//! (its stack, VMXON region and a VMCS per guest), each piece handed out once.

use core::cell::UnsafeCell;
use core::ops::Deref;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use super::vmx::VmxRegion;
use crate::cores::IpiSenders;
use crate::partition::MAX_GUESTS;
use crate::platform::MAX_CPUS;
use crate::vcpu::mailbox::Mailbox;
use crate::vmx::exit::{ExitCounters, ExitTimes};

/// Bytes of stack per core.
pub const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Stack([u8; STACK_SIZE]);

/// What only the core itself uses. The stack is only ever used through RSP, never through
/// a Rust reference; the VMXON region and the VMCSs are handed out once each (see `claim`).
#[repr(C)]
struct Private {
    stack: Stack,
    vmxon: VmxRegion,
    /// One per guest (by guest id), so a vCPU set up for one guest stays ready while the core
    /// serves the other.
    vmcs: [VmxRegion; MAX_GUESTS],
}

/// One core's block.
pub struct PerCpu {
    public: CpuPublic,
    private: UnsafeCell<Private>,
    vmxon_claimed: AtomicBool,
    vmcs_claimed: AtomicBool,
}

// SAFETY: the public part is atomics only; the private part is reached only through
// `stack_top` (an address, never dereferenced in Rust) and `claim`, which hands each region
// out at most once.
unsafe impl Sync for PerCpu {}

/// The public part is what other cores use: `CPUS[i].apic_id()`, `CPUS[i].mailbox`.
impl Deref for PerCpu {
    type Target = CpuPublic;
    fn deref(&self) -> &CpuPublic {
        &self.public
    }
}

pub static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        public: CpuPublic {
            apic_id: AtomicU32::new(0),
            state: AtomicU8::new(0),
            failure: AtomicU8::new(0),
            mailbox: Mailbox::new(),
            ipi_senders: IpiSenders::new(),
            exits: ExitCounters::new(),
            exit_times: ExitTimes::new(),
        },
        private: UnsafeCell::new(Private {
            stack: Stack([0; STACK_SIZE]),
            vmxon: VmxRegion::ZEROED,
            vmcs: [VmxRegion::ZEROED; MAX_GUESTS],
        }),
        vmxon_claimed: AtomicBool::new(false),
        vmcs_claimed: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// Top of the stack of CPU `index` (stacks grow down), 16-byte aligned.
pub fn stack_top(index: usize) -> u64 {
    let private = CPUS[index].private.get();
    // SAFETY: only the address of the stack field is taken (no reference is made), inside a
    // static that lives forever.
    let stack = unsafe { &raw mut (*private).stack } as u64;
    stack + STACK_SIZE as u64
}

/// The VMXON region of CPU `index`; `None` if it was already claimed.
pub fn claim_vmxon_region(index: usize) -> Option<&'static mut VmxRegion> {
    let block = CPUS.get(index)?;
    claim(&block.vmxon_claimed, || {
        // SAFETY: the address of one field of the private part, no reference made.
        unsafe { &raw mut (*block.private.get()).vmxon }
    })
}

/// The VMCSs of the vCPUs on CPU `index`, one per guest id; `None` if they were already
/// claimed.
pub fn claim_vmcs_regions(index: usize) -> Option<&'static mut [VmxRegion; MAX_GUESTS]> {
    let block = CPUS.get(index)?;
    claim(&block.vmcs_claimed, || {
        // SAFETY: the address of one field of the private part, no reference made.
        unsafe { &raw mut (*block.private.get()).vmcs }
    })
}

/// Hands out the region(s) `field` points to if `claimed` was not set yet.
fn claim<T>(claimed: &AtomicBool, field: impl FnOnce() -> *mut T) -> Option<&'static mut T> {
    if claimed.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the atomic swap above lets exactly one caller per region get here, so this is
    // the only reference ever made to it; it lives in a static.
    Some(unsafe { &mut *field() })
}

/// Bring-up state of a core, as other cores see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    Absent = 0,
    /// INIT/SIPI sent, not yet in Rust.
    Starting = 1,
    /// Running hypervisor code, turning VMX on.
    Running = 2,
    VmxOn = 3,
    /// VMX could not be turned on; `failure` says why.
    VmxFailed = 4,
    /// Did not answer the STARTUP IPIs in time.
    NoResponse = 5,
}

impl CpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Starting,
            2 => Self::Running,
            3 => Self::VmxOn,
            4 => Self::VmxFailed,
            5 => Self::NoResponse,
            _ => Self::Absent,
        }
    }
}

/// The part of a core's state any core may read.
pub struct CpuPublic {
    apic_id: AtomicU32,
    state: AtomicU8,
    /// Index into `crate::vmx::enable::VmxUnavailable` codes when state is VmxFailed.
    failure: AtomicU8,
    /// Requests to this core while it is parked (see `crate::vcpu::mailbox`).
    pub mailbox: Mailbox,
    /// The senders of interrupts at this core's vCPU, counted while they check and send (see
    /// `crate::cores::IpiSenders`).
    pub ipi_senders: IpiSenders,
    /// This core's VM exits, by reason (the per-guest ones are in `Guest::exits`).
    pub exits: ExitCounters,
    /// This core's VM exits per guest and reason with the time spent handling them (for the
    /// stats page; written by this core only).
    pub exit_times: ExitTimes,
}

impl CpuPublic {
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Acquire)
    }
    pub fn set_apic_id(&self, id: u32) {
        self.apic_id.store(id, Ordering::Release);
    }
    pub fn state(&self) -> CpuState {
        CpuState::from_u8(self.state.load(Ordering::Acquire))
    }
    pub fn set_state(&self, state: CpuState) {
        self.state.store(state as u8, Ordering::Release);
    }
    pub fn failure(&self) -> u8 {
        self.failure.load(Ordering::Acquire)
    }
    pub fn set_failure(&self, code: u8) {
        self.failure.store(code, Ordering::Release);
    }
}
