//! The boot sequence: the BSP reads the platform and the partition configuration, turns
//! VMX on, builds the guests, starts every other core (each turns VMX on itself and
//! enters its guest if it is one's boot core), prints the boot report and then watches
//! the guests (`monitor`).

use heapless::Vec;
use log::{error, info, warn};

use crate::arch::lapic::LocalApic;
use crate::arch::percpu::{self, CpuState, CPUS};
use crate::arch::{cpu, descriptors, firmware, port, vmx as arch_vmx};
use crate::partition::{Machine, PartitionConfig};
use crate::platform::{
    self, BootModule, CpuList, MemoryKind, MemoryMap, MemoryRegion, ModuleList, PlatformError,
    MAX_CPUS,
};
use crate::report::{BootReport, CoreStatus};
use crate::vmx::caps::VmxFeatures;
use crate::vmx::enable::VmxUnavailable;
use crate::{cmdline, console, cpu_info, guest, monitor, smp, time, vcpu};

/// Prints a one-line reason and a `fatal` marker, then halts this core. Other cores are
/// either not started yet or already halted when this is called.
fn fatal(code: &str, reason: &dyn core::fmt::Display) -> ! {
    error!("FATAL: {reason}. Halting.");
    console::marker("fatal", |o| {
        o.str("code", code).display("reason", reason);
    });
    console::stop_queueing();
    cpu::halt_forever()
}

/// Entry of the bootstrap processor, from `boot` via `hv_boot_main`.
pub fn bsp_main(multiboot_magic: u32, boot_information: usize) -> ! {
    console::init(log::LevelFilter::Info);
    let host_tables = descriptors::load_for_cpu(0);
    port::mask_legacy_pic();
    cpu::enable_xsave();
    console::marker("hv_start", |o| {
        o.str("version", env!("CARGO_PKG_VERSION"));
    });
    info!("Tandem hypervisor {} starting", env!("CARGO_PKG_VERSION"));

    if multiboot_magic != boot::MULTIBOOT2_BOOTLOADER_MAGIC {
        let e = PlatformError::NotMultiboot2 {
            magic: multiboot_magic,
        };
        fatal(e.code(), &e);
    }
    let platform = read_platform(boot_information).unwrap_or_else(|e| fatal(e.code(), &e));
    console::set_level(platform.options.log_level);
    monitor::print_load_reports(platform.options.print_load_reports());

    let identity = cpu_info::identify();
    info!(
        "CPU: {} family {} model {} stepping {} \"{}\"",
        identity.vendor, identity.family, identity.model, identity.stepping, identity.brand
    );
    let caps = arch_vmx::read_capabilities().unwrap_or_else(|e| fatal(e.code(), &e));
    let features = VmxFeatures::decode(&caps);
    let partitions = read_partitions(&platform);

    let tsc_hz = time::calibrate_tsc();
    info!("TSC: {} MHz", tsc_hz / 1_000_000);

    let apic = LocalApic::enable_on_this_cpu(identity.has_x2apic);
    let bsp_apic_id = apic.id();
    CPUS[0].set_apic_id(bsp_apic_id);
    CPUS[0].set_state(CpuState::Running);
    turn_vmx_on(0, bsp_apic_id);
    if CPUS[0].state() != CpuState::VmxOn {
        let reason =
            VmxUnavailable::from_u8(CPUS[0].failure()).unwrap_or(VmxUnavailable::VmxonFailed);
        fatal(reason.code(), &reason);
    }

    // Guests are built before the APs start: each AP enters its guest as soon as its VMX
    // is on.
    if let Some(config) = &partitions {
        let guests = guest::build::build_all(config, &platform.modules)
            .unwrap_or_else(|e| fatal("guest_build_failed", &e));
        guest::install(guests);
    }
    // Core 0 is the hypervisor's own unless a guest may hold it; then the monitor's work
    // runs on the guests' cores (see `monitor.rs`). Settled before any guest starts.
    let own_core = partitions
        .as_ref()
        .is_none_or(|c| c.monitor_core().is_some());
    if platform.options.core_test.is_some() && !own_core {
        fatal(
            "config_invalid",
            &"core_test= needs core 0 for the hypervisor: no guest's allowed_cores may hold it",
        );
    }
    monitor::init(
        platform.options.stats_ms,
        own_core,
        features.preemption_timer_rate,
    );

    // Per-CPU index 0 is the BSP; the others follow in MADT order.
    let mut started = 1;
    for entry in platform
        .cpus
        .iter()
        .filter(|c| c.enabled && c.apic_id != bsp_apic_id)
    {
        if started >= MAX_CPUS {
            warn!(
                "more than {MAX_CPUS} processors; APIC ID {} stays off",
                entry.apic_id
            );
            continue;
        }
        if smp::start_ap(&apic, started, entry.apic_id, ap_entry) == CpuState::Running {
            smp::wait_for_vmx(started);
        }
        started += 1;
    }

    let cores: Vec<CoreStatus, MAX_CPUS> = (0..started).map(core_status).collect();
    let report = BootReport {
        cpu: &identity,
        vmx: &features,
        cores: &cores,
        memory: &platform.memory,
        modules: &platform.modules,
        tsc_hz,
    };
    console::marker("boot_report", |o| report.write_fields(o));
    let vmx_on = cores.iter().filter(|c| c.vmx == "on").count();
    info!("{vmx_on} of {} cores have VMX on", cores.len());
    if let Some(failed) = cores.iter().find(|c| c.vmx != "on") {
        fatal(
            failed.reason.unwrap_or("core_failed"),
            &format_args!(
                "cpu{} (APIC ID {}) could not turn VMX on",
                failed.cpu, failed.apic_id
            ),
        );
    }
    crate::policy_engine::init(
        partitions.as_ref().map(|c| c.policy).unwrap_or_default(),
        features.preemption_timer_rate,
    );
    if guest::all().is_empty() {
        info!("no partition configuration in the image: no guests, all cores idle");
        console::marker("idle", |_| {});
        cpu::halt_forever()
    }
    // From here on the monitor drains the console: every core queues its lines.
    console::start_queueing();
    if own_core {
        info!("core 0 is the hypervisor's: it watches the guests");
        monitor::run_on_own_core(platform.options.core_test)
    }
    info!("no core is the hypervisor's own: it works on the guests' exits");
    if let Some(guest) = guest::booting_on(0) {
        let generation = crate::cores::CORES.word(0).generation;
        vcpu::mailbox::post_start(0, guest.id, generation, vcpu::mailbox::Start::Entry64);
    }
    vcpu::core_loop(0, &host_tables)
}

/// Reads and validates the `partitions` boot module, if the image has one.
fn read_partitions(platform: &Platform) -> Option<PartitionConfig> {
    let module = platform.modules.iter().find(|m| m.name == "partitions")?;
    let text = core::str::from_utf8(firmware::module_bytes(module))
        .unwrap_or_else(|_| fatal("config_invalid", &"the partitions module is not UTF-8 text"));
    let config = PartitionConfig::parse(text).unwrap_or_else(|e| fatal("config_invalid", &e));
    let ram: Vec<(u64, u64), 64> = platform
        .memory
        .iter()
        .filter(|r| r.kind == MemoryKind::Available)
        .map(|r| (r.base, r.base + r.length))
        .collect();
    let cpus = platform
        .cpus
        .iter()
        .filter(|c| c.enabled)
        .count()
        .min(MAX_CPUS);
    config
        .validate(&Machine { cpus, ram: &ram })
        .unwrap_or_else(|e| fatal("config_invalid", &e));
    let (start, end) = firmware::hypervisor_image();
    let hv = config.hypervisor;
    if start < hv.host || end > hv.host + hv.size {
        fatal(
            "config_invalid",
            &format_args!(
                "the hypervisor image {start:#x}..{end:#x} lies outside the configured hypervisor memory {:#x}..{:#x}",
                hv.host,
                hv.host + hv.size
            ),
        );
    }
    info!(
        "partition configuration: {} guest(s), {} shared region(s)",
        config.guests.len(),
        config.shared.len()
    );
    Some(config)
}

/// Entry of every application processor (called by the trampoline with its index).
extern "C" fn ap_entry(cpu_index: u64) -> ! {
    let index = cpu_index as usize;
    let host_tables = descriptors::load_for_cpu(index);
    cpu::enable_xsave();
    CPUS[index].set_state(CpuState::Running);
    let identity = cpu_info::identify();
    let apic = LocalApic::enable_on_this_cpu(identity.has_x2apic);
    turn_vmx_on(index, apic.id());
    if CPUS[index].state() != CpuState::VmxOn {
        cpu::halt_forever()
    }
    if let Some(guest) = guest::booting_on(index) {
        let generation = crate::cores::CORES.word(index).generation;
        vcpu::mailbox::post_start(index, guest.id, generation, vcpu::mailbox::Start::Entry64);
    }
    vcpu::core_loop(index, &host_tables)
}

/// Turns VMX on for this core and publishes the outcome in its public state.
fn turn_vmx_on(index: usize, apic_id: u32) {
    let result = arch_vmx::read_capabilities().and_then(|caps| {
        let region = percpu::claim_vmxon_region(index).ok_or(VmxUnavailable::VmxonFailed)?;
        arch_vmx::enable(region, VmxFeatures::decode(&caps).vmcs_revision)
    });
    match result {
        Ok(()) => {
            info!("cpu{index} (APIC ID {apic_id}): VMX on");
            console::marker("core_vmx_on", |o| {
                o.u64("cpu", index as u64).u64("apic_id", apic_id.into());
            });
            CPUS[index].set_state(CpuState::VmxOn);
        }
        Err(reason) => {
            error!("cpu{index} (APIC ID {apic_id}): {reason}");
            CPUS[index].set_failure(reason.to_u8());
            CPUS[index].set_state(CpuState::VmxFailed);
        }
    }
}

fn core_status(index: usize) -> CoreStatus {
    let public = &CPUS[index];
    let (vmx, reason) = match public.state() {
        CpuState::VmxOn => ("on", None),
        CpuState::VmxFailed => (
            "failed",
            VmxUnavailable::from_u8(public.failure()).map(VmxUnavailable::code),
        ),
        CpuState::NoResponse => ("no_response", Some("no_response")),
        _ => ("no_response", Some("vmx_timeout")),
    };
    CoreStatus {
        cpu: index,
        apic_id: public.apic_id(),
        vmx,
        reason,
    }
}

/// What the boot loader and the firmware describe, copied out of their structures so
/// the low pages they occupy may be reused (the AP trampoline, later the guests).
struct Platform {
    options: cmdline::Options,
    memory: MemoryMap,
    modules: ModuleList,
    cpus: CpuList,
}

fn read_platform(boot_information: usize) -> Result<Platform, PlatformError> {
    let mbi = firmware::load_boot_information(boot_information)?;
    let cmdline = mbi
        .command_line_tag()
        .and_then(|t| t.cmdline().ok())
        .unwrap_or("");
    let options = cmdline::parse(cmdline, |word| {
        warn!("ignoring unknown command-line option {:?}", word.0)
    });
    // The RSDP tags hold a copy of the RSDP right after their 8-byte tag header.
    let rsdp = mbi
        .rsdp_v2_tag()
        .map(|t| t as *const _ as usize + 8)
        .or_else(|| mbi.rsdp_v1_tag().map(|t| t as *const _ as usize + 8));
    Ok(Platform {
        options,
        memory: read_memory_map(&mbi)?,
        modules: read_modules(&mbi),
        cpus: firmware::read_processors(rsdp)?,
    })
}

fn read_memory_map(mbi: &multiboot2::BootInformation) -> Result<MemoryMap, PlatformError> {
    let tag = mbi.memory_map_tag().ok_or(PlatformError::NoMemoryMap)?;
    let mut map = MemoryMap::new();
    for area in tag.memory_areas() {
        let region = MemoryRegion {
            base: area.start_address(),
            length: area.size(),
            kind: MemoryKind::from_multiboot(u32::from(area.typ())),
        };
        if map.push(region).is_err() {
            warn!(
                "memory map longer than {} entries; the rest is ignored",
                map.capacity()
            );
            break;
        }
    }
    Ok(map)
}

fn read_modules(mbi: &multiboot2::BootInformation) -> ModuleList {
    let mut modules = ModuleList::new();
    for module in mbi.module_tags() {
        let name = module.cmdline().unwrap_or("?");
        let entry: BootModule = platform::module_from(
            name,
            module.start_address().into(),
            module.end_address().into(),
        );
        if modules.push(entry).is_err() {
            warn!(
                "more than {} boot modules; {name} is ignored",
                modules.capacity()
            );
        }
    }
    modules
}
