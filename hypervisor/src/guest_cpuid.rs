//! What CPUID tells a guest (Intel SDM Vol. 2A, CPUID): the host's answer with the features
//! a partition must not use hidden, and the hypervisor's own leaves. Pure: the host's CPUID
//! and the core's state come in as arguments, so the masks are host-tested.

use vmcall_proto::version::ABI_VERSION;

/// What the answer depends on besides the leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub guest_id: u8,
    /// The guest's own CR4.OSXSAVE (its read shadow).
    pub guest_osxsave: bool,
    /// XCR0 bits the CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
    pub supported_xcr0: u64,
    /// XCR0 as the guest set it on this core.
    pub current_xcr0: u64,
    pub tsc_hz: u64,
}

/// The XCR0 components guests may enable: x87, SSE, AVX.
pub const GUEST_XCR0: u64 = 0b111;
const XCR0_AVX: u64 = 1 << 2;
/// XSAVE area sizes: legacy region + header (576), plus the AVX component (256 bytes).
const XSAVE_AREA_LEGACY: u32 = 576;
const XSAVE_AREA_WITH_AVX: u32 = 832;

/// CPUID leaves of the hypervisor range (Intel SDM Vol. 2A: 0x40000000-0x4fffffff are
/// reserved for software).
///
/// 0x40000000 carries the KVM signature with an empty KVM feature leaf (0x40000001 = 0):
/// a stock Linux without interrupt remapping keeps x2APIC mode only under a hypervisor it
/// knows can deliver x2APIC interrupts (`x86_init.hyper.x2apic_available`, true for KVM),
/// and switches to the xAPIC MMIO page otherwise; Tandem confines IPIs through the
/// x2APIC ICR. With no KVM features advertised, Linux uses no KVM paravirtual interface.
/// Tandem names itself in the next block, the way hypervisors offer several interfaces:
/// 0x40000100 = "TandemHV", 0x40000101 = paravirtual ABI version and the guest's id.
const COMPAT_LEAF: u32 = 0x4000_0000;
const COMPAT_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
const TANDEM_LEAF: u32 = 0x4000_0100;
const TANDEM_SIGNATURE: &[u8; 12] = b"TandemHV\0\0\0\0";

fn signature_words(signature: &[u8; 12]) -> [u32; 3] {
    core::array::from_fn(|i| {
        u32::from_le_bytes([
            signature[i * 4],
            signature[i * 4 + 1],
            signature[i * 4 + 2],
            signature[i * 4 + 3],
        ])
    })
}

/// The guest's view of CPUID leaf `leaf`, subleaf `subleaf`; `host` executes CPUID.
pub fn leaf(
    leaf: u32,
    subleaf: u32,
    ctx: &Context,
    host: impl Fn(u32, u32) -> [u32; 4],
) -> [u32; 4] {
    match leaf {
        COMPAT_LEAF => {
            let [b, c, d] = signature_words(COMPAT_SIGNATURE);
            [COMPAT_LEAF + 1, b, c, d]
        }
        TANDEM_LEAF => {
            let [b, c, d] = signature_words(TANDEM_SIGNATURE);
            [TANDEM_LEAF + 1, b, c, d]
        }
        0x4000_0101 => [ABI_VERSION.to_u32(), u32::from(ctx.guest_id), 0, 0],
        0x4000_0001..=0x4fff_ffff => [0; 4],
        1 => {
            let [a, b, c, d] = host(1, 0);
            // Hide VMX (no nested virtualization) and MONITOR/MWAIT (a guest sleeping in
            // MWAIT would not exit, so the hypervisor could not see the core idle or
            // offline); set "running under a hypervisor" (CPUID.1:ECX[31], reserved for
            // this use).
            // Hide MCE and MCA too: the machine-check banks are the platform's, not a
            // partition's.
            // Thermal monitoring (EDX ACPI, TM; ECX TM2) is the platform's too.
            let hidden_ecx = (1 << 5) | (1 << 3) | (1 << 8);
            let hidden_edx = (1 << 7) | (1 << 14) | (1 << 22) | (1 << 29);
            // OSXSAVE (ECX[27]) mirrors the guest's own CR4.OSXSAVE, not the host's.
            let osxsave = if ctx.guest_osxsave { 1 << 27 } else { 0 };
            [
                a,
                b,
                (c & !hidden_ecx & !(1 << 27)) | osxsave | (1 << 31),
                d & !hidden_edx,
            ]
        }
        6 => {
            // No digital thermal sensor or package thermal management (EAX[0], EAX[6]),
            // no APERF/MPERF (ECX[0]): platform counters, not the partition's.
            let [a, b, c, d] = host(6, 0);
            // no energy-performance bias (ECX[3]): IA32_ENERGY_PERF_BIAS is the platform's.
            [a & !((1 << 0) | (1 << 6)), b, c & !((1 << 0) | (1 << 3)), d]
        }
        7 if subleaf == 0 => {
            // Hide IA32_TSC_ADJUST (EBX[1]): writing it would move the TSC the hypervisor
            // and the other guest share on that core. Hide the features whose state is
            // beyond x87/SSE/AVX in XCR0 (see leaf 0xD): MPX, AVX-512, PKU.
            let [a, b, c, d] = host(7, 0);
            let hidden_ebx = (1 << 1)
                | (1 << 14)
                | (1 << 16)
                | (1 << 17)
                | (1 << 21)
                | (0b111 << 26)
                | (0b11 << 30);
            let hidden_ecx =
                (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
            [a, b & !hidden_ebx, c & !hidden_ecx, d & !0b1100]
        }
        // Extended state: x87, SSE and AVX only (SDM Vol. 1 §13.2), with the sizes of that
        // standard layout, and no XSAVES/XSAVEC (they need IA32_XSS and the compacted form).
        0xd => match subleaf {
            0 if ctx.supported_xcr0 == 0 => [0; 4],
            0 => {
                let enabled = ctx.current_xcr0 & GUEST_XCR0;
                let size = |xcr0: u64| {
                    if xcr0 & XCR0_AVX != 0 {
                        XSAVE_AREA_WITH_AVX
                    } else {
                        XSAVE_AREA_LEGACY
                    }
                };
                [
                    GUEST_XCR0 as u32 & ctx.supported_xcr0 as u32,
                    size(enabled),
                    size(GUEST_XCR0),
                    0,
                ]
            }
            1 => {
                let [a, _, _, _] = host(0xd, 1);
                [a & !((1 << 1) | (1 << 3)), 0, 0, 0]
            }
            2 => host(0xd, 2),
            _ => [0; 4],
        },
        // No architectural performance monitoring: the counters are not partitioned.
        0xa => [0; 4],
        // The TSC frequency as measured at boot, where guests look for it (SDM Vol. 2A,
        // CPUID leaves 15H and 16H): TSC = crystal (ECX, Hz) * EBX / EAX. An emulator's
        // model numbers need not match its TSC (Bochs's Skylake says 3.5 GHz; its TSC
        // runs at the configured instructions per second).
        0x15 => [1, 1, ctx.tsc_hz.min(u64::from(u32::MAX)) as u32, 0],
        0x16 => {
            let mhz = (ctx.tsc_hz / 1_000_000) as u32;
            [mhz, mhz, 100, 0]
        }
        _ => host(leaf, subleaf),
    }
}

/// XCR0 rules: x87 always on, only supported bits, AVX needs SSE, the three AVX-512
/// components together and only with AVX.
pub fn valid_xcr0(value: u64, supported: u64) -> bool {
    const X87: u64 = 1;
    const SSE: u64 = 1 << 1;
    const AVX: u64 = 1 << 2;
    const AVX512: u64 = 0b111 << 5;
    let avx512 = value & AVX512;
    value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (avx512 == 0 || (avx512 == AVX512 && value & AVX != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context = Context {
        guest_id: 1,
        guest_osxsave: false,
        supported_xcr0: 0b111,
        current_xcr0: 0b11,
        tsc_hz: 50_000_000,
    };

    fn all_ones(_: u32, _: u32) -> [u32; 4] {
        [u32::MAX; 4]
    }

    #[test]
    fn leaf_1_hides_vmx_monitor_and_machine_checks_and_says_hypervisor() {
        let [_, _, ecx, edx] = leaf(1, 0, &CTX, all_ones);
        assert_eq!(ecx & (1 << 5), 0, "VMX");
        assert_eq!(ecx & (1 << 3), 0, "MONITOR/MWAIT");
        assert_eq!(ecx & (1 << 27), 0, "OSXSAVE follows the guest's CR4");
        assert_ne!(ecx & (1 << 31), 0, "hypervisor present");
        assert_eq!(edx & ((1 << 7) | (1 << 14)), 0, "MCE, MCA");
        let osxsave = Context {
            guest_osxsave: true,
            ..CTX
        };
        assert_ne!(leaf(1, 0, &osxsave, all_ones)[2] & (1 << 27), 0);
    }

    #[test]
    fn leaf_7_hides_tsc_adjust_and_state_beyond_avx() {
        let [_, ebx, ecx, _] = leaf(7, 0, &CTX, all_ones);
        assert_eq!(ebx & (1 << 1), 0, "IA32_TSC_ADJUST");
        assert_eq!(ebx & (1 << 16), 0, "AVX-512F");
        assert_eq!(ecx & (1 << 3), 0, "PKU");
    }

    #[test]
    fn hypervisor_leaves_and_extended_state() {
        let [max, b, c, d] = leaf(0x4000_0000, 0, &CTX, all_ones);
        assert_eq!(max, 0x4000_0001);
        let bytes: Vec<u8> = [b, c, d].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(leaf(0x4000_0001, 0, &CTX, all_ones), [0; 4]);
        assert_eq!(leaf(0x4000_0101, 0, &CTX, all_ones)[1], 1, "guest id");
        // x87 + SSE enabled: the legacy area; x87 + SSE + AVX offered.
        assert_eq!(leaf(0xd, 0, &CTX, all_ones), [0b111, 576, 832, 0]);
        assert_eq!(
            leaf(0xa, 0, &CTX, all_ones),
            [0; 4],
            "no performance monitoring"
        );
        assert_eq!(leaf(0x15, 0, &CTX, all_ones), [1, 1, 50_000_000, 0]);
    }

    #[test]
    fn xcr0_rules() {
        assert!(valid_xcr0(0b11, 0b111));
        assert!(valid_xcr0(0b111, 0b111));
        assert!(!valid_xcr0(0b10, 0b111), "x87 is always on");
        assert!(!valid_xcr0(0b101, 0b111), "AVX needs SSE");
        assert!(!valid_xcr0(0b1111, 0b111), "unsupported bit");
    }
}
