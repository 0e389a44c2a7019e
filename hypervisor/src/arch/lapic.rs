//! The local APIC of the current core, in x2APIC mode when the CPU has it (MSR access,
//! Intel SDM Vol. 3A §11.12) and in xAPIC mode (MMIO, §11.4) otherwise. The hypervisor
//! uses it to send INIT and STARTUP IPIs when it starts the application processors.

use super::msr;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// x2APIC MSRs (SDM Vol. 3A Table 11-6).
const X2APIC_ID: u32 = 0x802;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_TIMER_INITIAL: u32 = 0x838;
const X2APIC_TIMER_CURRENT: u32 = 0x839;
const X2APIC_TIMER_DIVIDE: u32 = 0x83e;
const X2APIC_VERSION: u32 = 0x803;
const X2APIC_TPR: u32 = 0x808;
const X2APIC_PPR: u32 = 0x80a;
const X2APIC_ESR: u32 = 0x828;
/// In-service and interrupt-request registers, 8 x 32 bits each (vectors 0..=255).
const X2APIC_ISR0: u32 = 0x810;
/// Vectors 16..31 in the first ISR/IRR register: the lowest the APIC delivers (0..15 are
/// illegal, SDM Vol. 3A §11.5.3).
const LOW_INTERRUPT_VECTORS: u32 = 0xffff_0000;
const X2APIC_IRR0: u32 = 0x820;
/// The LVT entries (SDM Vol. 3A §11.5.1) in the order of the Max LVT Entry count they
/// need: LINT0, LINT1, error and timer always; performance counters from 4 entries (max
/// entry 3), thermal sensor from 5, CMCI from 6 (§11.5.1, Figure 11-8 and §16.5.1).
const X2APIC_LVT_ALWAYS: [u32; 4] = [0x835, 0x836, 0x837, X2APIC_LVT_TIMER];
const X2APIC_LVT_PERF: u32 = 0x834;
const X2APIC_LVT_THERMAL: u32 = 0x833;
const X2APIC_LVT_CMCI: u32 = 0x82f;
const LVT_MASKED: u64 = 1 << 16;
/// IA32_TSC_DEADLINE (SDM Vol. 3A §11.5.4.1), present when CPUID.1:ECX[24] is set.
const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Divide configuration 1011b: the timer counts at the APIC timer clock (SDM Vol. 3A §11.5.4).
const TIMER_DIVIDE_BY_1: u64 = 0b1011;

/// xAPIC register offsets from the APIC base (SDM Vol. 3A Table 11-1).
const XAPIC_ID: usize = 0x20;
const XAPIC_SVR: usize = 0xf0;
const XAPIC_EOI: usize = 0xb0;
const XAPIC_ICR_LOW: usize = 0x300;
const XAPIC_ICR_HIGH: usize = 0x310;

/// ICR fields (SDM Vol. 3A §11.6.1).
const ICR_DELIVERY_NMI: u32 = 0b100 << 8;
const ICR_DELIVERY_INIT: u32 = 0b101 << 8;
const ICR_DELIVERY_STARTUP: u32 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

/// Spurious-interrupt vector register value: APIC software-enabled, vector 0xff.
const SVR_ENABLED: u32 = 0x1ff;

/// IA32_APIC_BASE as the hardware has it (what a guest reads: its cores' APICs are real).
pub fn apic_base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    unsafe { msr::read(IA32_APIC_BASE) }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalApic {
    X2Apic,
    XApic { base: u64 },
}

impl LocalApic {
    /// Enables this core's local APIC, switching it to x2APIC mode when
    /// `use_x2apic` (from CPUID.1:ECX[21]) says the CPU supports it.
    pub fn enable_on_this_cpu(use_x2apic: bool) -> Self {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86-64 CPUs).
        let base = unsafe { msr::read(IA32_APIC_BASE) };
        if use_x2apic {
            // SAFETY: going from xAPIC (or disabled) to x2APIC with EN and EXTD both set is
            // a legal transition (SDM Vol. 3A §11.12.5); the x2APIC MSRs exist once it is done.
            unsafe {
                msr::write(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
                msr::write(X2APIC_SVR, u64::from(SVR_ENABLED));
            }
            Self::X2Apic
        } else {
            let apic = Self::XApic {
                base: base & APIC_BASE_ADDRESS_MASK,
            };
            // SAFETY: setting EN keeps the base; the APIC page is identity-mapped (first 4 GiB).
            unsafe { msr::write(IA32_APIC_BASE, base | APIC_BASE_ENABLE) };
            apic.write_xapic(XAPIC_SVR, SVR_ENABLED);
            apic
        }
    }

    /// This core's APIC ID.
    pub fn id(&self) -> u32 {
        match self {
            // SAFETY: the x2APIC ID MSR exists in x2APIC mode.
            Self::X2Apic => unsafe { msr::read(X2APIC_ID) as u32 },
            Self::XApic { .. } => self.read_xapic(XAPIC_ID) >> 24,
        }
    }

    /// Sends an INIT IPI (level assert) to `apic_id` (SDM Vol. 3A §9.4.4.1).
    pub fn send_init(&self, apic_id: u32) {
        self.send_ipi(apic_id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT);
    }

    /// Sends a STARTUP IPI: the target starts in real mode at `vector << 12`.
    pub fn send_startup(&self, apic_id: u32, vector: u8) {
        self.send_ipi(
            apic_id,
            ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | u32::from(vector),
        );
    }

    /// Sends a fixed interrupt with `vector` to `apic_id`.
    pub fn send_fixed(&self, apic_id: u32, vector: u8) {
        self.send_ipi(apic_id, ICR_LEVEL_ASSERT | u32::from(vector));
    }

    /// Sends an NMI to `apic_id`: it makes a core running a guest exit (NMI exiting).
    pub fn send_nmi(&self, apic_id: u32) {
        self.send_ipi(apic_id, ICR_DELIVERY_NMI | ICR_LEVEL_ASSERT);
    }

    /// Writes a guest's x2APIC ICR value after the hypervisor checked its destination.
    #[inline]
    pub fn forward_x2apic_icr(&self, value: u64) {
        assert_eq!(*self, Self::X2Apic, "guests use x2APIC mode");
        // SAFETY: writing the ICR only sends an IPI; the caller checked the destination
        // belongs to the sender's partition.
        unsafe { msr::write(X2APIC_ICR, value) }
    }

    /// Starts the one-shot timer counting down from `ticks`; it then raises `vector`.
    /// Zero stops it. x2APIC mode only (the hypervisor's timer needs it).
    pub fn arm_timer(&self, vector: u8, ticks: u32) {
        assert_eq!(
            *self,
            Self::X2Apic,
            "the hypervisor's timer uses x2APIC mode"
        );
        // SAFETY: programming this core's own APIC timer only schedules an interrupt on
        // this core, which the hypervisor's IDT handles (the wake vector).
        unsafe {
            msr::write(X2APIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
            msr::write(X2APIC_LVT_TIMER, u64::from(vector));
            msr::write(X2APIC_TIMER_INITIAL, u64::from(ticks));
        }
    }

    /// Stops the timer, whoever armed it: a zero initial count stops it (SDM Vol. 3A
    /// §11.5.4). One register write, for the release path; [`Self::arm_timer`] sets the
    /// divider and the vector again before the next use.
    pub fn stop_timer(&self) {
        assert_eq!(
            *self,
            Self::X2Apic,
            "the hypervisor's timer uses x2APIC mode"
        );
        // SAFETY: a zero initial count only stops this core's own APIC timer.
        unsafe { msr::write(X2APIC_TIMER_INITIAL, 0) }
    }

    /// Puts back what a guest may have changed in this core's APIC (its x2APIC registers
    /// pass through): TPR 0, the APIC enabled with the spurious vector, every LVT entry
    /// masked, both timers stopped (the one-shot count and the TSC deadline), errors
    /// cleared, every in-service interrupt ended, and every pending one taken here (the
    /// hypervisor's handlers acknowledge them) rather than by the next guest. Returns the
    /// vectors 16..31 the guest left pending or in service (bit `v` for vector `v`): legal
    /// interrupt vectors that are the processor's exceptions in the hypervisor's IDT, which
    /// tells them apart and drops them too.
    pub fn reset_for_next_owner(&self) -> u32 {
        assert_eq!(*self, Self::X2Apic, "guests run on x2APIC cores");
        // Asked once: every core of the machine has the same CPUID.
        static HAS_TSC_DEADLINE: spin::Once<bool> = spin::Once::new();
        let has_tsc_deadline = *HAS_TSC_DEADLINE.call_once(|| {
            raw_cpuid::CpuId::new()
                .get_feature_info()
                .is_some_and(|f| f.has_tsc_deadline())
        });
        // SAFETY: the first IRR and ISR registers exist in x2APIC mode (SDM Vol. 3A
        // §11.12.1.2); reading them has no side effect.
        let low_vectors = unsafe {
            (msr::read(X2APIC_IRR0) | msr::read(X2APIC_ISR0)) as u32 & LOW_INTERRUPT_VECTORS
        };
        // SAFETY: the x2APIC registers written here exist in x2APIC mode on every APIC with
        // the LVT count read from the version register (SDM Vol. 3A §11.5.1), TSC_DEADLINE
        // when CPUID says so; they only change which interrupts this core takes and when.
        unsafe {
            msr::write(X2APIC_TPR, 0);
            msr::write(X2APIC_SVR, u64::from(SVR_ENABLED));
            let max_lvt = (msr::read(X2APIC_VERSION) >> 16) & 0xff;
            for lvt in X2APIC_LVT_ALWAYS {
                msr::write(lvt, LVT_MASKED);
            }
            for (needs, lvt) in [
                (3, X2APIC_LVT_PERF),
                (4, X2APIC_LVT_THERMAL),
                (6, X2APIC_LVT_CMCI),
            ] {
                if max_lvt >= needs {
                    msr::write(lvt, LVT_MASKED);
                }
            }
            msr::write(X2APIC_TIMER_INITIAL, 0);
            if has_tsc_deadline {
                msr::write(IA32_TSC_DEADLINE, 0);
            }
            // A write clears the error status (SDM Vol. 3A §11.5.3).
            msr::write(X2APIC_ESR, 0);
        }
        // Each EOI ends the highest-priority interrupt in service (SDM Vol. 3A §11.8.5), which
        // lets the pending ones below it in. Pending requests are delivered as soon as
        // interrupts are enabled: take them here, where every interrupt vector (16 up) is
        // dropped; the mailbox vector's stub leaves it in service, ended at the next round.
        for _ in 0..512 {
            if self.any_set(X2APIC_ISR0) {
                self.end_of_interrupt();
            } else if self.any_set(X2APIC_IRR0) {
                super::descriptors::take_pending_interrupt();
            } else {
                break;
            }
        }
        low_vectors
    }

    /// Whether `vector` is in service on this core (x2APIC ISR, SDM Vol. 3A §11.8.4).
    pub fn in_service(&self, vector: u8) -> bool {
        assert_eq!(*self, Self::X2Apic, "parked cores use x2APIC mode");
        // SAFETY: the eight ISR registers are readable in x2APIC mode; reading them has no
        // side effect.
        let bits = unsafe { msr::read(X2APIC_ISR0 + u32::from(vector / 32)) };
        bits & (1 << (vector % 32)) != 0
    }

    /// Whether this core's APIC holds a requested interrupt it would deliver now to a CPU
    /// that accepts interrupts: the highest vector in the IRR has a higher priority class
    /// than the processor priority (SDM Vol. 3A §11.8.3.1, "Processor Priority Register").
    pub fn has_deliverable_request(&self) -> bool {
        assert_eq!(
            *self,
            Self::X2Apic,
            "guests run with the APIC in x2APIC mode"
        );
        // SAFETY: PPR and the eight IRR registers are readable in x2APIC mode; reading them
        // has no side effect.
        let (irr, ppr) = unsafe {
            (
                core::array::from_fn(|i| msr::read(X2APIC_IRR0 + i as u32) as u32),
                msr::read(X2APIC_PPR) as u32,
            )
        };
        crate::apic_priority::deliverable(&irr, ppr)
    }

    /// Whether any of the 256 bits of the ISR or IRR (`first` register) is set.
    fn any_set(&self, first: u32) -> bool {
        // SAFETY: the eight ISR/IRR registers are readable in x2APIC mode; reading them
        // has no side effect.
        (0..8).any(|i| unsafe { msr::read(first + i) } as u32 != 0)
    }

    /// Timer ticks remaining (for calibration).
    pub fn timer_remaining(&self) -> u32 {
        assert_eq!(
            *self,
            Self::X2Apic,
            "the hypervisor's timer uses x2APIC mode"
        );
        // SAFETY: reading the current-count register has no side effect.
        unsafe { msr::read(X2APIC_TIMER_CURRENT) as u32 }
    }

    /// Signals end of interrupt (x2APIC EOI register, SDM Vol. 3A §11.8.5).
    pub fn end_of_interrupt(&self) {
        match self {
            // SAFETY: writing 0 to the EOI MSR only retires the in-service interrupt.
            Self::X2Apic => unsafe { msr::write(X2APIC_EOI, 0) },
            Self::XApic { .. } => self.write_xapic(XAPIC_EOI, 0),
        }
    }

    fn send_ipi(&self, apic_id: u32, command: u32) {
        match self {
            // SAFETY: one 64-bit ICR write sends the IPI in x2APIC mode (SDM §11.12.9);
            // it affects only the destination core's execution state, not our memory.
            Self::X2Apic => unsafe {
                msr::write(X2APIC_ICR, (u64::from(apic_id) << 32) | u64::from(command))
            },
            Self::XApic { .. } => {
                self.write_xapic(XAPIC_ICR_HIGH, apic_id << 24);
                self.write_xapic(XAPIC_ICR_LOW, command);
                while self.read_xapic(XAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
                    core::hint::spin_loop();
                }
            }
        }
    }

    fn read_xapic(&self, offset: usize) -> u32 {
        let Self::XApic { base } = *self else {
            unreachable!("xAPIC register in x2APIC mode")
        };
        // SAFETY: the xAPIC page (base from IA32_APIC_BASE) is identity-mapped and
        // uncached by the firmware's MTRRs; offsets are architectural registers.
        unsafe { core::ptr::read_volatile((base as usize + offset) as *const u32) }
    }

    fn write_xapic(&self, offset: usize, value: u32) {
        let Self::XApic { base } = *self else {
            unreachable!("xAPIC register in x2APIC mode")
        };
        // SAFETY: as in `read_xapic`.
        unsafe { core::ptr::write_volatile((base as usize + offset) as *mut u32, value) }
    }
}
