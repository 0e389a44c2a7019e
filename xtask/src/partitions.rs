//! The partition configuration: users write TOML (`config/default.toml` documents every
//! key); this module parses it, converts it to `partition_config::PartitionConfig` (the
//! crate the hypervisor links too), validates it with the very function the hypervisor
//! runs again at boot, and packs it into the text form the image carries as
//! the `partitions` module.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use partition_config::{
    Device, GuestConfig, GuestKind, Machine, MemoryRange, Name, PartitionConfig, PolicyName,
    PolicySettings, SharedMapping, SharedRegion, ViolationPolicy,
};
use serde::Deserialize;
use vmcall_proto::cores::{CoreId, CoreSet};

/// The configuration `run`, `image` and `test` use unless told otherwise.
pub fn default_config() -> PathBuf {
    crate::workspace_root().join("config").join("default.toml")
}

/// The machine a configuration is checked against at build time. The firmware's real
/// memory map is checked again at boot; here RAM is taken as 1 MiB .. size - 1 MiB, the
/// part every PC firmware (SeaBIOS, Bochs BIOS) leaves usable.
#[derive(Debug, Clone, Copy)]
pub struct BuildMachine {
    pub cpus: u32,
    pub memory_mib: u32,
}

impl Default for BuildMachine {
    fn default() -> Self {
        BuildMachine {
            cpus: 4,
            memory_mib: 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    hypervisor: HypervisorSection,
    #[serde(default)]
    guest: Vec<GuestSection>,
    #[serde(default)]
    shared: Vec<SharedSection>,
    policy: Option<PolicySection>,
}

/// `[policy]`: the boot-time core-allocation policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    #[serde(default = "default_policy_name")]
    name: String,
    #[serde(default = "default_period_ms")]
    period_ms: u32,
}

fn default_policy_name() -> String {
    "static".into()
}

fn default_period_ms() -> u32 {
    PolicySettings::default().period_ms
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HypervisorSection {
    memory: Range,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    base: u64,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestSection {
    name: String,
    kind: Kind,
    boot_core: u64,
    initial_cores: Vec<u64>,
    allowed_cores: Vec<u64>,
    #[serde(default = "default_policy")]
    on_violation: Policy,
    #[serde(default)]
    cmdline: String,
    memory: Vec<GuestRange>,
    /// Legacy devices passed through: com1, pit, rtc, ioapic, post.
    #[serde(default)]
    devices: Vec<String>,
    /// The hang watchdog's deadline (ms without a heartbeat); none when absent.
    #[serde(default)]
    watchdog_ms: Option<u32>,
    /// The fewest and most cores a policy may leave the guest (default: 1, all allowed).
    min_cores: Option<u8>,
    max_cores: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Lavender,
    Linux,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Policy {
    Stop,
    Fault,
}

fn default_policy() -> Policy {
    Policy::Stop
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestRange {
    guest: u64,
    host: u64,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedSection {
    name: String,
    host: u64,
    size: u64,
    /// Guest name -> guest-physical address where the region appears.
    map: BTreeMap<String, u64>,
}

fn name(what: &str, text: &str) -> Result<Name> {
    let valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!("{what} name {text:?} must be letters, digits, '-' or '_'");
    }
    Name::try_from(text).map_err(|_| anyhow!("{what} name {text:?} is longer than 16 bytes"))
}

fn cores(guest: &str, what: &str, list: &[u64]) -> Result<CoreSet> {
    list.iter().try_fold(CoreSet::EMPTY, |set, &core| {
        CoreId::new(core).map(|c| set.with(c)).ok_or_else(|| {
            anyhow!("guest '{guest}': {what} lists core {core}; cores are numbered below 64")
        })
    })
}

fn devices(guest: &str, names: &[String]) -> Result<heapless::Vec<Device, 8>> {
    let mut devices = heapless::Vec::new();
    for name in names {
        let device = Device::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = Device::ALL.iter().map(|d| d.name()).collect();
            anyhow!(
                "guest '{guest}': unknown device {name:?} (known: {})",
                known.join(", ")
            )
        })?;
        if !devices.contains(&device) {
            devices
                .push(device)
                .map_err(|_| anyhow!("guest '{guest}': too many devices"))?;
        }
    }
    Ok(devices)
}

fn convert(file: File) -> Result<PartitionConfig> {
    let mut config = PartitionConfig {
        hypervisor: MemoryRange {
            guest: 0,
            host: file.hypervisor.memory.base,
            size: file.hypervisor.memory.size,
        },
        guests: heapless::Vec::new(),
        shared: heapless::Vec::new(),
        policy: match &file.policy {
            None => PolicySettings::default(),
            Some(p) => PolicySettings {
                name: PolicyName::from_name(&p.name).ok_or_else(|| {
                    anyhow!(
                        "policy: unknown name {:?} (known: static, autonomous, cooperative)",
                        p.name
                    )
                })?,
                period_ms: p.period_ms,
            },
        },
    };
    for g in &file.guest {
        let mut memory = heapless::Vec::new();
        for r in &g.memory {
            memory
                .push(MemoryRange {
                    guest: r.guest,
                    host: r.host,
                    size: r.size,
                })
                .map_err(|_| {
                    anyhow!(
                        "guest '{}': more than {} memory ranges",
                        g.name,
                        memory.capacity()
                    )
                })?;
        }
        let allowed_cores = cores(&g.name, "allowed_cores", &g.allowed_cores)?;
        let (default_min, default_max) = GuestConfig::default_core_bounds(allowed_cores);
        let guest = GuestConfig {
            min_cores: g.min_cores.unwrap_or(default_min),
            max_cores: g.max_cores.unwrap_or(default_max),
            name: name("guest", &g.name)?,
            kind: match g.kind {
                Kind::Lavender => GuestKind::Lavender,
                Kind::Linux => GuestKind::Linux,
            },
            boot_core: CoreId::new(g.boot_core).ok_or_else(|| {
                anyhow!(
                    "guest '{}': boot_core {} is not a core number",
                    g.name,
                    g.boot_core
                )
            })?,
            initial_cores: cores(&g.name, "initial_cores", &g.initial_cores)?,
            allowed_cores,
            memory,
            cmdline: heapless::String::try_from(g.cmdline.as_str())
                .map_err(|_| anyhow!("guest '{}': cmdline is longer than 256 bytes", g.name))?,
            on_violation: match g.on_violation {
                Policy::Stop => ViolationPolicy::Stop,
                Policy::Fault => ViolationPolicy::Fault,
            },
            devices: devices(&g.name, &g.devices)?,
            watchdog_ms: g.watchdog_ms,
        };
        config
            .guests
            .push(guest)
            .map_err(|_| anyhow!("more than 2 guests are configured"))?;
    }
    for s in &file.shared {
        let mut mappings = heapless::Vec::new();
        for (guest, address) in &s.map {
            let mapping = SharedMapping {
                guest: name("guest", guest)?,
                guest_physical: *address,
            };
            mappings
                .push(mapping)
                .map_err(|_| anyhow!("shared region '{}' maps into more than 2 guests", s.name))?;
        }
        let region = SharedRegion {
            name: name("shared region", &s.name)?,
            host: s.host,
            size: s.size,
            mappings,
        };
        config
            .shared
            .push(region)
            .map_err(|_| anyhow!("more than 4 shared regions are configured"))?;
    }
    Ok(config)
}

/// Reads, converts and validates the configuration at `path` for `machine`.
pub fn load(path: &Path, machine: BuildMachine) -> Result<PartitionConfig> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading partition configuration {}", path.display()))?;
    let file: File = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let config = convert(file).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mib = u64::from(machine.memory_mib) << 20;
    let ram = [(0x10_0000, mib.saturating_sub(0x10_0000))];
    config
        .validate(&Machine {
            cpus: machine.cpus as usize,
            ram: &ram,
        })
        .map_err(|e| {
            anyhow!(
                "{}: {e} (machine: {} cores, {} MiB)",
                path.display(),
                machine.cpus,
                machine.memory_mib
            )
        })?;
    Ok(config)
}

/// Loads, validates and writes the packed form next to the other build outputs; returns
/// the file to put in the image as the `partitions` module.
pub fn pack(path: &Path, machine: BuildMachine, out: &Path) -> Result<PathBuf> {
    let config = load(path, machine)?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(out, config.to_string()).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<PartitionConfig> {
        let dir = std::env::temp_dir().join(format!("tandem-partitions-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{:x}.toml",
            toml.len() ^ toml.bytes().map(u64::from).sum::<u64>() as usize
        ));
        fs::write(&path, toml).unwrap();
        load(&path, BuildMachine::default())
    }

    const VALID: &str = r#"
        [hypervisor]
        memory = { base = 0x0020_0000, size = 0x07e0_0000 }
        [[guest]]
        name = "lavender"
        kind = "lavender"
        boot_core = 1
        initial_cores = [1]
        allowed_cores = [1, 2, 3]
        memory = [{ guest = 0x0, host = 0x0800_0000, size = 0x07f0_0000 }]
        [[shared]]
        name = "lavender-control"
        host = 0x0ff0_0000
        size = 0x0010_0000
        map = { lavender = 0x07f0_0000 }
    "#;

    #[test]
    fn the_shipped_default_is_valid() {
        load(&default_config(), BuildMachine::default()).unwrap();
    }

    #[test]
    fn a_valid_file_round_trips_through_the_packed_form() {
        let config = check(VALID).unwrap();
        assert_eq!(PartitionConfig::parse(&config.to_string()).unwrap(), config);
        assert_eq!(config.guests[0].on_violation, ViolationPolicy::Stop);
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let overlap = VALID.replace("host = 0x0800_0000", "host = 0x0400_0000");
        let message = format!("{:#}", check(&overlap).unwrap_err());
        assert!(
            message.contains("guest 'lavender' memory[0]: overlaps the hypervisor's memory"),
            "{message}"
        );
        assert!(message.contains(".toml"), "{message}");

        let bad_core = VALID.replace("allowed_cores = [1, 2, 3]", "allowed_cores = [1, 2, 7]");
        assert!(format!("{:#}", check(&bad_core).unwrap_err()).contains("core 7 does not exist"));

        let unknown_key = VALID.replace(
            "kind = \"lavender\"",
            "kind = \"lavender\"\ncolour = \"blue\"",
        );
        assert!(
            format!("{:#}", check(&unknown_key).unwrap_err()).contains("unknown field `colour`")
        );

        let bad_kind = VALID.replace("kind = \"lavender\"", "kind = \"bsd\"");
        assert!(format!("{:#}", check(&bad_kind).unwrap_err()).contains("unknown variant `bsd`"));
    }
}
