//! The Lavender kernel binary. On bare metal (`x86_64-unknown-none`) it is the kernel; on the
//! host it is a stub, so `cargo build` / `cargo test` of the whole workspace still work.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod kernel;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "guest-lavender runs as a Tandem guest on bare metal: build it with \
         `cargo build --release -p guest-lavender --target x86_64-unknown-none` \
         (or `cargo xtask build`) and boot it with `cargo xtask run`"
    );
    std::process::exit(2);
}
