//! The control channel between the hypervisor and a guest: a shared region the hypervisor
//! lays out with three rings (docs/architecture.md, "The paravirtual channel"):
//! ring 0 core and guest events hypervisor -> guest, ring 1 load reports guest -> hypervisor,
//! ring 2 core events guest -> hypervisor. After pushing on ring 0 the hypervisor wakes the
//! guest (`crate::vcpu::doorbell::wake_for_control`): Lavender with an interrupt with
//! [`CONTROL_VECTOR`], Linux with its doorbell device. The guest also polls the ring, so a
//! lost interrupt only delays.

use core::fmt;
use core::sync::atomic::AtomicU64;

use spin::Mutex;
use vmcall_proto::load_history::LoadRecord;
use vmcall_proto::message::{CoreEvent, HypervisorEvent, LoadReport};
use vmcall_proto::region::{LayoutError, RingSpec, SharedRegion};
use vmcall_proto::ring::{Consumer, Producer, PushError, Record64, RingError, SlotFormat};

/// Interrupt vector of the control doorbell, announced in the boot-info page.
pub const CONTROL_VECTOR: u8 = 0xe8;
const EVENTS_TO_GUEST: u32 = 0;
const LOAD_REPORTS: u32 = 1;
const EVENTS_FROM_GUEST: u32 = 2;
/// Core events are 16-byte messages in 64-byte record slots: the whole slot is the message,
/// zero-padded (the decoders accept zero padding), and the format is recorded in each ring's
/// descriptor, where the guest reads it.
const RINGS: [RingSpec; 3] = [
    RingSpec {
        slot_count: 64,
        slot_size: 64,
        format: SlotFormat::Record,
    },
    // A load report for 64 cores takes 160 bytes.
    RingSpec {
        slot_count: 64,
        slot_size: 256,
        format: SlotFormat::Framed,
    },
    RingSpec {
        slot_count: 64,
        slot_size: 64,
        format: SlotFormat::Record,
    },
];

#[derive(Clone, Copy, Debug)]
pub enum ControlError {
    Layout(LayoutError),
    Ring(RingError),
    Push(PushError),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(e) => write!(f, "control region layout: {e:?}"),
            Self::Ring(e) => write!(f, "control ring: {e:?}"),
            Self::Push(e) => write!(f, "control ring push: {e:?}"),
        }
    }
}

pub struct ControlChannel {
    /// The guest's holder token, published in this region's header only (see
    /// `vmcall_proto::hypercall`, "Privilege"): 0 when the guest has none.
    pub holder_token: u64,
    /// The parts of the data window where the hypervisor publishes the guest's status and
    /// stats pages (`vmcall_proto::status_page`) and the load history
    /// (`vmcall_proto::load_history`; its lock keeps it to one writer at a time).
    status: &'static [AtomicU64],
    stats: &'static [AtomicU64],
    load_history: Mutex<&'static [AtomicU64]>,
    to_guest: Mutex<Producer<'static>>,
    reports: Mutex<Consumer<'static>>,
    from_guest: Mutex<Consumer<'static>>,
}

impl ControlChannel {
    /// Lays out the region (before the guest runs) with `holder_token` in its header and
    /// attaches the hypervisor's ends.
    pub fn create(words: &'static [AtomicU64], holder_token: u64) -> Result<Self, ControlError> {
        let region = SharedRegion::new(words);
        region
            .initialize(&RINGS, holder_token)
            .map_err(ControlError::Layout)?;
        let view = region.attach().map_err(ControlError::Layout)?;
        let ring = |index| view.ring(index).map_err(ControlError::Layout);
        let pages = vmcall_proto::status_page::pages(view.data_window_words());
        Ok(Self {
            holder_token,
            status: pages.status,
            stats: pages.stats,
            load_history: Mutex::new(pages.load_history),
            to_guest: Mutex::new(
                Producer::attach(&region, &ring(EVENTS_TO_GUEST)?).map_err(ControlError::Ring)?,
            ),
            reports: Mutex::new(
                Consumer::attach(&region, &ring(LOAD_REPORTS)?).map_err(ControlError::Ring)?,
            ),
            from_guest: Mutex::new(
                Consumer::attach(&region, &ring(EVENTS_FROM_GUEST)?).map_err(ControlError::Ring)?,
            ),
        })
    }

    /// Queues a core or guest event for the guest (the caller rings the doorbell).
    pub fn send(&self, event: impl Into<HypervisorEvent>) -> Result<(), ControlError> {
        // Events travel as 64-byte records (the rings' format is in their descriptors).
        let mut record = Record64::ZERO;
        event.into().encode(&mut record.0).map_err(|_| {
            ControlError::Push(PushError::TooLarge {
                len: HypervisorEvent::MAX_ENCODED_LEN,
                capacity: record.0.len(),
            })
        })?;
        self.to_guest
            .lock()
            .try_push_record(&record)
            .map_err(ControlError::Push)
    }

    /// Publishes `document` as the guest's status page (one writer: the BSP).
    pub fn publish_status(&self, document: &[u8]) {
        if let Err(e) = vmcall_proto::status_page::write(self.status, document) {
            log::warn!("status page not published: {e:?}");
        }
    }

    /// Publishes `document` as the guest's stats page (one writer: the BSP).
    pub fn publish_stats(&self, document: &[u8]) {
        if let Err(e) = vmcall_proto::status_page::write(self.stats, document) {
            log::warn!("stats page not published: {e:?}");
        }
    }

    /// Appends a load report (any guest's) to the region's load history.
    pub fn record_load(&self, record: &LoadRecord) {
        vmcall_proto::load_history::append(*self.load_history.lock(), record);
    }

    /// Hands every queued load report to `each`. A malformed one ends the drain with an
    /// error (the guest wrote garbage); the ring itself stays usable.
    pub fn drain_reports(&self, mut each: impl FnMut(LoadReport)) -> Result<(), ControlError> {
        let mut consumer = self.reports.lock();
        let mut bytes = [0u8; 256];
        while let Some(len) = consumer.try_pop(&mut bytes).map_err(ControlError::Ring)? {
            match LoadReport::decode(&bytes[..len]) {
                Ok(report) => each(report),
                Err(e) => log::warn!("malformed load report dropped: {e:?}"),
            }
        }
        Ok(())
    }

    /// Hands every core event the guest sent to `each`.
    pub fn drain_events(&self, mut each: impl FnMut(CoreEvent)) -> Result<(), ControlError> {
        let mut consumer = self.from_guest.lock();
        let mut record = Record64::ZERO;
        while consumer
            .try_pop_record(&mut record)
            .map_err(ControlError::Ring)?
        {
            match CoreEvent::decode(&record.0) {
                Ok(event) => each(event),
                Err(e) => log::warn!("malformed core event dropped: {e:?}"),
            }
        }
        Ok(())
    }
}
