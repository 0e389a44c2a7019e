#![doc = include_str!("../ABI.md")]
#![no_std]

pub mod bootinfo;
pub mod cores;
pub mod delegation;
pub mod demand;
pub mod doorbell;
pub mod hypercall;
pub mod load_history;
pub mod marker;
pub mod message;
pub mod region;
pub mod ring;
pub mod status_page;
mod sync;
pub mod version;
mod wire;

pub use version::{AbiVersion, VersionMismatch, ABI_VERSION};
