//! Who made this CPU and what it is, from CPUID (Intel SDM Vol. 2A, CPUID).

use heapless::String;
use raw_cpuid::CpuId;

#[derive(Clone, Debug, Default)]
pub struct CpuIdentity {
    pub vendor: String<12>,
    /// Display family/model (extended fields folded in, SDM Vol. 2A Figure 3-6).
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
    pub brand: String<48>,
    pub has_vmx: bool,
    pub has_x2apic: bool,
    /// CPUID.1:ECX.XSAVE (KVM may not offer it to its guest).
    pub has_xsave: bool,
}

fn bounded<const N: usize>(text: &str) -> String<N> {
    let mut out = String::new();
    for c in text.trim().chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

/// Identifies the CPU this runs on.
pub fn identify() -> CpuIdentity {
    let cpuid = CpuId::new();
    let mut id = CpuIdentity::default();
    if let Some(vendor) = cpuid.get_vendor_info() {
        id.vendor = bounded(vendor.as_str());
    }
    if let Some(features) = cpuid.get_feature_info() {
        id.family = features.family_id();
        id.model = features.model_id();
        id.stepping = features.stepping_id();
        id.has_vmx = features.has_vmx();
        id.has_x2apic = features.has_x2apic();
        id.has_xsave = features.has_xsave();
    }
    if let Some(brand) = cpuid.get_processor_brand_string() {
        id.brand = bounded(brand.as_str());
    }
    id
}
