//! Starting the application processors with INIT-SIPI-SIPI (Intel SDM Vol. 3A §9.4.4.1,
//! "Typical BSP Initialization Sequence"), one at a time because they share one
//! trampoline page.

use crate::arch::lapic::LocalApic;
use crate::arch::percpu::{self, CpuState, CPUS};
use crate::arch::{cpu, firmware_boot};
use crate::time;

/// The SDM's waits: 10 ms after INIT, 200 µs after each STARTUP IPI.
const INIT_DELAY_US: u64 = 10_000;
const STARTUP_DELAY_US: u64 = 200;
/// How long an AP has to reach Rust code before it is reported as not responding.
const RESPONSE_TIMEOUT_US: u64 = 100_000;
/// How long an AP has to finish turning VMX on.
const VMX_TIMEOUT_US: u64 = 1_000_000;

/// Starts the AP at per-CPU `index` with APIC ID `apic_id`; it runs `entry(index)`.
/// Returns once it runs Rust code or has not answered in time.
pub fn start_ap(
    apic: &LocalApic,
    index: usize,
    apic_id: u32,
    entry: extern "C" fn(u64) -> !,
) -> CpuState {
    let public = &CPUS[index];
    public.set_apic_id(apic_id);
    public.set_state(CpuState::Starting);
    let vector = firmware_boot::install_ap_trampoline(&boot::ApLaunch {
        cr3: cpu::read_cr3(),
        stack_top: percpu::stack_top(index),
        entry,
        cpu_index: index as u64,
    });

    apic.send_init(apic_id);
    time::delay_us(INIT_DELAY_US);
    for _ in 0..2 {
        apic.send_startup(apic_id, vector);
        time::delay_us(STARTUP_DELAY_US);
        if public.state() != CpuState::Starting {
            break;
        }
    }
    if !wait_while(index, CpuState::Starting, RESPONSE_TIMEOUT_US) {
        public.set_state(CpuState::NoResponse);
        log::warn!("cpu{index} (APIC ID {apic_id}) did not answer INIT-SIPI-SIPI");
    }
    public.state()
}

/// Waits until CPU `index` has left `state`, at most `timeout_us`. True if it left.
pub fn wait_while(index: usize, state: CpuState, timeout_us: u64) -> bool {
    let deadline = cpu::read_tsc() + time::ticks_for_us(timeout_us);
    while CPUS[index].state() == state {
        if cpu::read_tsc() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Waits for a started AP to finish turning VMX on (or to fail).
pub fn wait_for_vmx(index: usize) -> CpuState {
    if !wait_while(index, CpuState::Running, VMX_TIMEOUT_US) {
        log::warn!("cpu{index} did not finish turning VMX on in time");
    }
    CPUS[index].state()
}
