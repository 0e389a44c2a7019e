//! The Tandem hypervisor: a VMX type-1 hypervisor that partitions one machine between
//! a Linux guest and the Lavender microkernel guest.
//!
//! Layout: `arch` is the audited `unsafe` core (privileged instructions, physical
//! memory, per-CPU data); everything else is safe Rust. Pure logic (`vmx`, `platform`,
//! `report`, `cmdline`) is unit-tested on the host; the modules that need the machine
//! are built for `x86_64-unknown-none` only.
#![cfg_attr(not(test), no_std)]
// Errors carry their message in fixed-size strings because the hypervisor has no heap to
// box them in; the size is the price of a precise message at no allocation.
#![allow(clippy::result_large_err)]

pub mod apic_priority;
pub mod cmdline;
pub mod core_idle;
pub mod cores;
pub mod cpu_info;
pub mod guest;
pub mod guest_cpuid;
pub mod ioapic;
pub mod ipi;
pub mod line_queue;
pub mod linux;
pub mod move_rules;
pub mod pci;
pub mod platform;
pub mod policy;
pub mod random_moves;
pub mod rate_limit;
pub mod report;
pub mod stats;
pub mod vmx;
pub mod watchdog;

/// The partition configuration lives in its own crate, shared with the host tooling.
pub use partition_config as partition;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod console;
#[cfg(target_os = "none")]
pub mod core_test;
#[cfg(target_os = "none")]
pub mod faults;
#[cfg(target_os = "none")]
pub mod monitor;
#[cfg(target_os = "none")]
pub mod moves;
#[cfg(target_os = "none")]
pub mod policy_engine;
#[cfg(target_os = "none")]
pub mod smp;
#[cfg(target_os = "none")]
pub mod startup;
#[cfg(target_os = "none")]
pub mod stats_page;
#[cfg(target_os = "none")]
pub mod time;
#[cfg(target_os = "none")]
pub mod vcpu;
