//! Time for the hypervisor's own waits: the TSC, calibrated once against PIT channel 2
//! (the 8254 counts at 1.193182 MHz on every PC; Intel SDM Vol. 3B §18.17 on the TSC).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{cpu, port};

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 10 ms of PIT counts.
const CALIBRATION_COUNTS: u16 = (PIT_HZ / 100) as u16;
/// Used if the PIT never signals (e.g. absent on some virtual platforms).
const FALLBACK_TSC_HZ: u64 = 1_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_HZ);
/// Microseconds per TSC tick, fixed point with 32 fraction bits, kept with [`TSC_HZ`].
static US_PER_TICK: AtomicU64 = AtomicU64::new(us_per_tick(FALLBACK_TSC_HZ));

const fn us_per_tick(hz: u64) -> u64 {
    (1_000_000 << 32) / if hz == 0 { 1 } else { hz }
}

/// Measures the TSC frequency; returns it and keeps it for [`delay_us`].
pub fn calibrate_tsc() -> u64 {
    // Gate channel 2 on, speaker off; channel 2, lobyte/hibyte, mode 0 (interrupt on
    // terminal count): OUT2 (port B bit 5) goes high when the count reaches zero.
    let control = port::read_u8(port::PORT_B_CONTROL);
    port::write_u8(port::PORT_B_CONTROL, (control & !0x02) | 0x01);
    port::write_u8(port::PIT_COMMAND, 0b1011_0000);
    let start = cpu::read_tsc();
    port::write_u8(port::PIT_CHANNEL2_DATA, CALIBRATION_COUNTS as u8);
    port::write_u8(port::PIT_CHANNEL2_DATA, (CALIBRATION_COUNTS >> 8) as u8);
    let mut spins: u64 = 0;
    while port::read_u8(port::PORT_B_CONTROL) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            log::warn!("PIT channel 2 never fired; assuming a {FALLBACK_TSC_HZ} Hz TSC");
            return FALLBACK_TSC_HZ;
        }
    }
    let elapsed = cpu::read_tsc() - start;
    let hz = elapsed * PIT_HZ / u64::from(CALIBRATION_COUNTS);
    TSC_HZ.store(hz, Ordering::Relaxed);
    US_PER_TICK.store(us_per_tick(hz), Ordering::Relaxed);
    hz
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// TSC ticks in `us` microseconds. The frequency's part below a whole MHz counts too: a TSC
/// calibrated just under one (49999936 Hz under Bochs) made every µs 49 ticks, 2% short, and
/// a 2000 ms watchdog fired at 1960 ms. No 128-bit division: this runs before every VM entry.
pub fn ticks_for_us(us: u64) -> u64 {
    let hz = tsc_hz();
    (hz / 1_000_000)
        .saturating_mul(us)
        .saturating_add((hz % 1_000_000).saturating_mul(us) / 1_000_000)
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = cpu::read_tsc() + ticks_for_us(us);
    while cpu::read_tsc() < end {
        core::hint::spin_loop();
    }
}

/// Microseconds in `ticks` TSC ticks: a fixed-point multiply, exact to a part in 10^6 and
/// with no division (it runs on every pass). Dividing by the whole MHz instead made a µs of a
/// TSC just under 50 MHz 49 ticks, every time 2% long.
pub fn us_for_ticks(ticks: u64) -> u64 {
    ((u128::from(ticks) * u128::from(US_PER_TICK.load(Ordering::Relaxed))) >> 32) as u64
}

/// Microseconds since the TSC was reset (for log timestamps and boot timing).
pub fn now_us() -> u64 {
    us_for_ticks(cpu::read_tsc())
}

/// APIC timer ticks per millisecond on this core (the timer clock is not architecturally
/// tied to the TSC, so it is measured: 10 ms of TSC time).
pub fn calibrate_apic_timer(apic: &crate::arch::lapic::LocalApic) -> u32 {
    apic.arm_timer(crate::arch::descriptors::WAKE_VECTOR, u32::MAX);
    delay_us(10_000);
    let elapsed = u32::MAX - apic.timer_remaining();
    apic.arm_timer(crate::arch::descriptors::WAKE_VECTOR, 0);
    (elapsed / 10).max(1)
}
