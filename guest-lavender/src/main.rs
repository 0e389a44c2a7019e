//! Lavender microkernel guest (placeholder until the VMX-partitions issue lands).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("guest-lavender runs on bare metal: build it with `cargo xtask build`");
}
