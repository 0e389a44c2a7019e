//! Links the bare-metal kernel with `linker.ld`; host builds (the stub binary, the unit tests)
//! use the host's default link.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "none" {
        let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
        let script = std::path::Path::new(&manifest_dir).join("linker.ld");
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rerun-if-changed={}", script.display());
    }
}
