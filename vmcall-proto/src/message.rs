//! Messages carried in ring slots: encoders, and decoders that validate every field.
//!
//! Every message starts with a 4-byte header: a `u16` tag naming the type and a `u16` that must be
//! zero. The body that follows has a fixed layout per tag (little-endian, no padding on the wire;
//! the tables in the crate documentation give every offset). A decoder accepts exactly that
//! encoding, followed by any number of zero bytes (the padding of a record slot, which is always
//! a whole slot long): a short message, a non-zero byte after the message, an unknown tag, an
//! out-of-range value, a non-zero reserved field or a buffer reference outside the data window is
//! a [`DecodeError`].

use core::fmt;

use bitflags::bitflags;

use crate::cores::{CoreId, CoreSet, MAX_CORES};
use crate::region::{BufferRef, WindowError};
use crate::wire::{Reader, Writer};

/// Message tags. Grouped by family in the high byte.
pub mod tag {
    pub const LOAD_REPORT: u16 = 0x0101;
    pub const CORE_EVENT: u16 = 0x0201;
    pub const GUEST_EVENT: u16 = 0x0202;
    pub const SYSCALL_REQUEST: u16 = 0x0301;
    pub const REPLY: u16 = 0x0302;
    pub const NOTIFICATION: u16 = 0x0303;
    pub const PROCESS_EXEC: u16 = 0x0401;
    pub const PROCESS_SIGNAL: u16 = 0x0402;
    pub const PROCESS_LIST: u16 = 0x0403;
    pub const PROCESS_LIST_ENTRY: u16 = 0x0404;
}

/// Bytes of the tag + reserved header every message starts with.
pub const MESSAGE_HEADER_SIZE: usize = 4;

/// A message could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ends before field bytes `..needed`.
    Truncated {
        needed: usize,
        available: usize,
    },
    /// The `extra` bytes after the message's encoding are not all zero (zero padding is
    /// accepted).
    TrailingBytes {
        extra: usize,
    },
    UnknownTag(u16),
    /// A typed decoder was handed another type's message.
    WrongTag {
        expected: u16,
        found: u16,
    },
    /// An enumeration field holds no known variant.
    BadEnumValue {
        field: &'static str,
        value: u64,
    },
    /// A reserved field or flag bit is not zero.
    ReservedBitsSet {
        field: &'static str,
    },
    /// A numeric field is outside its allowed range.
    OutOfRange {
        field: &'static str,
        value: u64,
    },
    /// A buffer reference does not fit the data window.
    Buffer(WindowError),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(f, "message truncated: {available} bytes, needs {needed}")
            }
            Self::TrailingBytes { extra } => {
                write!(f, "{extra} bytes after the message are not all zero")
            }
            Self::UnknownTag(tag) => write!(f, "unknown message tag {tag:#06x}"),
            Self::WrongTag { expected, found } => {
                write!(
                    f,
                    "expected message tag {expected:#06x}, found {found:#06x}"
                )
            }
            Self::BadEnumValue { field, value } => write!(f, "{field}: no variant {value}"),
            Self::ReservedBitsSet { field } => write!(f, "{field}: reserved bits set"),
            Self::OutOfRange { field, value } => write!(f, "{field}: {value} is out of range"),
            Self::Buffer(error) => write!(f, "{error}"),
        }
    }
}

impl core::error::Error for DecodeError {}

impl From<WindowError> for DecodeError {
    fn from(error: WindowError) -> Self {
        Self::Buffer(error)
    }
}

/// A message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output (usually a ring slot) is shorter than the encoding.
    BufferTooSmall { needed: usize, available: usize },
    /// A field holds a value the wire format cannot carry.
    OutOfRange { field: &'static str, value: u64 },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed, available } => {
                write!(f, "encoding needs {needed} bytes, {available} available")
            }
            Self::OutOfRange { field, value } => write!(f, "{field}: {value} cannot be encoded"),
        }
    }
}

impl core::error::Error for EncodeError {}

#[inline]
fn start(out: &mut [u8], tag: u16) -> Result<Writer<'_>, EncodeError> {
    let mut writer = Writer::new(out);
    writer.u16(tag)?;
    writer.u16(0)?;
    Ok(writer)
}

#[inline]
fn open(bytes: &[u8], expected: u16) -> Result<Reader<'_>, DecodeError> {
    let mut reader = Reader::new(bytes);
    let found = reader.u16()?;
    if found != expected {
        return Err(DecodeError::WrongTag { expected, found });
    }
    reader.reserved::<2>("message header")?;
    Ok(reader)
}

#[inline]
fn core_id(value: u64, field: &'static str) -> Result<CoreId, DecodeError> {
    CoreId::new(value).ok_or(DecodeError::OutOfRange { field, value })
}

fn buffer(reader: &mut Reader<'_>, window_len: u64) -> Result<BufferRef, DecodeError> {
    let offset = reader.u32()?;
    let len = reader.u32()?;
    Ok(BufferRef { offset, len }.validate(window_len)?)
}

fn put_buffer(writer: &mut Writer<'_>, buffer: BufferRef) -> Result<(), EncodeError> {
    writer.u32(buffer.offset)?;
    writer.u32(buffer.len)
}

// ---------------------------------------------------------------------------------------------
// Load report

/// Utilisation as a fixed-point fraction: 0 (idle) to 1000 (busy the whole window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permille(u16);

impl Permille {
    pub const FULL: Permille = Permille(1000);

    pub const fn new(value: u16) -> Option<Self> {
        if value <= 1000 {
            Some(Self(value))
        } else {
            None
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// Guest -> hypervisor: how loaded the guest was over its last window and what it wants.
///
/// Wire (32 + 2n bytes, n = cores reported): header, `runnable_threads: u32`,
/// `timestamp_ns: u64`, `window_us: u32`, `requested_core_delta: i16`, `hint: u8`, `flags: u8`
/// (bit 0: [`LoadReport::final_offer`]; the others reserved), `reported_cores: u64` mask, then one `u16` per-mille per reported core in ascending core order.
/// All 64 cores take 160 bytes: a 256-byte slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The guest's monotonic clock (ns) at the end of the window; orders a guest's reports.
    pub timestamp_ns: u64,
    /// Length of the measurement window.
    pub window_us: u32,
    /// Threads ready to run (running or queued) at the end of the window.
    pub runnable_threads: u32,
    /// Cores the guest would like to gain (positive) or give back (negative).
    pub requested_core_delta: i16,
    /// What kind of work keeps it busy.
    pub hint: WorkloadHint,
    /// The cores it offers (a negative request), none of its live work can use: the work
    /// that ran on them ended, so it will not ask for them back until new work starts, and
    /// they may go at once. False when it offers nothing, or cores some live work of it may
    /// want again (a job between two phases).
    pub final_offer: bool,
    busy: [Permille; MAX_CORES],
    reported: CoreSet,
}

impl LoadReport {
    const FIXED_LEN: usize = 32;

    pub fn new(
        timestamp_ns: u64,
        window_us: u32,
        runnable_threads: u32,
        requested_core_delta: i16,
    ) -> Self {
        Self {
            timestamp_ns,
            window_us,
            runnable_threads,
            requested_core_delta,
            hint: WorkloadHint::Unknown,
            final_offer: false,
            busy: [Permille(0); MAX_CORES],
            reported: CoreSet::EMPTY,
        }
    }

    /// The report with its workload hint.
    pub fn with_hint(mut self, hint: WorkloadHint) -> Self {
        self.hint = hint;
        self
    }

    /// The report with [`LoadReport::final_offer`] set as `final_offer` says.
    pub fn with_final_offer(mut self, final_offer: bool) -> Self {
        self.final_offer = final_offer;
        self
    }

    /// Records how busy `core` was over the window.
    pub fn set_busy(&mut self, core: CoreId, busy: Permille) {
        self.busy[core.index()] = busy;
        self.reported = self.reported.with(core);
    }

    /// How busy `core` was, if reported.
    pub fn busy(&self, core: CoreId) -> Option<Permille> {
        self.reported
            .contains(core)
            .then(|| self.busy[core.index()])
    }

    pub fn reported_cores(&self) -> CoreSet {
        self.reported
    }

    pub fn encoded_len(&self) -> usize {
        Self::FIXED_LEN + 2 * self.reported.len() as usize
    }

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut writer = start(out, tag::LOAD_REPORT)?;
        writer.u32(self.runnable_threads)?;
        writer.u64(self.timestamp_ns)?;
        writer.u32(self.window_us)?;
        writer.u16(self.requested_core_delta as u16)?;
        writer.u8(self.hint as u8)?;
        writer.u8(if self.final_offer { FINAL_OFFER } else { 0 })?;
        writer.u64(self.reported.0)?;
        for core in self.reported.iter() {
            writer.u16(self.busy[core.index()].get())?;
        }
        Ok(writer.finish())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::LOAD_REPORT)?;
        let runnable_threads = reader.u32()?;
        let timestamp_ns = reader.u64()?;
        let window_us = reader.u32()?;
        let requested_core_delta = reader.u16()? as i16;
        let hint = reader.u8()?;
        let hint = WorkloadHint::from_u8(hint).ok_or(DecodeError::OutOfRange {
            field: "workload hint",
            value: hint.into(),
        })?;
        let flags = reader.u8()?;
        if flags & !FINAL_OFFER != 0 {
            return Err(DecodeError::ReservedBitsSet {
                field: "load report flags",
            });
        }
        let mut report = Self::new(
            timestamp_ns,
            window_us,
            runnable_threads,
            requested_core_delta,
        )
        .with_hint(hint)
        .with_final_offer(flags & FINAL_OFFER != 0);
        for core in CoreSet(reader.u64()?).iter() {
            let value = reader.u16()?;
            let busy = Permille::new(value).ok_or(DecodeError::OutOfRange {
                field: "busy per-mille",
                value: value.into(),
            })?;
            report.set_busy(core, busy);
        }
        reader.finish()?;
        Ok(report)
    }
}

/// [`LoadReport`]'s flag bit for [`LoadReport::final_offer`].
const FINAL_OFFER: u8 = 1;

/// A guest's word on its workload, in its load reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkloadHint {
    /// Not said (what reports before ABI 2.3 carried: a zero byte).
    #[default]
    Unknown = 0,
    /// Compute-bound: more cores help.
    Compute = 1,
    /// I/O-bound: its threads mostly wait.
    IoBound = 2,
}

impl WorkloadHint {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Unknown),
            1 => Some(Self::Compute),
            2 => Some(Self::IoBound),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Core events

/// Why a guest kept a core it was asked to give up ([`CoreEvent::Declined`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclineReason {
    /// Without the core its runnable threads would exceed its cores.
    Busy = 1,
    /// Its operator told it to keep its cores (Linux's agent, for tests).
    Refused = 2,
    /// It could not let the core go (Linux could not take the CPU offline).
    Unable = 3,
}

impl DeclineReason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Refused => "refused",
            Self::Unable => "unable",
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Busy,
            2 => Self::Refused,
            3 => Self::Unable,
            _ => return None,
        })
    }
}

/// Hypervisor <-> guest: a change in who owns a core.
///
/// Wire (16 bytes): header, `kind: u8` (1 grant, 2 revoke, 3 released, 4 online, 5 offline,
/// 6 taken, 7 declined), `arg: u8` (revoke: flags, bit 0 [`REVOKE_NEGOTIABLE`]; declined: the
/// [`DeclineReason`]; zero otherwise), `core: u16`, `deadline_us: u32` (revoke only, zero
/// otherwise), reserved `u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// Hypervisor -> guest: the core is yours; bring it up.
    Grant { core: CoreId },
    /// Hypervisor -> guest: release the core within `deadline_us` of this event being posted, or
    /// it is taken by force. A `negotiable` revoke (a policy's) may be answered with
    /// [`CoreEvent::Declined`] instead, before the deadline.
    Revoke {
        core: CoreId,
        deadline_us: u32,
        negotiable: bool,
    },
    /// Guest -> hypervisor: the core was handed back (Linux: after offlining it).
    Released { core: CoreId },
    /// Guest -> hypervisor: the granted core is up and scheduling.
    Online { core: CoreId },
    /// Guest -> hypervisor: the core stopped scheduling and is about to be released.
    Offline { core: CoreId },
    /// Hypervisor -> guest: the core missed its release deadline and was taken by force; it
    /// is parked and scrubbed, and the guest must not count on it (what its kernel left queued
    /// there is the guest's to pick up; the registers of what ran there are gone).
    Taken { core: CoreId },
    /// Guest -> hypervisor: the guest keeps the core it was asked to give up, for `reason`.
    Declined { core: CoreId, reason: DeclineReason },
}

/// Revoke flag: the guest may decline (a policy's revoke; a revoke without it must be
/// honoured).
pub const REVOKE_NEGOTIABLE: u8 = 1;

impl CoreEvent {
    pub const ENCODED_LEN: usize = 16;

    pub fn core(&self) -> CoreId {
        match *self {
            Self::Grant { core }
            | Self::Revoke { core, .. }
            | Self::Released { core }
            | Self::Online { core }
            | Self::Offline { core }
            | Self::Taken { core }
            | Self::Declined { core, .. } => core,
        }
    }

    #[inline]
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let (kind, arg, deadline_us) = match *self {
            Self::Grant { .. } => (1, 0, 0),
            Self::Revoke {
                deadline_us,
                negotiable,
                ..
            } => (2, u8::from(negotiable) * REVOKE_NEGOTIABLE, deadline_us),
            Self::Released { .. } => (3, 0, 0),
            Self::Online { .. } => (4, 0, 0),
            Self::Offline { .. } => (5, 0, 0),
            Self::Taken { .. } => (6, 0, 0),
            Self::Declined { reason, .. } => (7, reason as u8, 0),
        };
        let mut writer = start(out, tag::CORE_EVENT)?;
        writer.u8(kind)?;
        writer.u8(arg)?;
        writer.u16(self.core().index() as u16)?;
        writer.u32(deadline_us)?;
        writer.u32(0)?;
        Ok(writer.finish())
    }

    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::CORE_EVENT)?;
        let kind = reader.u8()?;
        let arg = reader.u8()?;
        let core = core_id(reader.u16()?.into(), "core event core")?;
        let deadline_us = reader.u32()?;
        reader.reserved::<4>("core event")?;
        reader.finish()?;
        let event = match kind {
            1 => Self::Grant { core },
            2 => {
                if arg & !REVOKE_NEGOTIABLE != 0 {
                    return Err(DecodeError::ReservedBitsSet {
                        field: "revoke flags",
                    });
                }
                return Ok(Self::Revoke {
                    core,
                    deadline_us,
                    negotiable: arg & REVOKE_NEGOTIABLE != 0,
                });
            }
            3 => Self::Released { core },
            4 => Self::Online { core },
            5 => Self::Offline { core },
            6 => Self::Taken { core },
            7 => {
                let Some(reason) = DeclineReason::from_u8(arg) else {
                    return Err(DecodeError::BadEnumValue {
                        field: "decline reason",
                        value: arg.into(),
                    });
                };
                Self::Declined { core, reason }
            }
            _ => {
                return Err(DecodeError::BadEnumValue {
                    field: "core event kind",
                    value: kind.into(),
                })
            }
        };
        if deadline_us != 0 {
            return Err(DecodeError::ReservedBitsSet {
                field: "deadline of a non-revoke event",
            });
        }
        if arg != 0 && !matches!(event, Self::Declined { .. }) {
            return Err(DecodeError::ReservedBitsSet {
                field: "core event argument",
            });
        }
        Ok(event)
    }
}

/// How a guest that went down ended ([`GuestEvent::Down`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownState {
    /// The hypervisor stopped it: a crash, a violation, a hang, or a reset it asked for.
    Stopped = 1,
    /// It halted for good (its last core halted with interrupts off).
    Halted = 2,
}

impl DownState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Halted => "halted",
        }
    }
}

/// Hypervisor -> guest: a change of another guest as a whole. Travels on the control region's
/// ring 0 beside [`CoreEvent`]s (see [`HypervisorEvent`]).
///
/// Wire (16 bytes): header, `kind: u8` (1 down), `state: u8` ([`DownState`]), reserved `u16`,
/// `guest: u32` (the guest's id, as a boot-info shared region's `peer` names it), reserved
/// `u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest is down for good and every core it held is back in the hypervisor's pool:
    /// whatever it was serving through a region it shares with the receiver will never be
    /// answered, and nothing it wrote there will change again.
    Down { guest: u32, state: DownState },
}

impl GuestEvent {
    pub const ENCODED_LEN: usize = 16;

    #[inline]
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let Self::Down { guest, state } = *self;
        let mut writer = start(out, tag::GUEST_EVENT)?;
        writer.u8(1)?;
        writer.u8(state as u8)?;
        writer.u16(0)?;
        writer.u32(guest)?;
        writer.u32(0)?;
        Ok(writer.finish())
    }

    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::GUEST_EVENT)?;
        let kind = reader.u8()?;
        let state = reader.u8()?;
        reader.reserved::<2>("guest event")?;
        let guest = reader.u32()?;
        reader.reserved::<4>("guest event")?;
        reader.finish()?;
        if kind != 1 {
            return Err(DecodeError::BadEnumValue {
                field: "guest event kind",
                value: kind.into(),
            });
        }
        let state = match state {
            1 => DownState::Stopped,
            2 => DownState::Halted,
            _ => {
                return Err(DecodeError::BadEnumValue {
                    field: "guest down state",
                    value: state.into(),
                })
            }
        };
        Ok(Self::Down { guest, state })
    }
}

/// What the hypervisor posts on a control region's ring 0: one record, told apart by its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorEvent {
    Core(CoreEvent),
    Guest(GuestEvent),
}

impl From<CoreEvent> for HypervisorEvent {
    fn from(event: CoreEvent) -> Self {
        Self::Core(event)
    }
}

impl From<GuestEvent> for HypervisorEvent {
    fn from(event: GuestEvent) -> Self {
        Self::Guest(event)
    }
}

impl HypervisorEvent {
    /// Every event on ring 0 is at most this long (a 64-byte record holds it).
    pub const MAX_ENCODED_LEN: usize = 16;

    #[inline]
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Self::Core(event) => event.encode(out),
            Self::Guest(event) => event.encode(out),
        }
    }

    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match peek_tag(bytes)? {
            tag::CORE_EVENT => Ok(Self::Core(CoreEvent::decode(bytes)?)),
            tag::GUEST_EVENT => Ok(Self::Guest(GuestEvent::decode(bytes)?)),
            other => Err(DecodeError::UnknownTag(other)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Delegated system calls

/// Who issued a delegated system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The Lavender core that waits for the reply.
    pub core: CoreId,
    pub process: u32,
    pub thread: u32,
}

bitflags! {
    /// Flags of a delegated system call.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SyscallFlags: u16 {
        /// Keep the Linux-side context of this process after the call (a sequence of related
        /// calls: open, read, close). Without it the server may drop the context.
        const CONTINUATION = 1 << 0;
    }
}

/// Lavender -> Linux: run a system call on behalf of a Lavender thread.
///
/// Wire (92 bytes, a 128-byte slot): header, `request_id: u64`, `core: u16`, `flags: u16`,
/// `process: u32`, `thread: u32`, `number: u32`, `args: [u64; 6]`, then two buffer references
/// `(offset: u32, len: u32)` into the data window. Pointer arguments are never sent: the caller
/// copies data into the window and the server reads and writes it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallRequest {
    /// Chosen by the caller, echoed in the reply or the completion notification.
    pub request_id: u64,
    pub caller: Caller,
    /// Linux x86-64 system-call number.
    pub number: u32,
    pub args: [u64; 6],
    pub flags: SyscallFlags,
    /// In/out data (path, read buffer, write data); `BufferRef::EMPTY` when unused.
    pub buffers: [BufferRef; 2],
}

impl SyscallRequest {
    pub const ENCODED_LEN: usize = 92;

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut writer = start(out, tag::SYSCALL_REQUEST)?;
        writer.u64(self.request_id)?;
        writer.u16(self.caller.core.index() as u16)?;
        writer.u16(self.flags.bits())?;
        writer.u32(self.caller.process)?;
        writer.u32(self.caller.thread)?;
        writer.u32(self.number)?;
        for arg in self.args {
            writer.u64(arg)?;
        }
        for buffer in self.buffers {
            put_buffer(&mut writer, buffer)?;
        }
        Ok(writer.finish())
    }

    /// Decodes and checks both buffer references against a data window of `window_len` bytes.
    pub fn decode(bytes: &[u8], window_len: u64) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::SYSCALL_REQUEST)?;
        let request_id = reader.u64()?;
        let core = core_id(reader.u16()?.into(), "syscall caller core")?;
        let flags = SyscallFlags::from_bits(reader.u16()?).ok_or(DecodeError::ReservedBitsSet {
            field: "syscall flags",
        })?;
        let process = reader.u32()?;
        let thread = reader.u32()?;
        let number = reader.u32()?;
        let mut args = [0u64; 6];
        for arg in &mut args {
            *arg = reader.u64()?;
        }
        let buffers = [
            buffer(&mut reader, window_len)?,
            buffer(&mut reader, window_len)?,
        ];
        reader.finish()?;
        Ok(Self {
            request_id,
            caller: Caller {
                core,
                process,
                thread,
            },
            number,
            args,
            flags,
            buffers,
        })
    }
}

/// A Linux errno value, 1..=4095.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(u16);

impl Errno {
    pub const MAX: u16 = 4095;

    pub const fn new(value: u16) -> Option<Self> {
        if value >= 1 && value <= Self::MAX {
            Some(Self(value))
        } else {
            None
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// Result of a delegated call or a process command, carried as one `i64` the way Linux returns
/// it: non-negative is a value, `-4095..=-1` is `-errno`, anything else is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// At most `i64::MAX`.
    Value(u64),
    Errno(Errno),
}

impl Outcome {
    fn to_wire(self) -> Result<i64, EncodeError> {
        match self {
            Self::Value(value) => i64::try_from(value).map_err(|_| EncodeError::OutOfRange {
                field: "outcome value",
                value,
            }),
            Self::Errno(errno) => Ok(-i64::from(errno.get())),
        }
    }

    fn from_wire(raw: i64) -> Result<Self, DecodeError> {
        if raw >= 0 {
            return Ok(Self::Value(raw as u64));
        }
        u16::try_from(raw.unsigned_abs())
            .ok()
            .and_then(Errno::new)
            .map(Self::Errno)
            .ok_or(DecodeError::OutOfRange {
                field: "outcome",
                value: raw as u64,
            })
    }
}

/// Linux -> Lavender: the answer to a [`SyscallRequest`] or a [`ProcessCommand`].
///
/// Wire (20 bytes): header, `request_id: u64`, `outcome: i64`. After a [`ProcessCommand::List`]
/// the reply's value is the number of [`ProcessListEntry`] messages sent before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub request_id: u64,
    pub outcome: Outcome,
}

impl Reply {
    pub const ENCODED_LEN: usize = 20;

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let outcome = self.outcome.to_wire()?;
        let mut writer = start(out, tag::REPLY)?;
        writer.u64(self.request_id)?;
        writer.i64(outcome)?;
        Ok(writer.finish())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::REPLY)?;
        let request_id = reader.u64()?;
        let outcome = Outcome::from_wire(reader.i64()?)?;
        reader.finish()?;
        Ok(Self {
            request_id,
            outcome,
        })
    }
}

/// A Lavender process's new state, as reported to Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessState {
    Started,
    Stopped,
    Continued,
    /// Exited by itself with this status.
    Exited {
        status: i32,
    },
    /// Ended by a signal (1..=64).
    Killed {
        signal: u8,
    },
}

/// Something happened that nobody is waiting on with a reply.
///
/// Wire (28 bytes): header, `kind: u8` (1 completion, 2 process state), `state: u8` (0 for a
/// completion; 1 started, 2 stopped, 3 continued, 4 exited, 5 killed), reserved `u16`,
/// `process: u32` (0 for a completion), `request_id: u64` (0 for a state change),
/// `value: i64` (the outcome, the exit status, the signal, or 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notification {
    /// An asynchronous request finished.
    Completion { request_id: u64, outcome: Outcome },
    /// Lavender -> Linux: a process changed state.
    ProcessState { process: u32, state: ProcessState },
}

impl Notification {
    pub const ENCODED_LEN: usize = 28;

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let (kind, state, process, request_id, value) = match *self {
            Self::Completion {
                request_id,
                outcome,
            } => (1, 0, 0, request_id, outcome.to_wire()?),
            Self::ProcessState { process, state } => {
                let (code, value) = match state {
                    ProcessState::Started => (1, 0),
                    ProcessState::Stopped => (2, 0),
                    ProcessState::Continued => (3, 0),
                    ProcessState::Exited { status } => (4, i64::from(status)),
                    ProcessState::Killed { signal } => {
                        if !(1..=64).contains(&signal) {
                            return Err(EncodeError::OutOfRange {
                                field: "signal",
                                value: signal.into(),
                            });
                        }
                        (5, i64::from(signal))
                    }
                };
                (2, code, process, 0, value)
            }
        };
        let mut writer = start(out, tag::NOTIFICATION)?;
        writer.u8(kind)?;
        writer.u8(state)?;
        writer.u16(0)?;
        writer.u32(process)?;
        writer.u64(request_id)?;
        writer.i64(value)?;
        Ok(writer.finish())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::NOTIFICATION)?;
        let kind = reader.u8()?;
        let state = reader.u8()?;
        reader.reserved::<2>("notification")?;
        let process = reader.u32()?;
        let request_id = reader.u64()?;
        let value = reader.i64()?;
        reader.finish()?;
        match kind {
            1 => {
                if state != 0 || process != 0 {
                    return Err(DecodeError::ReservedBitsSet {
                        field: "completion state/process",
                    });
                }
                Ok(Self::Completion {
                    request_id,
                    outcome: Outcome::from_wire(value)?,
                })
            }
            2 => {
                if request_id != 0 {
                    return Err(DecodeError::ReservedBitsSet {
                        field: "state change request id",
                    });
                }
                let no_value = |state| {
                    if value == 0 {
                        Ok(state)
                    } else {
                        Err(DecodeError::ReservedBitsSet {
                            field: "state change value",
                        })
                    }
                };
                let state = match state {
                    1 => no_value(ProcessState::Started)?,
                    2 => no_value(ProcessState::Stopped)?,
                    3 => no_value(ProcessState::Continued)?,
                    4 => ProcessState::Exited {
                        status: i32::try_from(value).map_err(|_| DecodeError::OutOfRange {
                            field: "exit status",
                            value: value as u64,
                        })?,
                    },
                    5 => ProcessState::Killed {
                        signal: u8::try_from(value)
                            .ok()
                            .filter(|signal| (1..=64).contains(signal))
                            .ok_or(DecodeError::OutOfRange {
                                field: "signal",
                                value: value as u64,
                            })?,
                    },
                    other => {
                        return Err(DecodeError::BadEnumValue {
                            field: "process state",
                            value: other.into(),
                        })
                    }
                };
                Ok(Self::ProcessState { process, state })
            }
            other => Err(DecodeError::BadEnumValue {
                field: "notification kind",
                value: other.into(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process management (Linux -> Lavender, answered by `Reply`)

/// What to do to a running process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessAction {
    /// Ends it as SIGKILL does (status 137).
    Kill = 1,
    Stop = 2,
    Continue = 3,
    /// Ends it as SIGINT does (status 130): Ctrl-C in an attached `vmctl exec`.
    Interrupt = 4,
}

bitflags! {
    /// How an [`ProcessCommand::Exec`] is to be read.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ExecFlags: u16 {
        /// The program buffer holds an ELF file, not the name of a built-in program.
        const IMAGE = 1 << 0;
        /// The process's standard streams (0, 1, 2) are delegated: its `write`s to streams 1
        /// and 2 go to Linux as `write` calls on fds 1 and 2 of its context, whose fds 0-2 the
        /// agent installs (the launcher's own).
        const STDIO = 1 << 1;
    }
}

/// Linux (`vmctl`) -> Lavender: manage Lavender processes.
///
/// * `Exec` (32 bytes): header, `request_id: u64`, `cores: u16`, `flags: u16` ([`ExecFlags`]),
///   `program` and `arguments` buffer references in the data window: the program (the name of
///   one built into Lavender's image, or with [`ExecFlags::IMAGE`] the bytes of an ELF file),
///   and NUL-separated arguments. Answered by a [`Reply`] whose value is the new process id.
/// * `Signal` (20 bytes): header, `request_id: u64`, `process: u32`, `action: u8`, reserved
///   `u8` + `u16`. Answered by a [`Reply`] with value 0.
/// * `List` (12 bytes): header, `request_id: u64`. Answered by one [`ProcessListEntry`] per
///   process, then a [`Reply`] whose value is their count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessCommand {
    Exec {
        request_id: u64,
        cores: u16,
        flags: ExecFlags,
        program: BufferRef,
        arguments: BufferRef,
    },
    Signal {
        request_id: u64,
        process: u32,
        action: ProcessAction,
    },
    List {
        request_id: u64,
    },
}

impl ProcessCommand {
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match *self {
            Self::Exec {
                request_id,
                cores,
                flags,
                program,
                arguments,
            } => {
                let mut writer = start(out, tag::PROCESS_EXEC)?;
                writer.u64(request_id)?;
                writer.u16(cores)?;
                writer.u16(flags.bits())?;
                put_buffer(&mut writer, program)?;
                put_buffer(&mut writer, arguments)?;
                Ok(writer.finish())
            }
            Self::Signal {
                request_id,
                process,
                action,
            } => {
                let mut writer = start(out, tag::PROCESS_SIGNAL)?;
                writer.u64(request_id)?;
                writer.u32(process)?;
                writer.u8(action as u8)?;
                writer.u8(0)?;
                writer.u16(0)?;
                Ok(writer.finish())
            }
            Self::List { request_id } => {
                let mut writer = start(out, tag::PROCESS_LIST)?;
                writer.u64(request_id)?;
                Ok(writer.finish())
            }
        }
    }

    /// Decodes any of the three commands; buffers are checked against `window_len`.
    pub fn decode(bytes: &[u8], window_len: u64) -> Result<Self, DecodeError> {
        match peek_tag(bytes)? {
            tag::PROCESS_EXEC => {
                let mut reader = open(bytes, tag::PROCESS_EXEC)?;
                let request_id = reader.u64()?;
                let cores = reader.u16()?;
                if cores == 0 || usize::from(cores) > MAX_CORES {
                    return Err(DecodeError::OutOfRange {
                        field: "exec cores",
                        value: cores.into(),
                    });
                }
                let flags =
                    ExecFlags::from_bits(reader.u16()?).ok_or(DecodeError::ReservedBitsSet {
                        field: "exec flags",
                    })?;
                let program = buffer(&mut reader, window_len)?;
                if program.len == 0 {
                    return Err(DecodeError::OutOfRange {
                        field: "exec program length",
                        value: 0,
                    });
                }
                let arguments = buffer(&mut reader, window_len)?;
                reader.finish()?;
                Ok(Self::Exec {
                    request_id,
                    cores,
                    flags,
                    program,
                    arguments,
                })
            }
            tag::PROCESS_SIGNAL => {
                let mut reader = open(bytes, tag::PROCESS_SIGNAL)?;
                let request_id = reader.u64()?;
                let process = reader.u32()?;
                let action = match reader.u8()? {
                    1 => ProcessAction::Kill,
                    2 => ProcessAction::Stop,
                    3 => ProcessAction::Continue,
                    4 => ProcessAction::Interrupt,
                    other => {
                        return Err(DecodeError::BadEnumValue {
                            field: "process action",
                            value: other.into(),
                        })
                    }
                };
                reader.reserved::<3>("process signal")?;
                reader.finish()?;
                Ok(Self::Signal {
                    request_id,
                    process,
                    action,
                })
            }
            tag::PROCESS_LIST => {
                let mut reader = open(bytes, tag::PROCESS_LIST)?;
                let request_id = reader.u64()?;
                reader.finish()?;
                Ok(Self::List { request_id })
            }
            other => Err(DecodeError::UnknownTag(other)),
        }
    }
}

/// State of a process in a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListedState {
    Running = 1,
    Stopped = 2,
    /// Exited, its status not yet collected.
    Exited = 3,
}

/// Lavender -> Linux: one row of the answer to [`ProcessCommand::List`].
///
/// Wire (68 bytes): header, `request_id: u64`, `process: u32`, `state: u8`, reserved `u8`,
/// `cores: u16` (most cores its threads run on at once; 0: no limit), `threads: u32` (live
/// threads), `status: i32` (the exit status once `Exited`, else 0), `cpu_us: u64` (CPU time
/// its threads used), `calls: u64` (delegated calls it made), `ran_on: u64` (the cores its
/// threads ran on, bit per core index), `name: [u8; 16]` (the program's name, UTF-8, cut to
/// 16 bytes, zero-padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessListEntry {
    pub request_id: u64,
    pub process: u32,
    pub state: ListedState,
    pub cores: u16,
    pub threads: u32,
    pub status: i32,
    pub cpu_us: u64,
    pub calls: u64,
    pub ran_on: u64,
    pub name: [u8; 16],
}

impl ProcessListEntry {
    pub const ENCODED_LEN: usize = 68;

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut writer = start(out, tag::PROCESS_LIST_ENTRY)?;
        writer.u64(self.request_id)?;
        writer.u32(self.process)?;
        writer.u8(self.state as u8)?;
        writer.u8(0)?;
        writer.u16(self.cores)?;
        writer.u32(self.threads)?;
        writer.u32(self.status as u32)?;
        writer.u64(self.cpu_us)?;
        writer.u64(self.calls)?;
        writer.u64(self.ran_on)?;
        for pair in self.name.chunks(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(pair);
            writer.u64(u64::from_le_bytes(word))?;
        }
        Ok(writer.finish())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = open(bytes, tag::PROCESS_LIST_ENTRY)?;
        let request_id = reader.u64()?;
        let process = reader.u32()?;
        let state = match reader.u8()? {
            1 => ListedState::Running,
            2 => ListedState::Stopped,
            3 => ListedState::Exited,
            other => {
                return Err(DecodeError::BadEnumValue {
                    field: "listed state",
                    value: other.into(),
                })
            }
        };
        reader.reserved::<1>("process list entry")?;
        let cores = reader.u16()?;
        let threads = reader.u32()?;
        let status = reader.u32()? as i32;
        let cpu_us = reader.u64()?;
        let calls = reader.u64()?;
        let ran_on = reader.u64()?;
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(&reader.u64()?.to_le_bytes());
        name[8..].copy_from_slice(&reader.u64()?.to_le_bytes());
        reader.finish()?;
        Ok(Self {
            request_id,
            process,
            state,
            cores,
            threads,
            status,
            cpu_us,
            calls,
            ran_on,
            name,
        })
    }

    /// `name` up to its first zero byte, if that is UTF-8.
    pub fn name(&self) -> Option<&str> {
        let end = self.name.iter().position(|byte| *byte == 0).unwrap_or(16);
        core::str::from_utf8(&self.name[..end]).ok()
    }

    /// `name` cut to the 16 bytes a row holds (at a character boundary), zero-padded.
    pub fn name_field(name: &str) -> [u8; 16] {
        let mut end = name.len().min(16);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut field = [0u8; 16];
        field[..end].copy_from_slice(&name.as_bytes()[..end]);
        field
    }
}

// ---------------------------------------------------------------------------------------------
// Any message

/// The tag of an encoded message, without validating the rest.
#[inline]
pub fn peek_tag(bytes: &[u8]) -> Result<u16, DecodeError> {
    Reader::new(bytes).u16()
}

/// Every message type, for a receiver that takes whatever arrives on a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    LoadReport(LoadReport),
    CoreEvent(CoreEvent),
    GuestEvent(GuestEvent),
    SyscallRequest(SyscallRequest),
    Reply(Reply),
    Notification(Notification),
    ProcessCommand(ProcessCommand),
    ProcessListEntry(ProcessListEntry),
}

impl Message {
    /// Encodes into `out` (usually a slot-sized buffer); returns the encoded length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Self::LoadReport(message) => message.encode(out),
            Self::CoreEvent(message) => message.encode(out),
            Self::GuestEvent(message) => message.encode(out),
            Self::SyscallRequest(message) => message.encode(out),
            Self::Reply(message) => message.encode(out),
            Self::Notification(message) => message.encode(out),
            Self::ProcessCommand(message) => message.encode(out),
            Self::ProcessListEntry(message) => message.encode(out),
        }
    }

    /// Decodes any message; buffer references are checked against `window_len`.
    pub fn decode(bytes: &[u8], window_len: u64) -> Result<Self, DecodeError> {
        Ok(match peek_tag(bytes)? {
            tag::LOAD_REPORT => Self::LoadReport(LoadReport::decode(bytes)?),
            tag::CORE_EVENT => Self::CoreEvent(CoreEvent::decode(bytes)?),
            tag::GUEST_EVENT => Self::GuestEvent(GuestEvent::decode(bytes)?),
            tag::SYSCALL_REQUEST => {
                Self::SyscallRequest(SyscallRequest::decode(bytes, window_len)?)
            }
            tag::REPLY => Self::Reply(Reply::decode(bytes)?),
            tag::NOTIFICATION => Self::Notification(Notification::decode(bytes)?),
            tag::PROCESS_EXEC | tag::PROCESS_SIGNAL | tag::PROCESS_LIST => {
                Self::ProcessCommand(ProcessCommand::decode(bytes, window_len)?)
            }
            tag::PROCESS_LIST_ENTRY => Self::ProcessListEntry(ProcessListEntry::decode(bytes)?),
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

// Fixed-size messages fit the slots the ABI assigns them (slot size minus the 8-byte slot header).
const _: () = assert!(CoreEvent::ENCODED_LEN <= 64 - 8);
const _: () = assert!(GuestEvent::ENCODED_LEN <= 64 - 8);
const _: () = assert!(
    CoreEvent::ENCODED_LEN <= HypervisorEvent::MAX_ENCODED_LEN
        && GuestEvent::ENCODED_LEN <= HypervisorEvent::MAX_ENCODED_LEN
);
const _: () = assert!(Reply::ENCODED_LEN <= 64 - 8);
const _: () = assert!(Notification::ENCODED_LEN <= 64 - 8);
// A list entry travels only on the Linux-Lavender rings (128-byte slots).
const _: () = assert!(ProcessListEntry::ENCODED_LEN <= 128 - 8);
const _: () = assert!(SyscallRequest::ENCODED_LEN <= 128 - 8);
const _: () = assert!(LoadReport::FIXED_LEN + 2 * MAX_CORES <= 256 - 8);
