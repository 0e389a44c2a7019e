//! Shared regions as the hypervisor sees them: words of host memory that a guest also
//! maps, accessed only through atomics (the `vmcall_proto` rings).

use core::sync::atomic::AtomicU64;

/// The words of the shared region at host-physical `[host, host + size)`.
pub fn words(host: u64, size: u64) -> &'static [AtomicU64] {
    assert!(
        host.is_multiple_of(8) && size.is_multiple_of(8) && host + size <= 1 << 32,
        "shared region {host:#x}+{size:#x}"
    );
    // SAFETY: `partition::validate` proved the range to be identity-mapped RAM (below 4 GiB,
    // asserted here too) that belongs to no private partition and not to the hypervisor
    // image; it is never freed. The guests that map it change it concurrently, which is
    // sound because every access, ours and the rings' on the guest side, is atomic.
    unsafe { core::slice::from_raw_parts(host as *const AtomicU64, (size / 8) as usize) }
}
