//! The hypervisor binary: the Rust entry the boot code calls, and the panic handler.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod bare_metal {
    use hypervisor::{arch, console, startup};

    /// Called by `boot`'s long-mode entry with the multiboot2 magic and info address.
    #[no_mangle]
    extern "C" fn hv_boot_main(multiboot_magic: u32, boot_information: usize) -> ! {
        startup::bsp_main(multiboot_magic, boot_information)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        console::report_panic(None, info);
        arch::cpu::halt_forever()
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on bare metal: build it with `cargo xtask build`");
    std::process::exit(2);
}
