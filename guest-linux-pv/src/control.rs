//! Linux's control channel with the hypervisor: the region named [`CONTROL_REGION`] on the
//! command line, mapped only into Linux and only reachable as root (`/dev/mem`). Ring 0
//! carries core events to Linux (grant, revoke) and guest events (Lavender is down), ring 1 Linux's load reports (`load_report`),
//! ring 2 Linux's answers (released, online, offline); the header holds the holder token the
//! management hypercalls need; the data window holds the status and stats pages the
//! hypervisor publishes (`vmcall_proto::status_page`).
//!
//! The agent is the only user of the region: one consumer of ring 0 and one producer of
//! rings 1 and 2 (the rings are single-producer, single-consumer), which is why `vmctl` talks to the
//! agent and never maps the region itself.

use std::sync::Mutex;
use std::time::Duration;

use vmcall_proto::hypercall::{vmcall, Hypercall};
use vmcall_proto::load_history::{self, LoadRecord};
use vmcall_proto::message::{CoreEvent, HypervisorEvent, LoadReport};
use vmcall_proto::region::SharedRegion;
use vmcall_proto::ring::{Consumer, Producer, Record64};
use vmcall_proto::status_page::{self, StatusError};

use crate::cmdline::SharedSpec;
use crate::devmem::Mapping;

/// The name of Linux's control region in the partition configuration.
pub const CONTROL_REGION: &str = "linux-control";
/// The command-line word naming the core behind each Linux CPU number, in CPU order.
pub const CORES_KEY: &str = "tandem.cores";
const EVENTS_TO_GUEST: u32 = 0;
const LOAD_REPORTS: u32 = 1;
const EVENTS_FROM_GUEST: u32 = 2;

/// The agent's end of the channel, for the life of the agent.
pub struct Control {
    pub holder_token: u64,
    events_in: Mutex<Consumer<'static>>,
    events_out: Mutex<Producer<'static>>,
    reports: Mutex<Producer<'static>>,
    status: &'static [std::sync::atomic::AtomicU64],
    stats: &'static [std::sync::atomic::AtomicU64],
    load_history: &'static [std::sync::atomic::AtomicU64],
}

/// The holder token in the header of the control region of `spec` (mapped for the read).
pub fn holder_token(spec: &SharedSpec) -> Result<u64, String> {
    let mapping = Mapping::new(spec.phys, spec.size).map_err(|e| e.to_string())?;
    let region = mapping.region().map_err(|e| e.to_string())?;
    let view = region.attach().map_err(|e| e.to_string())?;
    Ok(view.header().holder_token)
}

impl Control {
    /// Maps and attaches the region of `spec`.
    pub fn attach(spec: &SharedSpec) -> Result<Control, String> {
        let mapping = Mapping::new(spec.phys, spec.size).map_err(|e| e.to_string())?;
        // Mapped for the agent's whole life: the threads serving it never end.
        let mapping: &'static Mapping = Box::leak(Box::new(mapping));
        let region: SharedRegion<'static> = mapping.region().map_err(|e| e.to_string())?;
        let view = region.attach().map_err(|e| e.to_string())?;
        let ring = |index| view.ring(index).map_err(|e| format!("ring {index}: {e:?}"));
        let pages = status_page::pages(view.data_window_words());
        Ok(Control {
            holder_token: view.header().holder_token,
            events_in: Mutex::new(
                Consumer::attach(&region, &ring(EVENTS_TO_GUEST)?).map_err(|e| format!("{e:?}"))?,
            ),
            events_out: Mutex::new(
                Producer::attach(&region, &ring(EVENTS_FROM_GUEST)?)
                    .map_err(|e| format!("{e:?}"))?,
            ),
            reports: Mutex::new(
                Producer::attach(&region, &ring(LOAD_REPORTS)?).map_err(|e| format!("{e:?}"))?,
            ),
            status: pages.status,
            stats: pages.stats,
            load_history: pages.load_history,
        })
    }

    /// The next core or guest event from the hypervisor, if any. A malformed one is skipped.
    pub fn next_event(&self) -> Result<Option<HypervisorEvent>, String> {
        let mut consumer = self.events_in.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = Record64::ZERO;
        loop {
            if !consumer
                .try_pop_record(&mut record)
                .map_err(|e| format!("control ring: {e:?}"))?
            {
                return Ok(None);
            }
            match HypervisorEvent::decode(&record.0) {
                Ok(event) => return Ok(Some(event)),
                Err(e) => eprintln!("tandem-agent: malformed event dropped: {e:?}"),
            }
        }
    }

    /// Tells the hypervisor `event`.
    pub fn send(&self, event: CoreEvent) -> Result<(), String> {
        let mut record = Record64::ZERO;
        event
            .encode(&mut record.0)
            .map_err(|e| format!("encoding {event:?}: {e:?}"))?;
        self.events_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_push_record(&record)
            .map_err(|e| format!("control ring full: {e:?}"))
    }

    /// Asks the hypervisor for a pass of its monitor now (`LOAD_REPORT_KICK`), to read what
    /// was just put on a ring rather than at its next pass. A refusal (the kicks' rate limit)
    /// leaves it to that pass.
    pub fn kick(&self) {
        // SAFETY: the control region's header was written by the Tandem hypervisor (its
        // magic and ABI version were validated when it was attached), so this runs as a
        // Tandem guest, where VMCALL is defined; LOAD_REPORT_KICK takes no arguments and only
        // wakes the hypervisor's monitor.
        let _ = unsafe { vmcall(Hypercall::LoadReportKick, [0; 5], self.holder_token) };
    }

    /// Publishes a load report (a full ring drops it: the next one says the same, newer).
    pub fn send_report(&self, report: &LoadReport) -> Result<(), String> {
        let mut bytes = [0u8; 256];
        let len = report
            .encode(&mut bytes)
            .map_err(|e| format!("encoding a load report: {e:?}"))?;
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_push(&bytes[..len])
            .map_err(|e| format!("load-report ring: {e:?}"))
    }

    /// The status page the hypervisor last published (JSON text). While the hypervisor is
    /// writing it, tries again a little later (up to about a second).
    pub fn status(&self) -> Result<String, String> {
        read_page(self.status, "status page")
    }

    /// The stats page the hypervisor last published (JSON text), as [`Control::status`].
    pub fn stats(&self) -> Result<String, String> {
        read_page(self.stats, "stats page")
    }

    /// The load history's records from `cursor` on (oldest first), the next cursor and how
    /// many records since `cursor` the hypervisor overwrote before this read.
    pub fn load_history_since(&self, cursor: u64) -> Result<(Vec<LoadRecord>, u64, u64), String> {
        let mut records = Vec::new();
        let (next, lost) = load_history::read_since(self.load_history, cursor, |r| records.push(r))
            .map_err(|e| format!("load history: {e:?}"))?;
        Ok((records, next, lost))
    }
}

fn read_page(words: &[std::sync::atomic::AtomicU64], what: &str) -> Result<String, String> {
    let mut buffer = vec![0u8; status_page::capacity(words)];
    let mut tries = 0;
    let len = loop {
        match status_page::read(words, &mut buffer) {
            Ok((len, _)) => break len,
            Err(StatusError::Torn) if tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("{what}: {e:?}")),
        }
    };
    buffer.truncate(len);
    String::from_utf8(buffer).map_err(|_| format!("{what} is not UTF-8"))
}

/// The cores behind Linux's CPU numbers, from `tandem.cores=1,3` (CPU 0 is core 1, ...).
pub fn cpu_cores(cmdline: &str) -> Vec<u64> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(CORES_KEY)?.strip_prefix('='))
        .next_back()
        .map(|list| {
            list.split(',')
                .map_while(|c| c.parse().ok().filter(|&c: &u64| c < 64))
                .take(64)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_word_maps_cpu_numbers() {
        assert_eq!(cpu_cores("console=ttyS0 tandem.cores=1,3 quiet"), [1, 3]);
        assert_eq!(cpu_cores("tandem.cores=2"), [2]);
        assert!(cpu_cores("quiet").is_empty());
        // Garbage ends the list; cores past 63 do not exist.
        assert_eq!(cpu_cores("tandem.cores=1,x,3"), [1]);
        assert_eq!(cpu_cores("tandem.cores=1,64"), [1]);
    }
}
