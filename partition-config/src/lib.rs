//! The partition configuration: which cores and memory each guest gets, and the regions
//! guests share.
//!
//! Users write it as TOML (`config/*.toml`); `cargo xtask image` parses and validates it
//! and packs it into the boot image in the compact text form below, which the hypervisor
//! parses and validates again at boot against the real machine. Both checks are this
//! crate's [`PartitionConfig::validate`], so they cannot disagree. The text form is
//! untrusted input at boot: every line is checked and errors name the offending entry.
//!
//! The crate is `no_std` and allocation-free (fixed-capacity `heapless` strings and
//! vectors) because the hypervisor has no heap; the host tooling links the same code.
//! Inside the hypervisor it is reachable as `crate::partition`.
//!
//! ```text
//! tandem-partitions 1
//! hypervisor base=0x200000 size=0x7e00000
//! guest lavender kind=lavender boot_core=1 initial=1 allowed=1,2,3 on_violation=stop watchdog_ms=1000
//! memory lavender guest=0x0 host=0x8000000 size=0x8000000
//! cmdline lavender test=isolation read=0x200000
//! shared pv host=0xf000000 size=0x100000 map=lavender@0x7f00000
//! policy name=static period_ms=1
//! ```
//!
//! A guest line may add `min_cores=N max_cores=N` (the bounds every core-allocation policy
//! keeps; by default 1 and the number of allowed cores); the optional `policy` line names the
//! boot-time policy (`static`, `autonomous` or `cooperative`; `static` when absent) and the
//! autonomous policy's sampling period.
#![cfg_attr(not(test), no_std)]
// Errors carry their message in fixed-size strings because the hypervisor has no heap to
// box them in; the size is the price of a precise message at no allocation.
#![allow(clippy::result_large_err)]

use core::fmt::{self, Write};

use heapless::{String, Vec};
use vmcall_proto::cores::{CoreId, CoreSet};

pub const MAX_GUESTS: usize = 2;
pub const MAX_RANGES_PER_GUEST: usize = 8;
pub const MAX_SHARED_REGIONS: usize = 4;
pub const NAME_LEN: usize = 16;
pub const CMDLINE_LEN: usize = 256;
const PAGE_4K: u64 = 4096;
/// The bootstrap processor. When no guest's `allowed_cores` holds it, the hypervisor keeps
/// it for itself (a monitor core: it watches the guests, drains the console and can run the
/// core-move test); otherwise the hypervisor works on the guests' cores.
pub const BOOT_PROCESSOR: CoreId = match CoreId::new(0) {
    Some(core) => core,
    None => unreachable!(),
};
/// First line of the packed form; the number is the format version.
pub const HEADER: &str = "tandem-partitions 1";

pub type Name = String<NAME_LEN>;

/// A guest-physical range backed by host-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub guest: u64,
    pub host: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    Lavender,
    Linux,
}

/// Legacy platform devices a guest can own: their I/O ports (and MMIO) pass through to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The first serial port (I/O 0x3f8..0x3ff): Linux's console.
    Com1,
    /// The 8254 PIT (I/O 0x40..0x43) and port B (0x61, its gate and speaker).
    Pit,
    /// The CMOS real-time clock (I/O 0x70, 0x71).
    Rtc,
    /// The I/O APIC (MMIO 0xfec00000, one page).
    IoApic,
    /// The POST/delay port 0x80 Linux writes for I/O delays.
    PostPort,
}

impl Device {
    pub const ALL: [Device; 5] = [
        Device::Com1,
        Device::Pit,
        Device::Rtc,
        Device::IoApic,
        Device::PostPort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Device::Com1 => "com1",
            Device::Pit => "pit",
            Device::Rtc => "rtc",
            Device::IoApic => "ioapic",
            Device::PostPort => "post",
        }
    }

    pub fn from_name(name: &str) -> Option<Device> {
        Device::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The I/O port ranges [first, last] the device occupies.
    pub fn ports(self) -> &'static [(u16, u16)] {
        match self {
            Device::Com1 => &[(0x3f8, 0x3ff)],
            Device::Pit => &[(0x40, 0x43), (0x61, 0x61)],
            Device::Rtc => &[(0x70, 0x71)],
            Device::IoApic => &[],
            Device::PostPort => &[(0x80, 0x80)],
        }
    }

    /// The MMIO range (base, size) the device occupies, if any.
    pub fn mmio(self) -> Option<(u64, u64)> {
        match self {
            Device::IoApic => Some((0xfec0_0000, 0x1000)),
            _ => None,
        }
    }
}

/// What happens to a guest that touches memory, ports or cores it does not own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationPolicy {
    /// Stop the guest (all its cores park); the rest of the machine goes on.
    Stop,
    /// Inject #GP(0) at the offending instruction; the guest decides what to do.
    Fault,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    pub name: Name,
    pub kind: GuestKind,
    pub boot_core: CoreId,
    pub initial_cores: CoreSet,
    pub allowed_cores: CoreSet,
    pub memory: Vec<MemoryRange, MAX_RANGES_PER_GUEST>,
    pub cmdline: String<CMDLINE_LEN>,
    pub on_violation: ViolationPolicy,
    /// Devices passed through to this guest.
    pub devices: Vec<Device, 8>,
    /// The hang watchdog: the guest is reported hung and stopped when its control channel
    /// carries no heartbeat (a load report) for this long. `None`: no watchdog.
    pub watchdog_ms: Option<u32>,
    /// The fewest cores a policy leaves the guest (its boot core counts).
    pub min_cores: u8,
    /// The most cores a policy gives the guest.
    pub max_cores: u8,
}

impl GuestConfig {
    /// The bounds when the configuration names none: the boot core, and every allowed core.
    pub fn default_core_bounds(allowed: CoreSet) -> (u8, u8) {
        (1, allowed.len() as u8)
    }
}

/// The core-allocation policies (the hypervisor's `policy` module implements them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyName {
    /// The boot partition, never changed.
    Static,
    /// The hypervisor moves cores by what it observes (idle time, exits).
    Autonomous,
    /// The hypervisor arbitrates the guests' load reports and requests.
    Cooperative,
}

impl PolicyName {
    pub const ALL: [PolicyName; 3] = [Self::Static, Self::Autonomous, Self::Cooperative];

    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Autonomous => "autonomous",
            Self::Cooperative => "cooperative",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The number `SET_POLICY` carries (its index in [`Self::ALL`]).
    pub fn from_number(number: u64) -> Option<Self> {
        Self::ALL.get(usize::try_from(number).ok()?).copied()
    }

    pub fn number(self) -> u64 {
        self as u64
    }
}

/// The boot-time core-allocation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySettings {
    pub name: PolicyName,
    /// How often the autonomous policy samples the cores, in milliseconds (1 to
    /// [`MAX_POLICY_PERIOD_MS`]).
    pub period_ms: u32,
}

/// The longest sampling period accepted.
pub const MAX_POLICY_PERIOD_MS: u32 = 1000;

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            name: PolicyName::Static,
            period_ms: 1,
        }
    }
}

/// The shortest watchdog deadline: Lavender reports its load at least every 100 ms, and the
/// deadline must leave room for several reports.
pub const MIN_WATCHDOG_MS: u32 = 500;
/// The longest watchdog deadline: 10 minutes.
pub const MAX_WATCHDOG_MS: u32 = 600_000;

/// Where a shared region appears in one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedMapping {
    pub guest: Name,
    pub guest_physical: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRegion {
    pub name: Name,
    pub host: u64,
    pub size: u64,
    pub mappings: Vec<SharedMapping, MAX_GUESTS>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionConfig {
    /// Host memory the hypervisor keeps: its image, its pools and the boot modules.
    pub hypervisor: MemoryRange,
    pub guests: Vec<GuestConfig, MAX_GUESTS>,
    pub shared: Vec<SharedRegion, MAX_SHARED_REGIONS>,
    pub policy: PolicySettings,
}

/// The machine a configuration is checked against.
pub struct Machine<'a> {
    pub cpus: usize,
    /// Usable RAM (host-physical [start, end) ranges).
    pub ram: &'a [(u64, u64)],
}

/// What is wrong, and with which entry (e.g. `guest 'lavender' memory[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub entry: String<64>,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Syntax {
        line: usize,
        message: &'static str,
    },
    UnsupportedVersion,
    NoGuests,
    TooMany {
        what: &'static str,
        max: usize,
    },
    DuplicateName,
    UnknownGuest,
    Misaligned {
        base: u64,
        size: u64,
    },
    Empty,
    OutsideRam {
        start: u64,
        end: u64,
    },
    Overlaps {
        other: String<64>,
    },
    CoreOutOfRange {
        core: usize,
        cpus: usize,
    },
    BootCoreNotInitial,
    InitialNotAllowed,
    CoreInitiallyShared {
        core: usize,
        other: Name,
    },
    /// `watchdog_ms` out of range.
    WatchdogRange {
        ms: u64,
    },
    /// A watchdog on a guest that sends no heartbeat: one without a control channel.
    WatchdogWithoutHeartbeat,
    DeviceOwnedTwice {
        device: &'static str,
        other: Name,
    },
    AddressOverflow,
    CoreBounds {
        min: u8,
        max: u8,
        allowed: usize,
    },
    InitialOutsideBounds {
        initial: usize,
        min: u8,
        max: u8,
    },
    PolicyPeriod {
        period_ms: u32,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.entry)?;
        match &self.problem {
            Problem::Syntax { line, message } => write!(f, "line {line}: {message}"),
            Problem::UnsupportedVersion => write!(f, "unsupported format (expected `{HEADER}`)"),
            Problem::NoGuests => f.write_str("no guest is configured"),
            Problem::TooMany { what, max } => write!(f, "more than {max} {what}"),
            Problem::DuplicateName => f.write_str("name is used twice"),
            Problem::WatchdogRange { ms } => write!(
                f,
                "watchdog_ms {ms} is out of range ({MIN_WATCHDOG_MS}..={MAX_WATCHDOG_MS})"
            ),
            Problem::WatchdogWithoutHeartbeat => f.write_str(
                "watchdog_ms needs heartbeats on a control channel: a shared region mapped into \
                 this guest alone, on which it reports its load (Lavender's kernel and Linux's \
                 PV agent do, at least every 100 ms)",
            ),
            Problem::UnknownGuest => f.write_str("names a guest that is not configured"),
            Problem::Misaligned { base, size } => {
                write!(
                    f,
                    "base {base:#x} and size {size:#x} must be multiples of 4 KiB"
                )
            }
            Problem::Empty => f.write_str("size is zero"),
            Problem::OutsideRam { start, end } => {
                write!(
                    f,
                    "host range {start:#x}..{end:#x} is not inside the machine's usable RAM"
                )
            }
            Problem::Overlaps { other } => write!(f, "overlaps {other}"),
            Problem::CoreOutOfRange { core, cpus } => {
                write!(
                    f,
                    "core {core} does not exist (the machine has {cpus} cores: 0..{})",
                    cpus.saturating_sub(1)
                )
            }
            Problem::BootCoreNotInitial => f.write_str("boot_core must be one of initial_cores"),
            Problem::InitialNotAllowed => f.write_str("initial_cores must all be in allowed_cores"),
            Problem::CoreInitiallyShared { core, other } => {
                write!(f, "core {core} is an initial core of guest '{other}' too")
            }
            Problem::AddressOverflow => f.write_str("range wraps around the address space"),
            Problem::DeviceOwnedTwice { device, other } => {
                write!(f, "device {device} is owned by guest '{other}' too")
            }
            Problem::CoreBounds { min, max, allowed } => write!(
                f,
                "min_cores ({min}) and max_cores ({max}) must satisfy 1 <= min_cores <= max_cores <= {allowed} (its allowed cores)"
            ),
            Problem::InitialOutsideBounds { initial, min, max } => write!(
                f,
                "its {initial} initial cores are outside min_cores ({min}) .. max_cores ({max})"
            ),
            Problem::PolicyPeriod { period_ms } => write!(
                f,
                "period_ms {period_ms} must be 1 to {MAX_POLICY_PERIOD_MS}"
            ),
        }
    }
}

fn entry(args: fmt::Arguments) -> String<64> {
    let mut s = String::new();
    // Truncation only shortens the label in the message.
    let _ = s.write_fmt(args);
    s
}

fn error(args: fmt::Arguments, problem: Problem) -> ConfigError {
    ConfigError {
        entry: entry(args),
        problem,
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Every host range of the configuration with a label for messages.
fn host_ranges(config: &PartitionConfig) -> impl Iterator<Item = (String<64>, (u64, u64))> + '_ {
    let hv = core::iter::once((
        entry(format_args!("the hypervisor's memory")),
        (
            config.hypervisor.host,
            config
                .hypervisor
                .host
                .saturating_add(config.hypervisor.size),
        ),
    ));
    let guests = config.guests.iter().flat_map(|g| {
        g.memory.iter().enumerate().map(move |(i, r)| {
            (
                entry(format_args!("guest '{}' memory[{i}]", g.name)),
                (r.host, r.host.saturating_add(r.size)),
            )
        })
    });
    let shared = config.shared.iter().map(|s| {
        (
            entry(format_args!("shared region '{}'", s.name)),
            (s.host, s.host.saturating_add(s.size)),
        )
    });
    hv.chain(guests).chain(shared)
}

fn check_range(label: fmt::Arguments, base: u64, size: u64) -> Result<(), ConfigError> {
    if size == 0 {
        return Err(error(label, Problem::Empty));
    }
    if base % PAGE_4K != 0 || size % PAGE_4K != 0 {
        return Err(error(label, Problem::Misaligned { base, size }));
    }
    if base.checked_add(size).is_none() {
        return Err(error(label, Problem::AddressOverflow));
    }
    Ok(())
}

impl PartitionConfig {
    /// The core the hypervisor keeps for itself: the boot processor, unless a guest may
    /// hold it.
    pub fn monitor_core(&self) -> Option<CoreId> {
        let taken = self
            .guests
            .iter()
            .any(|g| g.allowed_cores.contains(BOOT_PROCESSOR));
        (!taken).then_some(BOOT_PROCESSOR)
    }

    pub fn guest(&self, name: &str) -> Option<&GuestConfig> {
        self.guests.iter().find(|g| g.name == name)
    }

    /// The indices of the guests that share a region with guest `name`, each once, in
    /// configuration order: its peers, which serve it or which it serves.
    pub fn peers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.guests
            .iter()
            .enumerate()
            .filter(move |(_, other)| {
                other.name != name
                    && self.shared.iter().any(|region| {
                        region.mappings.iter().any(|m| m.guest == name)
                            && region.mappings.iter().any(|m| m.guest == other.name)
                    })
            })
            .map(|(index, _)| index)
    }

    /// The doorbells guest `name` may ring (`DOORBELL`): for each region it shares with
    /// another guest, the region's guest-physical base as `name` maps it, and that guest's
    /// index. A region with more than one other guest has no doorbell (whom would it wake?).
    pub fn doorbells<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (u64, usize)> + 'a {
        self.shared.iter().filter_map(move |region| {
            let mine = region.mappings.iter().find(|m| m.guest == name)?;
            let mut others = region.mappings.iter().filter(|m| m.guest != name);
            let (other, None) = (others.next()?, others.next()) else {
                return None;
            };
            let peer = self.guests.iter().position(|g| g.name == other.guest)?;
            Some((mine.guest_physical, peer))
        })
    }

    /// Checks the configuration against `machine`; the first problem found is returned.
    pub fn validate(&self, machine: &Machine) -> Result<(), ConfigError> {
        if self.guests.is_empty() {
            return Err(error(format_args!("configuration"), Problem::NoGuests));
        }
        let hv = self.hypervisor;
        check_range(format_args!("the hypervisor's memory"), hv.host, hv.size)?;
        for (i, guest) in self.guests.iter().enumerate() {
            if self.guests[..i].iter().any(|g| g.name == guest.name) {
                return Err(error(
                    format_args!("guest '{}'", guest.name),
                    Problem::DuplicateName,
                ));
            }
            self.validate_cores(guest, machine)?;
        }
        let period_ms = self.policy.period_ms;
        if period_ms == 0 || period_ms > MAX_POLICY_PERIOD_MS {
            return Err(error(
                format_args!("policy"),
                Problem::PolicyPeriod { period_ms },
            ));
        }
        for guest in &self.guests {
            for (r, range) in guest.memory.iter().enumerate() {
                let label = format_args!("guest '{}' memory[{r}]", guest.name);
                check_range(label, range.host, range.size)?;
                check_range(label, range.guest, range.size)?;
                // Guest-physical ranges of one guest must not overlap each other.
                let g = (range.guest, range.guest + range.size);
                if let Some(o) = guest.memory[..r]
                    .iter()
                    .position(|o| overlaps(g, (o.guest, o.guest + o.size)))
                {
                    let other = entry(format_args!(
                        "guest '{}' memory[{o}] (guest-physical)",
                        guest.name
                    ));
                    return Err(error(label, Problem::Overlaps { other }));
                }
            }
        }
        for (i, region) in self.shared.iter().enumerate() {
            let label = format_args!("shared region '{}'", region.name);
            if self.shared[..i].iter().any(|s| s.name == region.name) {
                return Err(error(label, Problem::DuplicateName));
            }
            check_range(label, region.host, region.size)?;
            for mapping in &region.mappings {
                let Some(guest) = self.guest(&mapping.guest) else {
                    return Err(error(
                        format_args!("shared region '{}' map {}", region.name, mapping.guest),
                        Problem::UnknownGuest,
                    ));
                };
                let map_label =
                    format_args!("shared region '{}' in guest '{}'", region.name, guest.name);
                check_range(map_label, mapping.guest_physical, region.size)?;
                let g = (mapping.guest_physical, mapping.guest_physical + region.size);
                if let Some(o) = guest
                    .memory
                    .iter()
                    .position(|o| overlaps(g, (o.guest, o.guest + o.size)))
                {
                    let other = entry(format_args!(
                        "guest '{}' memory[{o}] (guest-physical)",
                        guest.name
                    ));
                    return Err(error(map_label, Problem::Overlaps { other }));
                }
            }
        }
        for guest in &self.guests {
            self.validate_watchdog(guest)?;
        }
        // Host ranges: inside RAM, and pairwise disjoint (hypervisor, guests, shared).
        let ranges: Vec<
            (String<64>, (u64, u64)),
            { 1 + MAX_GUESTS * MAX_RANGES_PER_GUEST + MAX_SHARED_REGIONS },
        > = host_ranges(self).collect();
        for (i, (label, range)) in ranges.iter().enumerate() {
            if !machine
                .ram
                .iter()
                .any(|ram| range.0 >= ram.0 && range.1 <= ram.1)
            {
                return Err(ConfigError {
                    entry: label.clone(),
                    problem: Problem::OutsideRam {
                        start: range.0,
                        end: range.1,
                    },
                });
            }
            if let Some((other, _)) = ranges[..i].iter().find(|(_, o)| overlaps(*range, *o)) {
                return Err(ConfigError {
                    entry: label.clone(),
                    problem: Problem::Overlaps {
                        other: other.clone(),
                    },
                });
            }
        }
        Ok(())
    }

    /// A watchdog needs heartbeats: the guest's load reports on its control channel (a shared
    /// region mapped into it alone), which Lavender's kernel and Linux's PV agent send.
    fn validate_watchdog(&self, guest: &GuestConfig) -> Result<(), ConfigError> {
        let Some(ms) = guest.watchdog_ms else {
            return Ok(());
        };
        let label = format_args!("guest '{}' watchdog_ms", guest.name);
        if !(MIN_WATCHDOG_MS..=MAX_WATCHDOG_MS).contains(&ms) {
            return Err(error(label, Problem::WatchdogRange { ms: ms.into() }));
        }
        let has_control = self
            .shared
            .iter()
            .any(|region| region.mappings.len() == 1 && region.mappings[0].guest == guest.name);
        if !has_control {
            return Err(error(label, Problem::WatchdogWithoutHeartbeat));
        }
        Ok(())
    }

    fn validate_cores(&self, guest: &GuestConfig, machine: &Machine) -> Result<(), ConfigError> {
        let label = format_args!("guest '{}'", guest.name);
        for core in guest
            .allowed_cores
            .iter()
            .chain(guest.initial_cores.iter())
            .chain([guest.boot_core])
        {
            if core.index() >= machine.cpus {
                return Err(error(
                    label,
                    Problem::CoreOutOfRange {
                        core: core.index(),
                        cpus: machine.cpus,
                    },
                ));
            }
        }
        if !guest.initial_cores.contains(guest.boot_core) {
            return Err(error(label, Problem::BootCoreNotInitial));
        }
        if !guest.initial_cores.is_subset_of(guest.allowed_cores) {
            return Err(error(label, Problem::InitialNotAllowed));
        }
        let (min, max, allowed) = (
            guest.min_cores,
            guest.max_cores,
            guest.allowed_cores.len() as usize,
        );
        if min == 0 || min > max || usize::from(max) > allowed {
            return Err(error(label, Problem::CoreBounds { min, max, allowed }));
        }
        let initial = guest.initial_cores.len() as usize;
        if initial < usize::from(min) || initial > usize::from(max) {
            return Err(error(
                label,
                Problem::InitialOutsideBounds { initial, min, max },
            ));
        }
        for other in self.guests.iter().take_while(|g| g.name != guest.name) {
            if let Some(device) = guest.devices.iter().find(|d| other.devices.contains(d)) {
                let problem = Problem::DeviceOwnedTwice {
                    device: device.name(),
                    other: other.name.clone(),
                };
                return Err(error(label, problem));
            }
            if let Some(core) = guest
                .initial_cores
                .iter()
                .find(|c| other.initial_cores.contains(*c))
            {
                return Err(error(
                    label,
                    Problem::CoreInitiallyShared {
                        core: core.index(),
                        other: other.name.clone(),
                    },
                ));
            }
        }
        Ok(())
    }

    /// Parses the packed text form (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        match lines.next() {
            Some((_, HEADER)) => {}
            _ => {
                return Err(error(
                    format_args!("partition configuration"),
                    Problem::UnsupportedVersion,
                ))
            }
        }
        let mut config = PartitionConfig {
            hypervisor: MemoryRange {
                guest: 0,
                host: 0,
                size: 0,
            },
            guests: Vec::new(),
            shared: Vec::new(),
            policy: PolicySettings::default(),
        };
        for (line, text) in lines {
            let syntax = |message| {
                error(
                    format_args!("partition configuration"),
                    Problem::Syntax { line, message },
                )
            };
            let (keyword, rest) = text.split_once(' ').unwrap_or((text, ""));
            match keyword {
                "hypervisor" => {
                    let fields = Fields::parse(rest).map_err(syntax)?;
                    config.hypervisor = MemoryRange {
                        guest: 0,
                        host: fields.number("base").map_err(syntax)?,
                        size: fields.number("size").map_err(syntax)?,
                    };
                }
                "guest" => {
                    let (name, rest) = split_name(rest).map_err(syntax)?;
                    let fields = Fields::parse(rest).map_err(syntax)?;
                    let kind = match fields.text("kind").map_err(syntax)? {
                        "lavender" => GuestKind::Lavender,
                        "linux" => GuestKind::Linux,
                        _ => return Err(syntax("kind must be lavender or linux")),
                    };
                    let on_violation = match fields.optional("on_violation").unwrap_or("stop") {
                        "stop" => ViolationPolicy::Stop,
                        "fault" => ViolationPolicy::Fault,
                        _ => return Err(syntax("on_violation must be stop or fault")),
                    };
                    let boot_core = CoreId::new(fields.number("boot_core").map_err(syntax)?)
                        .ok_or_else(|| syntax("boot_core is too large"))?;
                    let allowed_cores =
                        core_list(fields.text("allowed").map_err(syntax)?).map_err(syntax)?;
                    let (default_min, default_max) =
                        GuestConfig::default_core_bounds(allowed_cores);
                    let bound = |key, default| match fields.optional(key) {
                        None => Ok(default),
                        Some(text) => parse_number(text)
                            .and_then(|n| u8::try_from(n).ok())
                            .ok_or("min_cores and max_cores are numbers below 256"),
                    };
                    let guest = GuestConfig {
                        name,
                        kind,
                        boot_core,
                        initial_cores: core_list(fields.text("initial").map_err(syntax)?)
                            .map_err(syntax)?,
                        allowed_cores,
                        min_cores: bound("min_cores", default_min).map_err(syntax)?,
                        max_cores: bound("max_cores", default_max).map_err(syntax)?,
                        memory: Vec::new(),
                        cmdline: String::new(),
                        on_violation,
                        devices: device_list(fields.optional("devices").unwrap_or(""))
                            .map_err(syntax)?,
                        watchdog_ms: match fields.optional("watchdog_ms") {
                            None => None,
                            Some(_) => Some(
                                u32::try_from(fields.number("watchdog_ms").map_err(syntax)?)
                                    .map_err(|_| syntax("watchdog_ms is too large"))?,
                            ),
                        },
                    };
                    config.guests.push(guest).map_err(|_| {
                        error(
                            format_args!("partition configuration"),
                            Problem::TooMany {
                                what: "guests",
                                max: MAX_GUESTS,
                            },
                        )
                    })?;
                }
                "memory" => {
                    let (name, rest) = split_name(rest).map_err(syntax)?;
                    let fields = Fields::parse(rest).map_err(syntax)?;
                    let range = MemoryRange {
                        guest: fields.number("guest").map_err(syntax)?,
                        host: fields.number("host").map_err(syntax)?,
                        size: fields.number("size").map_err(syntax)?,
                    };
                    let guest = config
                        .guests
                        .iter_mut()
                        .find(|g| g.name == name)
                        .ok_or_else(|| syntax("memory for an undeclared guest"))?;
                    guest.memory.push(range).map_err(|_| {
                        error(
                            format_args!("guest '{name}'"),
                            Problem::TooMany {
                                what: "memory ranges",
                                max: MAX_RANGES_PER_GUEST,
                            },
                        )
                    })?;
                }
                "cmdline" => {
                    let (name, rest) = split_name(rest).map_err(syntax)?;
                    let guest = config
                        .guests
                        .iter_mut()
                        .find(|g| g.name == name)
                        .ok_or_else(|| syntax("cmdline for an undeclared guest"))?;
                    guest.cmdline = String::try_from(rest)
                        .map_err(|_| syntax("cmdline is longer than 256 bytes"))?;
                }
                "shared" => {
                    let (name, rest) = split_name(rest).map_err(syntax)?;
                    let fields = Fields::parse(rest).map_err(syntax)?;
                    let mut mappings = Vec::new();
                    for map in fields.all("map") {
                        let (guest, address) = map
                            .split_once('@')
                            .ok_or_else(|| syntax("map must be GUEST@ADDRESS"))?;
                        let mapping = SharedMapping {
                            guest: Name::try_from(guest)
                                .map_err(|_| syntax("guest name is longer than 16 bytes"))?,
                            guest_physical: parse_number(address)
                                .ok_or_else(|| syntax("bad map address"))?,
                        };
                        mappings
                            .push(mapping)
                            .map_err(|_| syntax("a shared region maps into at most 2 guests"))?;
                    }
                    let region = SharedRegion {
                        name,
                        host: fields.number("host").map_err(syntax)?,
                        size: fields.number("size").map_err(syntax)?,
                        mappings,
                    };
                    config.shared.push(region).map_err(|_| {
                        error(
                            format_args!("partition configuration"),
                            Problem::TooMany {
                                what: "shared regions",
                                max: MAX_SHARED_REGIONS,
                            },
                        )
                    })?;
                }
                "policy" => {
                    let fields = Fields::parse(rest).map_err(syntax)?;
                    let name = fields.optional("name").unwrap_or("static");
                    config.policy = PolicySettings {
                        name: PolicyName::from_name(name).ok_or_else(|| {
                            syntax("policy name must be static, autonomous or cooperative")
                        })?,
                        period_ms: match fields.optional("period_ms") {
                            None => PolicySettings::default().period_ms,
                            Some(text) => parse_number(text)
                                .and_then(|n| u32::try_from(n).ok())
                                .ok_or_else(|| syntax("period_ms must be a number"))?,
                        },
                    };
                }
                _ => return Err(syntax("unknown keyword")),
            }
        }
        Ok(config)
    }
}

/// Writes the packed text form that [`PartitionConfig::parse`] reads.
impl fmt::Display for PartitionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{HEADER}")?;
        writeln!(
            f,
            "hypervisor base={:#x} size={:#x}",
            self.hypervisor.host, self.hypervisor.size
        )?;
        for g in &self.guests {
            let kind = match g.kind {
                GuestKind::Lavender => "lavender",
                GuestKind::Linux => "linux",
            };
            let policy = match g.on_violation {
                ViolationPolicy::Stop => "stop",
                ViolationPolicy::Fault => "fault",
            };
            write!(
                f,
                "guest {} kind={kind} boot_core={} initial=",
                g.name,
                g.boot_core.index()
            )?;
            write_cores(f, g.initial_cores)?;
            f.write_str(" allowed=")?;
            write_cores(f, g.allowed_cores)?;
            write!(f, " on_violation={policy}")?;
            if let Some(ms) = g.watchdog_ms {
                write!(f, " watchdog_ms={ms}")?;
            }
            write!(f, " min_cores={} max_cores={}", g.min_cores, g.max_cores)?;
            if !g.devices.is_empty() {
                f.write_str(" devices=")?;
                for (i, device) in g.devices.iter().enumerate() {
                    write!(f, "{}{}", if i > 0 { "," } else { "" }, device.name())?;
                }
            }
            writeln!(f)?;
            for r in &g.memory {
                writeln!(
                    f,
                    "memory {} guest={:#x} host={:#x} size={:#x}",
                    g.name, r.guest, r.host, r.size
                )?;
            }
            if !g.cmdline.is_empty() {
                writeln!(f, "cmdline {} {}", g.name, g.cmdline)?;
            }
        }
        for s in &self.shared {
            write!(f, "shared {} host={:#x} size={:#x}", s.name, s.host, s.size)?;
            for m in &s.mappings {
                write!(f, " map={}@{:#x}", m.guest, m.guest_physical)?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "policy name={} period_ms={}",
            self.policy.name.name(),
            self.policy.period_ms
        )?;
        Ok(())
    }
}

fn write_cores(f: &mut fmt::Formatter<'_>, cores: CoreSet) -> fmt::Result {
    for (i, core) in cores.iter().enumerate() {
        if i > 0 {
            f.write_char(',')?;
        }
        write!(f, "{}", core.index())?;
    }
    Ok(())
}

fn split_name(rest: &str) -> Result<(Name, &str), &'static str> {
    let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("expected a name of letters, digits, '-' or '_'");
    }
    Ok((
        Name::try_from(name).map_err(|_| "name is longer than 16 bytes")?,
        rest,
    ))
}

/// A decimal or `0x` hexadecimal number; `_` separators are accepted as in TOML.
fn parse_number(text: &str) -> Option<u64> {
    let mut digits = String::<24>::new();
    for c in text.chars().filter(|c| *c != '_') {
        digits.push(c).ok()?;
    }
    match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => digits.parse().ok(),
    }
}

fn core_list(text: &str) -> Result<CoreSet, &'static str> {
    let mut set = CoreSet::EMPTY;
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let core = parse_number(item)
            .and_then(CoreId::new)
            .ok_or("cores are numbers below 64, separated by commas")?;
        set = set.with(core);
    }
    Ok(set)
}

fn device_list(text: &str) -> Result<Vec<Device, 8>, &'static str> {
    let mut devices = Vec::new();
    for name in text.split(',').filter(|s| !s.is_empty()) {
        let device =
            Device::from_name(name).ok_or("unknown device (com1, pit, rtc, ioapic, post)")?;
        if !devices.contains(&device) {
            devices.push(device).map_err(|_| "too many devices")?;
        }
    }
    Ok(devices)
}

/// `key=value` words of one line.
struct Fields<'a>(Vec<(&'a str, &'a str), 12>);

impl<'a> Fields<'a> {
    fn parse(text: &'a str) -> Result<Self, &'static str> {
        let mut fields = Vec::new();
        for word in text.split_ascii_whitespace() {
            let pair = word.split_once('=').ok_or("expected key=value")?;
            fields
                .push(pair)
                .map_err(|_| "too many fields on one line")?;
        }
        Ok(Self(fields))
    }

    fn optional(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn text(&self, key: &'static str) -> Result<&'a str, &'static str> {
        self.optional(key).ok_or("a required field is missing")
    }

    fn number(&self, key: &'static str) -> Result<u64, &'static str> {
        parse_number(self.text(key)?).ok_or("expected a number (decimal or 0x hex)")
    }

    fn all(&self, key: &'static str) -> impl Iterator<Item = &'a str> + '_ {
        self.0
            .iter()
            .filter(move |(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    const RAM: [(u64, u64); 2] = [(0, 0x9f000), (0x10_0000, 0x3fff_0000)];
    const MACHINE: Machine = Machine { cpus: 4, ram: &RAM };

    fn sample() -> &'static str {
        "tandem-partitions 1\n\
         hypervisor base=0x200000 size=0x7e00000\n\
         guest lavender kind=lavender boot_core=1 initial=1 allowed=1,2,3 on_violation=fault\n\
         memory lavender guest=0x0 host=0x8000000 size=0x8000000\n\
         cmdline lavender test=isolation read=0x200000\n\
         shared pv host=0x10000000 size=0x100000 map=lavender@0x9000000\n"
    }

    fn parsed() -> PartitionConfig {
        PartitionConfig::parse(sample()).unwrap()
    }

    fn problem(config: &PartitionConfig) -> std::string::String {
        config.validate(&MACHINE).unwrap_err().to_string()
    }

    #[test]
    fn sample_parses_validates_and_round_trips() {
        let config = parsed();
        config.validate(&MACHINE).unwrap();
        let lavender = config.guest("lavender").unwrap();
        assert_eq!(lavender.on_violation, ViolationPolicy::Fault);
        assert_eq!(lavender.allowed_cores, CoreSet(0b1110));
        assert_eq!(lavender.cmdline, "test=isolation read=0x200000");
        assert_eq!(PartitionConfig::parse(&config.to_string()).unwrap(), config);
    }

    #[test]
    fn watchdog_round_trips_and_is_validated() {
        let mut config = parsed();
        config.guests[0].watchdog_ms = Some(1000);
        config.validate(&MACHINE).unwrap();
        assert_eq!(PartitionConfig::parse(&config.to_string()).unwrap(), config);
        assert!(config.to_string().contains(" watchdog_ms=1000 "));
        for ms in [0, 499, 600_001] {
            config.guests[0].watchdog_ms = Some(ms);
            assert_eq!(
                problem(&config),
                format!(
                    "guest 'lavender' watchdog_ms: watchdog_ms {ms} is out of range (500..=600000)"
                )
            );
        }
        // No control channel: nothing would ever beat.
        config.guests[0].watchdog_ms = Some(1000);
        config.shared.clear();
        assert!(problem(&config).starts_with(
            "guest 'lavender' watchdog_ms: watchdog_ms needs heartbeats on a control channel"
        ));
        // A Linux guest with a control channel beats too (its agent's load reports).
        let mut config = parsed();
        config.guests[0].watchdog_ms = Some(1000);
        config.guests[0].kind = GuestKind::Linux;
        assert!(!config
            .validate(&MACHINE)
            .is_err_and(|e| e.to_string().contains("needs heartbeats")));
        // Not a number, or too large for the field.
        for bad in ["watchdog_ms=soon", "watchdog_ms=0x1_0000_0000"] {
            let text = sample().replace("on_violation=fault", &format!("on_violation=fault {bad}"));
            assert!(PartitionConfig::parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn core_bounds_and_policy_parse_default_and_validate() {
        let config = parsed();
        let lavender = config.guest("lavender").unwrap();
        assert_eq!((lavender.min_cores, lavender.max_cores), (1, 3));
        assert_eq!(config.policy, PolicySettings::default());
        let text = sample().replace(
            "on_violation=fault",
            "on_violation=fault min_cores=1 max_cores=2",
        ) + "policy name=cooperative period_ms=5\n";
        let config = PartitionConfig::parse(&text).unwrap();
        config.validate(&MACHINE).unwrap();
        assert_eq!(config.guests[0].max_cores, 2);
        assert_eq!(config.policy.name, PolicyName::Cooperative);
        assert_eq!(config.policy.period_ms, 5);
        assert_eq!(PartitionConfig::parse(&config.to_string()).unwrap(), config);

        let mut bad = config.clone();
        bad.guests[0].max_cores = 4;
        assert_eq!(
            problem(&bad),
            "guest 'lavender': min_cores (1) and max_cores (4) must satisfy 1 <= min_cores <= max_cores <= 3 (its allowed cores)"
        );
        bad.guests[0].max_cores = 2;
        bad.guests[0].min_cores = 0;
        assert!(problem(&bad).contains("min_cores (0)"));
        bad.guests[0].min_cores = 2;
        assert_eq!(
            problem(&bad),
            "guest 'lavender': its 1 initial cores are outside min_cores (2) .. max_cores (2)"
        );
        let mut bad = config.clone();
        bad.policy.period_ms = 0;
        assert_eq!(problem(&bad), "policy: period_ms 0 must be 1 to 1000");
        let unknown = sample().to_string() + "policy name=greedy\n";
        assert_eq!(
            PartitionConfig::parse(&unknown).unwrap_err().to_string(),
            "partition configuration: line 7: policy name must be static, autonomous or cooperative"
        );
    }

    #[test]
    fn overlapping_guest_and_hypervisor_memory_is_refused_by_name() {
        let mut config = parsed();
        config.guests[0].memory[0].host = 0x400_0000;
        assert_eq!(
            problem(&config),
            "guest 'lavender' memory[0]: overlaps the hypervisor's memory"
        );
    }

    #[test]
    fn cores_out_of_range_and_inconsistent_sets_are_refused() {
        let mut config = parsed();
        config.guests[0].allowed_cores = CoreSet(0b1_0000_0110);
        assert_eq!(
            problem(&config),
            "guest 'lavender': core 8 does not exist (the machine has 4 cores: 0..3)"
        );
        let mut config = parsed();
        config.guests[0].boot_core = CoreId::new(2).unwrap();
        assert_eq!(
            problem(&config),
            "guest 'lavender': boot_core must be one of initial_cores"
        );
        let mut config = parsed();
        config.guests[0].allowed_cores = CoreSet(0b100);
        assert_eq!(
            problem(&config),
            "guest 'lavender': initial_cores must all be in allowed_cores"
        );
    }

    #[test]
    fn a_guest_may_hold_the_boot_processor() {
        assert_eq!(parsed().monitor_core(), Some(BOOT_PROCESSOR));
        let mut config = parsed();
        config.guests[0].allowed_cores = CoreSet(0b1111);
        config.guests[0].boot_core = BOOT_PROCESSOR;
        config.guests[0].initial_cores = CoreSet(0b1);
        config.guests[0].max_cores = 4;
        assert!(config.monitor_core().is_none());
        let mut others = config.clone();
        others.guests.truncate(1);
        others.validate(&MACHINE).unwrap();
    }

    #[test]
    fn regions_outside_ram_and_misaligned_sizes_are_refused() {
        let mut config = parsed();
        config.guests[0].memory[0].host = 0x3ff0_0000;
        assert!(problem(&config).contains("is not inside the machine's usable RAM"));
        let mut config = parsed();
        config.shared[0].size = 0x1234;
        assert_eq!(
            problem(&config),
            "shared region 'pv': base 0x10000000 and size 0x1234 must be multiples of 4 KiB"
        );
    }

    #[test]
    fn two_guests_may_not_start_on_the_same_core_or_share_private_memory() {
        let text = std::format!(
            "{}guest linux kind=linux boot_core=2 initial=1,2 allowed=1,2\n\
             memory linux guest=0x100000 host=0x8100000 size=0x1000000\n",
            sample()
        );
        let config = PartitionConfig::parse(&text).unwrap();
        let message = problem(&config);
        assert_eq!(
            message,
            "guest 'linux': core 1 is an initial core of guest 'lavender' too"
        );
        let text = text.replace("initial=1,2", "initial=2");
        assert_eq!(
            problem(&PartitionConfig::parse(&text).unwrap()),
            "guest 'linux' memory[0]: overlaps guest 'lavender' memory[0]"
        );
    }

    #[test]
    fn devices_round_trip_and_belong_to_one_guest() {
        let text = std::format!(
            "{}guest linux kind=linux boot_core=2 initial=2 allowed=2 devices=com1,pit\n\
             memory linux guest=0x0 host=0x10100000 size=0x1000000\n",
            sample().replace("on_violation=fault", "on_violation=fault devices=rtc,com1")
        );
        let config = PartitionConfig::parse(&text).unwrap();
        assert_eq!(
            config.guest("linux").unwrap().devices.as_slice(),
            [Device::Com1, Device::Pit]
        );
        assert_eq!(PartitionConfig::parse(&config.to_string()).unwrap(), config);
        assert_eq!(
            problem(&config),
            "guest 'linux': device com1 is owned by guest 'lavender' too"
        );
        assert!(PartitionConfig::parse(&text.replace("com1,pit", "com1,floppy")).is_err());
    }

    #[test]
    fn peers_are_the_guests_a_region_is_shared_with() {
        let text = "tandem-partitions 1\n\
             hypervisor base=0x200000 size=0x7e00000\n\
             guest lavender kind=lavender boot_core=1 initial=1 allowed=1 on_violation=stop\n\
             memory lavender guest=0x0 host=0x8000000 size=0x1000000\n\
             guest linux kind=linux boot_core=2 initial=2 allowed=2 on_violation=stop\n\
             memory linux guest=0x0 host=0x9000000 size=0x1000000\n\
             shared control host=0x10000000 size=0x100000 map=lavender@0x2000000\n\
             shared pv host=0x10100000 size=0x100000 map=lavender@0x2100000 map=linux@0x2100000\n\
             shared again host=0x10200000 size=0x100000 map=linux@0x2200000 map=lavender@0x2200000\n";
        let config = PartitionConfig::parse(text).unwrap();
        config.validate(&MACHINE).unwrap();
        let peers = |name| config.peers(name).collect::<std::vec::Vec<_>>();
        // Two regions with Linux: Linux once. Its own control region makes no peer.
        assert_eq!(peers("lavender"), [1]);
        assert_eq!(peers("linux"), [0]);
        // A doorbell per region shared with one other guest, named by its base in the caller.
        let doorbells = |name| config.doorbells(name).collect::<std::vec::Vec<_>>();
        assert_eq!(doorbells("lavender"), [(0x2100000, 1), (0x2200000, 1)]);
        assert_eq!(doorbells("linux"), [(0x2100000, 0), (0x2200000, 0)]);
        assert!(peers("nobody").is_empty());
        // Without the shared regions, nobody has a peer.
        let mut alone = config.clone();
        alone.shared.retain(|region| region.name == "control");
        assert_eq!(alone.peers("lavender").count(), 0);
        assert_eq!(alone.peers("linux").count(), 0);
    }

    #[test]
    fn shared_mapping_must_name_a_guest_and_avoid_its_ram() {
        let mut config = parsed();
        config.shared[0].mappings[0].guest = Name::try_from("nobody").unwrap();
        assert_eq!(
            problem(&config),
            "shared region 'pv' map nobody: names a guest that is not configured"
        );
        let mut config = parsed();
        config.shared[0].mappings[0].guest_physical = 0x100_0000;
        assert_eq!(
            problem(&config),
            "shared region 'pv' in guest 'lavender': overlaps guest 'lavender' memory[0] (guest-physical)"
        );
    }

    #[test]
    fn malformed_text_gets_line_numbers_not_panics() {
        for (text, expected) in [
            (
                "garbage",
                "partition configuration: unsupported format (expected `tandem-partitions 1`)",
            ),
            (
                "tandem-partitions 1\nfrobnicate x",
                "partition configuration: line 2: unknown keyword",
            ),
            (
                "tandem-partitions 1\nguest a kind=bsd boot_core=0 initial=0 allowed=0",
                "partition configuration: line 2: kind must be lavender or linux",
            ),
            (
                "tandem-partitions 1\nmemory nobody guest=0 host=0 size=0",
                "partition configuration: line 2: memory for an undeclared guest",
            ),
            (
                "tandem-partitions 1\nguest a kind=linux boot_core=99 initial=0 allowed=0",
                "partition configuration: line 2: boot_core is too large",
            ),
            (
                "tandem-partitions 1\nhypervisor base=zz size=1",
                "partition configuration: line 2: expected a number (decimal or 0x hex)",
            ),
        ] {
            assert_eq!(
                PartitionConfig::parse(text).unwrap_err().to_string(),
                expected
            );
        }
        let empty =
            PartitionConfig::parse("tandem-partitions 1\nhypervisor base=0x200000 size=0x1000")
                .unwrap();
        assert_eq!(problem(&empty), "configuration: no guest is configured");
    }
}
