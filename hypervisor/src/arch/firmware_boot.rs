//! The one piece of early-boot memory the hypervisor writes: the AP trampoline page.

/// Installs the trampoline with `launch` and returns the STARTUP IPI vector.
/// Only the BSP calls this, for one AP at a time (see `smp::start_ap`).
pub fn install_ap_trampoline(launch: &boot::ApLaunch) -> u8 {
    // SAFETY: the page at AP_TRAMPOLINE_BASE is conventional memory below 1 MiB that the
    // hypervisor reserves for the trampoline (nothing else is placed there, and the boot
    // information has been parsed already); it is identity-mapped. `smp::start_ap` runs
    // on the BSP only and returns only after the previous AP has left the trampoline
    // (it reached Rust) or was declared unresponsive.
    unsafe { boot::install_ap_trampoline(launch) }
}
