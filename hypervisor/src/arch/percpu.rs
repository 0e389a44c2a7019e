//! Per-CPU memory: each core's stack and VMXON region, and the public part every core
//! may read (APIC ID, bring-up state). Sized by `platform::MAX_CPUS`, in `.bss`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use super::vmx::VmxRegion;
use crate::platform::MAX_CPUS;

/// Bytes of stack per core.
pub const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Stack([u8; STACK_SIZE]);

/// Stacks are only ever used through RSP, never through a Rust reference.
struct StackTable(UnsafeCell<[Stack; MAX_CPUS]>);
// SAFETY: no Rust code reads or writes the stacks; only their addresses are handed out.
unsafe impl Sync for StackTable {}
static STACKS: StackTable = StackTable(UnsafeCell::new(
    [const { Stack([0; STACK_SIZE]) }; MAX_CPUS],
));

struct RegionTable(UnsafeCell<[VmxRegion; MAX_CPUS]>);
// SAFETY: each element is handed out at most once (see `claim_vmxon_region`).
unsafe impl Sync for RegionTable {}
static VMXON_REGIONS: RegionTable =
    RegionTable(UnsafeCell::new([const { VmxRegion::ZEROED }; MAX_CPUS]));
static VMXON_CLAIMED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static VMCS_REGIONS: RegionTable =
    RegionTable(UnsafeCell::new([const { VmxRegion::ZEROED }; MAX_CPUS]));
static VMCS_CLAIMED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Top of the stack of CPU `index` (stacks grow down), 16-byte aligned.
pub fn stack_top(index: usize) -> u64 {
    assert!(index < MAX_CPUS);
    STACKS.0.get() as u64 + ((index + 1) * STACK_SIZE) as u64
}

/// The VMXON region of CPU `index`; `None` if it was already claimed.
pub fn claim_vmxon_region(index: usize) -> Option<&'static mut VmxRegion> {
    claim(&VMXON_REGIONS, &VMXON_CLAIMED, index)
}

/// The VMCS of the vCPU on CPU `index`; `None` if it was already claimed.
pub fn claim_vmcs_region(index: usize) -> Option<&'static mut VmxRegion> {
    claim(&VMCS_REGIONS, &VMCS_CLAIMED, index)
}

// A `&'static mut` from a shared table is sound here: the `claimed` flag hands each
// element out once (see the SAFETY line).
#[allow(clippy::mut_from_ref)]
fn claim(
    table: &'static RegionTable,
    claimed: &[AtomicBool; MAX_CPUS],
    index: usize,
) -> Option<&'static mut VmxRegion> {
    if index >= MAX_CPUS || claimed[index].swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the atomic swap above lets exactly one caller per index get here, so this
    // is the only reference ever made to that element.
    Some(unsafe { &mut (*table.0.get())[index] })
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

pub static CPUS: [CpuPublic; MAX_CPUS] = [const {
    CpuPublic {
        apic_id: AtomicU32::new(0),
        state: AtomicU8::new(0),
        failure: AtomicU8::new(0),
    }
}; MAX_CPUS];
