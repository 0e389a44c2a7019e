//! The local APIC in x2APIC mode (Intel SDM Vol. 3A §11.12): its registers are MSRs
//! (§11.12.1.2, Table 11-6). The hypervisor passes them all through except the ICR, whose writes
//! it intercepts to keep IPIs inside Lavender's partition, to translate destinations (core
//! indices) into physical APIC IDs, and to emulate INIT and STARTUP. It also makes the APIC ID
//! read as the core index.

use x86_64::registers::model_specific::Msr;

const APIC_ID: u32 = 0x802;
const TASK_PRIORITY: u32 = 0x808;
/// In-service register, 8 MSRs of 32 vectors each (SDM Vol. 3A §11.8.4).
const IN_SERVICE: u32 = 0x810;
const EOI: u32 = 0x80b;
const SPURIOUS: u32 = 0x80f;
const ICR: u32 = 0x830;
const LVT_TIMER: u32 = 0x832;
const TIMER_INITIAL_COUNT: u32 = 0x838;
const TIMER_CURRENT_COUNT: u32 = 0x839;
const TIMER_DIVIDE: u32 = 0x83e;
/// The x2APIC self-IPI register: writing a vector sends it to this core (SDM Vol. 3A
/// §11.12.11).
const SELF_IPI: u32 = 0x83f;

/// SVR bit 8: APIC software enable (SDM Vol. 3A §11.9, Figure 11-23).
const SPURIOUS_APIC_ENABLE: u64 = 1 << 8;
/// LVT mask bit and the timer mode field (SDM Vol. 3A §11.5.1, Figure 11-8).
const LVT_MASKED: u64 = 1 << 16;
const TIMER_PERIODIC: u64 = 1 << 17;
/// Divide configuration 1011b: divide by 1 (SDM Vol. 3A §11.5.4, Figure 11-10).
const DIVIDE_BY_1: u64 = 0b1011;
/// ICR fields (SDM Vol. 3A §11.6.1, Figure 11-12): delivery mode in bits 10:8, level in bit 14,
/// and in x2APIC mode the destination in bits 63:32 (§11.12.9).
const ICR_FIXED: u64 = 0b000 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
const ICR_DESTINATION_SHIFT: u32 = 32;

fn read(register: u32) -> u64 {
    // SAFETY: the x2APIC registers read here (ID, timer current count) exist on every core
    // Lavender runs on (the hypervisor enters its guests in x2APIC mode) and reading them has no
    // side effect.
    unsafe { Msr::new(register).read() }
}

fn write(register: u32, value: u64) {
    // SAFETY: the registers written here (EOI, SVR, ICR, the timer's LVT, count and divide)
    // only steer interrupt delivery to and from this core; none changes memory or the
    // translation of any address, so no Rust invariant depends on them.
    unsafe { Msr::new(register).write(value) }
}

/// This core's x2APIC ID, which the hypervisor makes equal to its core index.
pub fn id() -> u32 {
    read(APIC_ID) as u32
}

fn any_in_service() -> bool {
    (0..8).any(|index| read(IN_SERVICE + index) as u32 != 0)
}

/// Software-enables the APIC with `spurious_vector` for spurious interrupts, accepts every
/// priority (TPR = 0), and ends interrupts left in service by whoever used this APIC before
/// Lavender (firmware, the hypervisor): each set ISR bit blocks every vector of its priority
/// class and below (SDM Vol. 3A §11.8.3.1) until an EOI clears it. Returns how many it ended.
pub fn enable(spurious_vector: u8) -> u32 {
    write(SPURIOUS, SPURIOUS_APIC_ENABLE | u64::from(spurious_vector));
    write(TASK_PRIORITY, 0);
    let mut ended = 0;
    // At most one EOI per vector: each clears the highest-priority in-service bit.
    while any_in_service() && ended < 256 {
        end_of_interrupt();
        ended += 1;
    }
    ended
}

/// Signals the end of the interrupt being handled (any value; SDM Vol. 3A §11.12.1.2: a
/// non-zero write to the x2APIC EOI register raises #GP, so zero).
pub fn end_of_interrupt() {
    write(EOI, 0);
}

/// Starts the timer: `vector` every `count` APIC timer ticks (divide by 1).
pub fn start_periodic_timer(vector: u8, count: u32) {
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(LVT_TIMER, TIMER_PERIODIC | u64::from(vector));
    write(TIMER_INITIAL_COUNT, u64::from(count));
}

/// Stops the timer: masks its LVT entry and zeroes its count (SDM Vol. 3A §11.5.4: a zero
/// initial count stops it).
pub fn stop_timer() {
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL_COUNT, 0);
}

/// Starts the timer masked, as a one-shot counter from `u32::MAX`, for calibration.
pub fn start_counting() {
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL_COUNT, u64::from(u32::MAX));
}

/// Ticks the counter started by [`start_counting`] has counted down.
pub fn counted() -> u32 {
    u32::MAX - read(TIMER_CURRENT_COUNT) as u32
}

/// Sends fixed interrupt `vector` to core `core`.
pub fn send_fixed(core: u32, vector: u8) {
    write(
        ICR,
        u64::from(core) << ICR_DESTINATION_SHIFT | ICR_LEVEL_ASSERT | ICR_FIXED | u64::from(vector),
    );
}

/// Sends STARTUP with `vector` (the start page number) to core `core`.
pub fn send_startup(core: u32, vector: u8) {
    write(
        ICR,
        u64::from(core) << ICR_DESTINATION_SHIFT
            | ICR_LEVEL_ASSERT
            | ICR_STARTUP
            | u64::from(vector),
    );
}

/// TSC-deadline mode in the timer LVT entry (bits 18:17 = 10b, Intel SDM Vol. 3A §11.5.4.1).
const TIMER_TSC_DEADLINE: u64 = 0b10 << 17;
/// IA32_TSC_DEADLINE: the timer fires when the TSC reaches it; 0 disarms it.
const IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The handover test's hostile half: raises the task priority to 0xff (this core then takes
/// no maskable interrupt at all, the hypervisor's included), leaves `pending` requested by a
/// self-IPI (the task priority keeps it pending), and arms the timer in TSC-deadline mode to
/// raise `vector` at TSC `deadline`, after this core is gone.
pub fn block_and_arm_deadline(pending: u8, vector: u8, deadline: u64) {
    write(TASK_PRIORITY, 0xff);
    write(SELF_IPI, u64::from(pending));
    write(LVT_TIMER, TIMER_TSC_DEADLINE | u64::from(vector));
    // SAFETY: IA32_TSC_DEADLINE exists (CPUID.1:ECX[24], checked by the caller's test setup:
    // the hypervisor passes it through); arming it only schedules an interrupt on this core.
    unsafe { Msr::new(IA32_TSC_DEADLINE).write(deadline) };
}

/// What this core's APIC holds on arrival: the task priority, the timer LVT entry and the
/// TSC deadline.
pub fn arrival_state() -> (u64, u64, u64) {
    // SAFETY: reading IA32_TSC_DEADLINE has no side effect; it exists where the handover test
    // runs (see `block_and_arm_deadline`).
    let deadline = unsafe { Msr::new(IA32_TSC_DEADLINE).read() };
    (read(TASK_PRIORITY), read(LVT_TIMER), deadline)
}
