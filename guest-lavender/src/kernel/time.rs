//! Time: the TSC as Lavender's clock (RDTSC does not exit), its frequency, and the local APIC
//! timer's rate against it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::kernel::arch::{apic, cpu};

/// Used when CPUID names no TSC frequency: Bochs's TSC with `ips=50000000` and
/// `clock: sync=none` (the configuration `cargo xtask run` uses) counts 50 MHz of virtual time.
const FALLBACK_TSC_HZ: u64 = 50_000_000;
/// TSC ticks the APIC timer is calibrated over.
const CALIBRATION_TSC_TICKS: u64 = 500_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_HZ);
/// APIC timer ticks (divide by 1) per 2^20 TSC ticks.
static APIC_PER_TSC_SCALED: AtomicU64 = AtomicU64::new(1 << 20);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    /// `tsc_khz=` on the command line.
    Cmdline,
    /// CPUID leaf 0x15: crystal clock times the TSC/crystal ratio (Intel SDM Vol. 3B §18.18).
    /// The Tandem hypervisor answers it with the TSC frequency it measured at boot.
    Cpuid15,
    /// CPUID leaf 0x16: processor base frequency in MHz.
    Cpuid16,
    Fallback,
}

impl TscSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cmdline => "cmdline",
            Self::Cpuid15 => "cpuid_0x15",
            Self::Cpuid16 => "cpuid_0x16",
            Self::Fallback => "fallback_50mhz",
        }
    }
}

fn tsc_from_cpuid() -> (u64, TscSource) {
    let (max_leaf, ..) = cpu::cpuid(0);
    if max_leaf >= 0x15 {
        let (denominator, numerator, crystal_hz, _) = cpu::cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal_hz != 0 {
            let hz = u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator);
            return (hz, TscSource::Cpuid15);
        }
    }
    if max_leaf >= 0x16 {
        let (base_mhz, ..) = cpu::cpuid(0x16);
        if base_mhz & 0xffff != 0 {
            return (u64::from(base_mhz & 0xffff) * 1_000_000, TscSource::Cpuid16);
        }
    }
    (FALLBACK_TSC_HZ, TscSource::Fallback)
}

/// Finds the TSC frequency (`override_khz` first, then CPUID) and calibrates this core's APIC
/// timer against the TSC. Returns the frequency, its source and the APIC timer ticks per
/// million TSC ticks.
pub fn init(override_khz: Option<u64>) -> (u64, TscSource, u64) {
    let (hz, source) = match override_khz {
        Some(khz) => (khz * 1000, TscSource::Cmdline),
        None => tsc_from_cpuid(),
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    apic::start_counting();
    let start = now();
    while now().wrapping_sub(start) < CALIBRATION_TSC_TICKS {
        core::hint::spin_loop();
    }
    let counted = u64::from(apic::counted());
    let elapsed = now().wrapping_sub(start);
    apic::stop_timer();
    let scaled = (counted << 20) / elapsed.max(1);
    APIC_PER_TSC_SCALED.store(scaled.max(1), Ordering::Relaxed);
    (hz, source, counted * 1_000_000 / elapsed.max(1))
}

/// The TSC.
pub fn now() -> u64 {
    cpu::read_tsc()
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// TSC ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz().max(1))) as u64
}

/// Microseconds to TSC ticks.
pub fn us_to_ticks(us: u64) -> u64 {
    (u128::from(us) * u128::from(tsc_hz()) / 1_000_000) as u64
}

/// APIC timer ticks in `us` microseconds, for the periodic timer's initial count.
pub fn apic_ticks_for_us(us: u64) -> u32 {
    let ticks = (u128::from(us_to_ticks(us))
        * u128::from(APIC_PER_TSC_SCALED.load(Ordering::Relaxed)))
        >> 20;
    ticks.clamp(1, u128::from(u32::MAX)) as u32
}
