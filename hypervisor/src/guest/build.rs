//! Building the guests from the partition configuration: EPT, VPID, bitmaps, kernels.

use core::fmt::Write;

use heapless::{String, Vec};
use vmcall_proto::bootinfo::{SharedRegionInfo, PEER_HYPERVISOR};
use vmcall_proto::region::SharedRegion;

use super::console::GuestConsole;
use super::control::{ControlChannel, CONTROL_VECTOR};
use super::EntryState;
use super::GuestState;
use super::{lavender, Guest, KICK_LIMIT, WARNING_LIMIT};
use crate::arch::guest_memory::GuestRam;
use crate::arch::page_pool::{self, PoolTables};
use crate::arch::{firmware, shared_memory};
use crate::cores::{Reason, Requester, CORES};
use crate::linux::{self, LinuxGuestSpec};
use crate::partition::{Device, GuestConfig, GuestKind, PartitionConfig, MAX_GUESTS};
use crate::platform::BootModule;
use crate::rate_limit::RateLimit;
use crate::vmx::ept::{Access, Ept, MemoryType};
use crate::vmx::exit::ExitCounters;
use crate::vmx::msr_bitmap::{self, MsrAccess};
use core::sync::atomic::AtomicU8;

/// Why a guest could not be built; the message names the guest.
pub struct BuildError(pub String<160>);

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(args: core::fmt::Arguments) -> BuildError {
    let mut s = String::new();
    let _ = core::fmt::Write::write_fmt(&mut s, args);
    BuildError(s)
}

/// Guest-physical = host-physical 0xa0000..0x100000.
const LEGACY_HOLE: (u64, u64) = (0xa_0000, 0x6_0000);

/// MSRs a guest kernel uses directly on the cores it owns: the x2APIC registers (the
/// ICR is intercepted separately, for writes, to confine IPIs), EFER, FS/GS bases, SYSCALL
/// MSRs and TSC_AUX. None of them is used by the hypervisor itself.
///
/// EFER is the guest's own while it runs: the VMCS loads it on entry and saves it on exit
/// (`LOAD_EFER`, `SAVE_EFER`), a write of a reserved bit raises #GP in the guest as on
/// hardware, and every VM exit copies EFER.LMA into the "IA-32e mode guest" entry control
/// (SDM Vol. 3C §28.2), so a guest that turns long mode on needs no exit for it. A core
/// started by STARTUP writes EFER on its way to long mode; as an exit that write cost a
/// bring-up some 4 µs under Bochs.
const PASS_THROUGH_MSRS: &[(u32, u32)] = &[
    // IA32_EFER.
    (0xc000_0080, 0xc000_0080),
    // IA32_TSC_DEADLINE: the local APIC timer in TSC-deadline mode.
    (0x6e0, 0x6e0),
    (0x800, 0x8ff),
    (0xc000_0081, 0xc000_0084),
    (0xc000_0100, 0xc000_0103),
];
const X2APIC_ICR: u32 = 0x830;
const X2APIC_ID: u32 = 0x802;

fn msr_bitmap() -> Result<u64, BuildError> {
    let mut bitmap = msr_bitmap::intercept_all();
    for &(first, last) in PASS_THROUGH_MSRS {
        for msr in first..=last {
            // The x2APIC ID is virtualized (core index): its reads exit.
            if msr != X2APIC_ID {
                msr_bitmap::pass_through(&mut bitmap, msr, MsrAccess::Read);
            }
            if msr != X2APIC_ICR {
                msr_bitmap::pass_through(&mut bitmap, msr, MsrAccess::Write);
            }
        }
    }
    let page = page_pool::allocate_page()
        .ok_or_else(|| fail(format_args!("out of pool pages for MSR bitmaps")))?;
    page.0.copy_from_slice(&bitmap);
    Ok(page_pool::physical_address(page))
}

/// I/O bitmap pages A (ports 0..0x7fff) and B: every port exits. Device passthrough
/// (Linux's COM1, PIT, ...) clears bits here.
/// I/O bitmap pages A (ports 0..0x7fff) and B (0x8000..0xffff) (SDM Vol. 3C §25.6.4):
/// every port exits except those of the devices the guest owns.
fn io_bitmaps(devices: &[Device]) -> Result<(u64, u64), BuildError> {
    let mut bitmap = [0xffu8; 8192];
    for (first, last) in devices.iter().flat_map(|d| d.ports()) {
        for port in *first..=*last {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    let page = |half: &[u8]| {
        let page = page_pool::allocate_page()
            .ok_or_else(|| fail(format_args!("out of pool pages for I/O bitmaps")))?;
        page.0.copy_from_slice(half);
        Ok(page_pool::physical_address(page))
    };
    Ok((page(&bitmap[..4096])?, page(&bitmap[4096..])?))
}

/// A fresh holder token (never 0, which means "none"): from RDRAND, else the TSC mixed
/// (splitmix64), which is unpredictable enough on real hardware and still never leaves the
/// region only the guest's holder can map.
fn holder_token() -> u64 {
    let seed = crate::arch::cpu::rdrand().unwrap_or_else(|| {
        let mut z = crate::arch::cpu::read_tsc().wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    });
    seed.max(1)
}

/// The Linux command line: the console on COM1, what a panic does ([`linux::ON_PANIC`]), no
/// broadcast IPIs ([`linux::NO_IPI_BROADCAST`]), a trusted TSC ([`linux::TSC_RELIABLE`]),
/// expedited RCU grace periods ([`linux::RCU_EXPEDITED`]), no debugfs ([`linux::NO_DEBUGFS`])
/// and short per-CPU page lists ([`linux::SHORT_PAGE_LISTS`]) first (the user's words may
/// override them), then the configured words, then where the shared regions are, for the PV
/// agent.
fn linux_cmdline(config: &PartitionConfig, guest: &GuestConfig) -> String<768> {
    let mut cmdline = String::new();
    let _ = write!(
        cmdline,
        "console=ttyS0,115200 {} {} {} {} {} {} {}",
        linux::ON_PANIC,
        linux::NO_IPI_BROADCAST,
        linux::TSC_RELIABLE,
        linux::RCU_EXPEDITED,
        linux::NO_DEBUGFS,
        linux::SHORT_PAGE_LISTS,
        guest.cmdline
    );
    for region in &config.shared {
        for mapping in region.mappings.iter().filter(|m| m.guest == guest.name) {
            let _ = write!(
                cmdline,
                " tandem.shared={}@{:#x}:{:#x}",
                region.name, mapping.guest_physical, region.size
            );
        }
    }
    // Which core each Linux CPU number is, so the agent can turn core events into sysfs CPUs.
    let _ = write!(cmdline, " tandem.cores=");
    for (i, core) in crate::linux::cpu_order(guest).enumerate() {
        let _ = write!(cmdline, "{}{}", if i == 0 { "" } else { "," }, core.index());
    }
    cmdline
}

/// Loads Linux: kernel and initrd from the boot modules, boot structures per the x86 boot
/// protocol, ACPI tables listing every core it may hold (APIC ID = core index, as the
/// x2APIC ID register reads in every guest).
fn load_linux(
    config: &PartitionConfig,
    guest: &GuestConfig,
    ram: &GuestRam,
    modules: &[BootModule],
) -> Result<EntryState, BuildError> {
    let name = &guest.name;
    let module = |wanted: &str| {
        modules
            .iter()
            .find(|m| m.name == wanted)
            .map(firmware::module_bytes)
    };
    let kernel = module("linux").ok_or_else(|| {
        fail(format_args!(
            "guest '{name}': no 'linux' boot module in the image"
        ))
    })?;
    let initrd = module("initrd").unwrap_or(&[]);
    let spec = LinuxGuestSpec::new(config, guest, |core| core.index() as u32);
    let cmdline = linux_cmdline(config, guest);
    let entry = linux::prepare(ram, kernel, initrd, &cmdline, &spec.partition())
        .map_err(|e| fail(format_args!("guest '{name}': {e}")))?;
    log::info!(
        "guest '{name}': Linux kernel at {:#x}, initrd {} bytes, entry {:#x}, command line \"{cmdline}\"",
        entry.layout.kernel, initrd.len(), entry.rip
    );
    Ok(EntryState {
        rip: entry.rip,
        rsp: entry.rsp,
        rdi: 0,
        rsi: entry.rsi,
        cr0: entry.cr0,
        cr3: entry.cr3,
        cr4: entry.cr4,
        efer: entry.efer,
        code_selector: entry.cs,
        data_selector: entry.ds,
        gdt_base: entry.gdt_base,
        gdt_limit: entry.gdt_limit,
    })
}

/// Builds every configured guest and assigns their initial cores.
pub fn build_all(
    config: &PartitionConfig,
    modules: &[BootModule],
) -> Result<Vec<Guest, MAX_GUESTS>, BuildError> {
    // Kernels are copied out of the modules: a module lying in a guest's RAM would be
    // overwritten while it is read.
    for module in modules {
        for guest in &config.guests {
            if let Some(r) = guest
                .memory
                .iter()
                .find(|r| module.start < r.host + r.size && r.host < module.end)
            {
                return Err(fail(format_args!(
                    "boot module '{}' at {:#x}..{:#x} lies in guest '{}' memory at {:#x}; grow the hypervisor's region",
                    module.name, module.start, module.end, guest.name, r.host
                )));
            }
        }
    }
    // A region shared by two guests is laid out once, before either runs: one ring each
    // way for the delegation connection 0 (docs/architecture.md, "The paravirtual channel"),
    // the rest as the data window. The guests find the layout in the header. The region
    // starts zeroed: the window carries nothing the firmware or loader left in that memory,
    // and the delegation server's liveness words start at epoch 0.
    for region in config.shared.iter().filter(|r| r.mappings.len() == 2) {
        let words = shared_memory::words(region.host, region.size);
        for word in words {
            word.store(0, core::sync::atomic::Ordering::Relaxed);
        }
        SharedRegion::new(words)
            .initialize(&vmcall_proto::delegation::RINGS, 0)
            .map_err(|e| {
                fail(format_args!(
                    "shared region '{}': cannot lay it out: {e:?}",
                    region.name
                ))
            })?;
    }
    let mut guests = Vec::new();
    for (id, guest) in config.guests.iter().enumerate() {
        let id = id as u8;
        let name = &guest.name;
        let mut tables = PoolTables;
        let mut ept =
            Ept::new(&mut tables).map_err(|e| fail(format_args!("guest '{name}': {e}")))?;
        for r in &guest.memory {
            ept.map(
                &mut tables,
                r.guest,
                r.host,
                r.size,
                Access::ALL,
                MemoryType::WriteBack,
            )
            .map_err(|e| fail(format_args!("guest '{name}': {e}")))?;
        }
        // Device MMIO, identity-mapped and uncached. The IOAPIC's page stays unmapped: its
        // owner's accesses exit and are mediated (`vcpu::ioapic_access`).
        let mut mmio: Vec<(u64, u64), 9> = guest
            .devices
            .iter()
            .filter(|d| **d != Device::IoApic)
            .filter_map(|d| d.mmio())
            .collect();
        if guest.kind == GuestKind::Linux {
            // Linux owns the legacy platform, including the legacy hole: VGA memory and the
            // BIOS ROMs it scans for SMBIOS and the EBDA (reserved in its e820 map).
            let _ = mmio.push(LEGACY_HOLE);
        }
        for (base, size) in mmio {
            ept.map(
                &mut tables,
                base,
                base,
                size,
                Access::ALL,
                MemoryType::Uncacheable,
            )
            .map_err(|e| fail(format_args!("guest '{name}' device memory: {e}")))?;
        }
        let mut shared: Vec<SharedRegionInfo, 4> = Vec::new();
        let mut control = None;
        for region in &config.shared {
            for mapping in region.mappings.iter().filter(|m| m.guest == *name) {
                ept.map(
                    &mut tables,
                    mapping.guest_physical,
                    region.host,
                    region.size,
                    Access::READ_WRITE,
                    MemoryType::WriteBack,
                )
                .map_err(|e| {
                    fail(format_args!(
                        "guest '{name}' shared region '{}': {e}",
                        region.name
                    ))
                })?;
                let peer = region
                    .mappings
                    .iter()
                    .find(|m| m.guest != *name)
                    .and_then(|m| config.guests.iter().position(|g| g.name == m.guest))
                    .map_or(PEER_HYPERVISOR, |p| p as u32);
                // A region mapped into this guest alone is its control channel with the
                // hypervisor.
                let vector = if peer == PEER_HYPERVISOR {
                    let words = shared_memory::words(region.host, region.size);
                    let channel = ControlChannel::create(words, holder_token()).map_err(|e| {
                        fail(format_args!(
                            "guest '{name}' control region '{}': {e}",
                            region.name
                        ))
                    })?;
                    control = Some(channel);
                    CONTROL_VECTOR
                } else if guest.kind == GuestKind::Lavender {
                    // Rung by its peer's `DOORBELL` (`vcpu::doorbell`).
                    crate::vcpu::doorbell::DELEGATION_VECTOR
                } else {
                    0
                };
                let _ = shared.push(SharedRegionInfo {
                    guest_physical: mapping.guest_physical,
                    size: region.size,
                    peer,
                    notify_doorbell: 0,
                    wait_doorbell: 0,
                    vector,
                    reserved: [0; 7],
                });
            }
        }
        let ram = GuestRam::new(&guest.memory);
        let entry = match guest.kind {
            GuestKind::Lavender => {
                let module = modules
                    .iter()
                    .find(|m| m.name == "lavender")
                    .ok_or_else(|| {
                        fail(format_args!(
                            "guest '{name}': no 'lavender' boot module in the image"
                        ))
                    })?;
                let loaded = lavender::load(
                    &ram,
                    firmware::module_bytes(module),
                    guest,
                    u32::from(id),
                    &shared,
                )
                .map_err(|e| fail(format_args!("guest '{name}': {e}")))?;
                log::info!(
                    "guest '{name}': kernel at {:#x}..{:#x}, entry {:#x}, boot area {:#x}..{:#x}",
                    loaded.image.0,
                    loaded.image.1,
                    loaded.entry.rip,
                    loaded.boot_area.0,
                    loaded.boot_area.1
                );
                loaded.entry
            }
            GuestKind::Linux => load_linux(config, guest, &ram, modules)?,
        };
        let (io_bitmap_a, io_bitmap_b) = io_bitmaps(&guest.devices)?;
        let built = Guest {
            id,
            config: guest.clone(),
            ram,
            ept_pointer: ept.pointer(),
            // VPID 0 is the hypervisor's own (SDM Vol. 3C §30.1): guests start at 1.
            vpid: u16::from(id) + 1,
            msr_bitmap: msr_bitmap()?,
            io_bitmap_a,
            io_bitmap_b,
            entry,
            exits: ExitCounters::new(),
            console: GuestConsole::new(),
            control,
            peers: config.peers(name).map(|index| index as u8).collect(),
            doorbells: config
                .doorbells(name)
                .map(|(base, peer)| (base, peer as u8))
                .collect(),
            warnings: RateLimit::new(WARNING_LIMIT.0, WARNING_LIMIT.1),
            kicks: RateLimit::new(KICK_LIMIT.0, KICK_LIMIT.1),
            state: AtomicU8::new(GuestState::Running as u8),
        };
        // Every initial core is granted: the boot core's vCPU enters at boot (the core
        // takes its grant up), the others wait for the guest's INIT/SIPI like any core
        // it gets later.
        for core in guest.initial_cores.iter() {
            if let Err(e) = CORES.grant(
                core.index(),
                id,
                Requester::Config,
                Reason::Boot,
                crate::arch::cpu::read_tsc(),
            ) {
                return Err(fail(format_args!(
                    "core {} cannot be given to '{}': {e:?}",
                    core.index(),
                    guest.name
                )));
            }
        }
        let _ = guests.push(built);
    }
    Ok(guests)
}
