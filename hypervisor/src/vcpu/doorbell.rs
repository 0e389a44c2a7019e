//! `DOORBELL`: a guest wakes a peer it shares a region with, after publishing to a ring the
//! peer sleeps on (the doorbell rule of `vmcall_proto::ring`).
//!
//! * **Into Linux**, the IOAPIC's owner: the doorbell device of its virtual PCI bus
//!   (`crate::pci`) latches the ring and raises its interrupt, which the hypervisor delivers as
//!   the vector Linux programmed for IOAPIC pin [`DOORBELL_IRQ`] to the core it named; Linux's
//!   stock `uio_pci_generic` wakes the agent's blocking `read()`. The device masks its own
//!   interrupt until the agent unmasks it, so a peer ringing in a loop costs Linux one
//!   interrupt per wait of the agent, not one per ring.
//! * **Into Lavender**: the interrupt [`DELEGATION_VECTOR`], announced in its boot-info page
//!   with the region it shares with Linux, sent to one of the cores it runs on (its lowest).
//!
//! The hypervisor also wakes a guest itself when it puts a message on the guest's control
//! ring ([`wake_for_control`]).

use vmcall_proto::hypercall::Status;

use super::ioapic_access;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::cores::CORES;
use crate::guest::control::CONTROL_VECTOR;
use crate::guest::{by_id, Guest, GuestState};
use crate::partition::{Device, GuestKind};
use crate::pci::{Effect, VirtualBus, DOORBELL_IRQ};
use crate::platform::MAX_CPUS;

/// The virtual PCI bus of the guest that owns the IOAPIC (only that guest has interrupt
/// lines the hypervisor can raise).
pub static BUS: VirtualBus = VirtualBus::new();

/// Lavender's doorbell from Linux, announced as the `vector` of the region they share.
pub const DELEGATION_VECTOR: u8 = 0xe9;

/// Whether `guest` has the virtual PCI bus (and its doorbell device).
pub fn has_bus(guest: &Guest) -> bool {
    guest.config.kind == GuestKind::Linux && guest.config.devices.contains(&Device::IoApic)
}

/// `DOORBELL` from `caller` for the peer of the region at guest-physical `region` (RDI, its
/// base as the caller maps it). A peer that is not running is not woken and the call still
/// succeeds: the caller hears of its end from its own channel.
pub fn ring(caller: &Guest, region: u64) -> Status {
    let Some(peer) = caller
        .doorbells
        .iter()
        .find(|(base, _)| *base == region)
        .and_then(|(_, peer)| by_id(*peer))
    else {
        return Status::InvalidArgument;
    };
    if peer.state() != GuestState::Running {
        return Status::Ok;
    }
    match peer.config.kind {
        GuestKind::Linux if has_bus(peer) => {
            deliver(BUS.ring());
            Status::Ok
        }
        GuestKind::Linux => Status::NotSupported,
        GuestKind::Lavender => {
            if let Some(core) = (0..MAX_CPUS).find(|&c| CORES.word(c).runs(peer.id)) {
                LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), DELEGATION_VECTOR);
            }
            Status::Ok
        }
    }
}

/// Wakes `guest` for a message the hypervisor just put on its control ring: Lavender with
/// the control interrupt on core `at` (one it runs on), Linux with its doorbell device, whose
/// listener in the agent wakes the thread that serves the ring. Linux without the device
/// has no handler for an interrupt of ours, and polls its ring.
pub fn wake_for_control(guest: &Guest, at: Option<usize>) {
    match guest.config.kind {
        GuestKind::Lavender => {
            if let Some(core) = at {
                LocalApic::X2Apic.send_fixed(CPUS[core].apic_id(), CONTROL_VECTOR);
            }
        }
        GuestKind::Linux if has_bus(guest) => deliver(BUS.ring()),
        GuestKind::Linux => {}
    }
}

/// Carries out what an access to the virtual bus asked for.
pub fn deliver(effect: Effect) {
    match effect {
        Effect::None => {}
        Effect::RaiseInterrupt => ioapic_access::raise_virtual(usize::from(DOORBELL_IRQ)),
    }
}
