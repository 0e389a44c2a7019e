//! Booting an unmodified Linux `bzImage` in a partition: the pure building blocks
//! (host-tested, allocation-free) and one entry point, [`prepare`].
//!
//! - [`bzimage`]: parse and validate the setup header (boot protocol >= 2.12, 64-bit).
//! - [`layout`]: where everything goes in guest-physical memory; boot GDT and page tables.
//! - [`e820`]: the guest's memory map.
//! - [`acpi_tables`]: RSDP/XSDT/FADT/MADT/DSDT (HW-reduced ACPI; see there for why).
//! - [`boot_params`]: the zero page.
//!
//! # Entry contract (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol")
//!
//! The boot core enters the kernel's 64-bit entry point with (all from [`LinuxEntry`]):
//!
//! | state | value |
//! |---|---|
//! | mode | IA-32e 64-bit (VM-entry control "IA-32e mode guest"), CPL 0 |
//! | RIP | load address + 0x200 ([`LinuxEntry::rip`]) |
//! | RSI | guest-physical address of the zero page (`struct boot_params`) |
//! | RSP | top of a 16 KiB boot stack in low memory (not required by the protocol) |
//! | other GPRs | 0 |
//! | RFLAGS | 0x2 (IF = 0: interrupts off) |
//! | CS | selector 0x10 (`__BOOT_CS`): base 0, limit 0xfffff (G=1), type 0xb (execute/read, accessed), S=1, DPL 0, P=1, L=1, D=0 -> VMCS access rights 0xa09b |
//! | DS, ES, SS | selector 0x18 (`__BOOT_DS`): base 0, limit 0xfffff (G=1), type 3 (read/write, accessed), S=1, DPL 0, P=1, D/B=1 -> access rights 0xc093 |
//! | FS, GS | 0x18 as well (the protocol says nothing; flat data is the safe choice) |
//! | GDTR | [`LinuxEntry::gdt_base`], limit 31 (null, unused, 0x10 code, 0x18 data) |
//! | IDTR | base 0, limit 0 (the decompressor loads its own IDT before enabling anything) |
//! | TR / LDTR | the VMX-mandated usable busy TSS / unusable LDTR, as for Lavender |
//! | CR0 | 0x8001_0033 (PE, MP, ET, NE, WP, PG) |
//! | CR3 | PML4 of an identity map of guest-physical 0..4 GiB in 2 MiB pages |
//! | CR4 | 0x20 (PAE); the hypervisor adds VMXE under the read shadow |
//! | EFER | 0x500 (LME, LMA) |
//!
//! The identity map covers the kernel's whole `init_size` buffer, the zero page, the
//! command line, the initrd and the ACPI tables: [`layout::plan`] keeps all of them
//! below 4 GiB. The kernel replaces GDT, IDT, page tables and stack within its first
//! microseconds; the boot area is ordinary usable RAM in the e820 map afterwards.
//!
//! Guest RAM must cover guest-physical 0..0xa0000 (Linux's trampolines and the boot
//! area live there) and enough memory at or above the kernel's `pref_address`
//! (16 MiB for Debian's kernels) for `init_size` (~52 MiB for 6.1 cloud).
//!
//! # Cores
//!
//! The MADT lists every core Linux may ever hold, initial ones first, all *Enabled*
//! ([`acpi_tables::CpuHotplug::AllEnabled`]), and [`prepare`] appends
//! `maxcpus=<number of initial cores>` to the command line (unless it already has a
//! `maxcpus=`): Linux then starts only the initial cores and keeps the others present
//! but offline, to be onlined later through sysfs when the hypervisor grants them.

pub mod acpi_tables;
pub mod boot_params;
pub mod bzimage;
pub mod e820;
pub mod layout;

use core::fmt::{self, Write};

use heapless::{String, Vec};
use vmcall_proto::cores::CoreId;

use crate::guest::{GuestPhysicalMemory, OutsideGuest};
use crate::partition::{
    GuestConfig, MemoryRange, PartitionConfig, MAX_RANGES_PER_GUEST, MAX_SHARED_REGIONS,
};
use acpi_tables::{AcpiConfig, AcpiLayout, CpuHotplug, MadtCpu};
use bzimage::BzImage;
use layout::{Layout, LayoutInput};

/// What Linux does when it panics: reset at once (`panic=-1`) through the FADT's reset
/// register (`reboot=acpi`, [`acpi_tables::RESET_REGISTER`]), which the hypervisor answers
/// by stopping Linux, reporting it and telling Lavender. Without `panic=` Linux would spin in
/// its panic loop forever, holding its cores and leaving Lavender's delegated calls to the
/// heartbeat's silence. Without `reboot=`, Linux 6.1 on HW-reduced ACPI without EFI picks
/// EFI (absent, a no-op), then the BIOS's reset vector in real mode, which is the machine's
/// firmware (Linux's partition maps the legacy ROMs); `reboot=acpi` makes the reset
/// register its first try. An oops is not made a panic (`oops=panic` is not set): it kills
/// the task it hit, which for the delegation server PID 1 restarts.
pub const ON_PANIC: &str = "panic=-1 reboot=acpi";

/// Linux sends no all-but-self or all-including-self IPIs (`no_ipi_broadcast=1`): the
/// hypervisor refuses broadcasts (docs/architecture.md, "Interrupts and the APIC"), and Linux
/// uses them once every present CPU has booted, to stop its other CPUs when it panics (it then
/// waits a second for them before trying NMIs) and, with three CPUs or more, for function
/// calls on all the others. Without the shorthand it names each CPU, which is allowed.
pub const NO_IPI_BROADCAST: &str = "no_ipi_broadcast=1";

/// Linux trusts the TSC (`tsc=reliable`: no clocksource watchdog against it). The TSC is the
/// machine's own, invariant and synchronized across cores, never offset or scaled for the
/// guest, and its frequency is in CPUID 15H. The watchdog would judge it against jiffies,
/// which in a guest lose ticks whenever VM exits keep the guest's interrupts off for a while
/// (under an emulator, a burst of exits takes milliseconds: Linux's scan of the virtual PCI
/// bus at boot is one), and then demote the clock to jiffies' 4 ms resolution for good.
pub const TSC_RELIABLE: &str = "tsc=reliable";

/// Linux's RCU grace periods are expedited (`rcupdate.rcu_expedited=1`): a grace period ends
/// once every other CPU has answered an IPI, not after a number of scheduler ticks. CPU
/// hotplug, which is how Linux gives a core up and takes one back, waits for several in a
/// row (the hotplug lock's `rcu_sync`, the scheduler's deactivation of the CPU, the rebuild of
/// its scheduling domains); with normal grace periods a core took some 40 ms of Linux's time
/// to leave under Bochs, with expedited ones under 10 ms. The cost is an IPI to each of
/// Linux's CPUs per grace period, which only a partitioned Linux with few CPUs can afford
/// without thinking twice.
pub const RCU_EXPEDITED: &str = "rcupdate.rcu_expedited=1";

/// Linux has no debugfs (`debugfs=off`: the file system is not registered and every attempt to
/// create a file or directory in it fails at once with `EPERM`; `kernel-parameters.txt`).
/// Nothing of Tandem's reads it, and Linux keeps per-CPU entries there that it rebuilds each
/// time a CPU comes or goes: 6.1 with `CONFIG_SCHED_DEBUG`, as Debian builds it, makes a
/// directory for every CPU and scheduling domain, with a file for each tunable, whenever it
/// rebuilds its scheduling domains, which a CPU's online waits for. Under Bochs a CPU came
/// online 1.5 ms sooner without it (10.1 -> 8.5 ms of a move's 10) and the sysfs write of an
/// offline returned 2 ms sooner.
pub const NO_DEBUGFS: &str = "debugfs=off";

/// Linux keeps its per-CPU lists of free pages short (`sysctl.vm.percpu_pagelist_high_fraction`,
/// set before init runs: a list may hold the zone's pages divided by this and by the CPU
/// count, but never less than four batches, 252 pages in a 1 GiB zone, which this large a
/// fraction gives for any zone under a terabyte). The CPU that takes another offline gives
/// the dead CPU's list back to the buddy allocator (`page_alloc_cpu_dead`), page by page:
/// with the default bound (the zone's low watermark over its CPUs, 4263 pages for a 1 GiB
/// Linux on 2 CPUs) that took up to 15 ms of an offline's time under Bochs, with this one
/// under 1 ms. A CPU then goes to the zone's lock more often for pages, which a partition
/// of a few CPUs hardly notices.
pub const SHORT_PAGE_LISTS: &str = "sysctl.vm.percpu_pagelist_high_fraction=1000000";

/// CR0, CR4 and EFER at entry (see the module documentation).
pub const ENTRY_CR0: u64 = 0x8001_0033;
pub const ENTRY_CR4: u64 = 1 << 5;
pub const ENTRY_EFER: u64 = (1 << 8) | (1 << 10);
pub const ENTRY_RFLAGS: u64 = 0x2;
/// VMCS access-rights encodings (Intel SDM Vol. 3C §25.4.1, Table 25-2) of the two
/// boot segments.
pub const BOOT_CS_ACCESS_RIGHTS: u32 = 0xa09b;
pub const BOOT_DS_ACCESS_RIGHTS: u32 = 0xc093;

/// What a Linux partition looks like to its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxPartition<'a> {
    /// Guest-physical RAM ranges.
    pub ram: &'a [MemoryRange],
    /// Guest-physical [start, end) of the shared regions mapped into this guest.
    pub shared: &'a [(u64, u64)],
    pub acpi: AcpiConfig<'a>,
}

/// Owned storage for a [`LinuxPartition`] derived from the partition configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxGuestSpec {
    pub ram: Vec<MemoryRange, MAX_RANGES_PER_GUEST>,
    pub shared: Vec<(u64, u64), MAX_SHARED_REGIONS>,
    pub cpus: Vec<MadtCpu, { acpi_tables::MAX_CPUS }>,
}

impl LinuxGuestSpec {
    /// The guest's RAM, its shared regions and its cores: the boot core, then the
    /// other initial cores, then the rest of the allowed ones. `apic_id` gives the
    /// APIC ID Linux sees for a core.
    pub fn new(
        config: &PartitionConfig,
        guest: &GuestConfig,
        apic_id: impl Fn(CoreId) -> u32,
    ) -> Self {
        let shared = config
            .shared
            .iter()
            .flat_map(|s| {
                s.mappings
                    .iter()
                    .filter(|m| m.guest == guest.name)
                    .map(move |m| (m.guest_physical, m.guest_physical.saturating_add(s.size)))
            })
            .take(MAX_SHARED_REGIONS)
            .collect();
        let initial = guest.initial_cores;
        let cpus = cpu_order(guest)
            .map(|core| MadtCpu {
                apic_id: apic_id(core),
                initial: initial.contains(core) || core == guest.boot_core,
            })
            .take(acpi_tables::MAX_CPUS)
            .collect();
        Self {
            ram: guest.memory.clone(),
            shared,
            cpus,
        }
    }

    /// The partition with the default ACPI configuration (IOAPIC, COM1 and RTC owned,
    /// HW-reduced, all cores enabled + `maxcpus=`).
    pub fn partition(&self) -> LinuxPartition<'_> {
        LinuxPartition {
            ram: &self.ram,
            shared: &self.shared,
            acpi: AcpiConfig::new(&self.cpus),
        }
    }
}

/// The cores Linux may hold, in the order of its CPU numbers (the MADT's order): the boot
/// core, then the other initial cores, then the rest of the allowed ones.
pub fn cpu_order(guest: &GuestConfig) -> impl Iterator<Item = CoreId> + '_ {
    let initial = guest.initial_cores;
    core::iter::once(guest.boot_core)
        .chain(initial.iter().filter(move |c| *c != guest.boot_core))
        .chain(
            guest
                .allowed_cores
                .iter()
                .filter(move |c| !initial.contains(*c) && *c != guest.boot_core),
        )
}

/// The boot core's state at entry, and where everything went (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    pub rip: u64,
    pub rsi: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    /// DS, ES, SS (and FS, GS).
    pub ds: u16,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub layout: Layout,
    pub acpi: AcpiLayout,
    pub e820_entries: usize,
    /// Length of the command line as written (without the NUL).
    pub cmdline_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxError {
    Image(bzimage::ImageError),
    Layout(layout::LayoutError),
    E820(e820::E820Error),
    Acpi(acpi_tables::AcpiError),
    BootParams(boot_params::BootParamsError),
    CmdlineTooLong {
        len: usize,
        max: u32,
    },
    CmdlineHasNul,
    /// Writing `what` failed: the layout placed it outside guest RAM (a bug, or a
    /// `GuestPhysicalMemory` that disagrees with the configured ranges).
    Memory {
        what: &'static str,
        at: OutsideGuest,
    },
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(e) => e.fmt(f),
            Self::Layout(e) => e.fmt(f),
            Self::E820(e) => e.fmt(f),
            Self::Acpi(e) => e.fmt(f),
            Self::BootParams(e) => e.fmt(f),
            Self::CmdlineTooLong { len, max } => write!(
                f,
                "the Linux command line is {len} bytes, the kernel accepts at most {max}"
            ),
            Self::CmdlineHasNul => f.write_str("the Linux command line contains a NUL byte"),
            Self::Memory { what, at } => write!(
                f,
                "cannot write the {what} at guest-physical {:#x}+{:#x}: outside the guest's RAM",
                at.guest_physical, at.len
            ),
        }
    }
}

macro_rules! from_error {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for LinuxError {
            fn from(e: $ty) -> Self {
                Self::$variant(e)
            }
        }
    )*};
}
from_error!(
    Image(bzimage::ImageError),
    Layout(layout::LayoutError),
    E820(e820::E820Error),
    Acpi(acpi_tables::AcpiError),
    BootParams(boot_params::BootParamsError)
);

/// The ` maxcpus=N` suffix [`prepare`] appends (empty if not needed).
fn maxcpus_suffix(cmdline: &str, acpi: &AcpiConfig) -> String<16> {
    let mut suffix = String::new();
    let initial = acpi.cpus.iter().filter(|c| c.initial).count();
    let needed = acpi.hotplug == CpuHotplug::AllEnabled
        && initial < acpi.cpus.len()
        && !cmdline
            .split_ascii_whitespace()
            .any(|w| w.starts_with("maxcpus="));
    if needed {
        // At most 64 cores: " maxcpus=64" fits.
        let _ = write!(
            suffix,
            "{}maxcpus={initial}",
            if cmdline.is_empty() { "" } else { " " }
        );
    }
    suffix
}

/// Loads `image` and `initrd` into `memory` and writes every boot structure (page
/// tables, GDT, zero page, command line, ACPI tables); returns the entry state.
pub fn prepare(
    memory: &impl GuestPhysicalMemory,
    image: &[u8],
    initrd: &[u8],
    cmdline: &str,
    config: &LinuxPartition,
) -> Result<LinuxEntry, LinuxError> {
    let kernel = BzImage::parse(image)?;
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxError::CmdlineHasNul);
    }
    let suffix = maxcpus_suffix(cmdline, &config.acpi);
    let cmdline_len = cmdline.len() + suffix.len();
    if cmdline_len > kernel.cmdline_size as usize {
        return Err(LinuxError::CmdlineTooLong {
            len: cmdline_len,
            max: kernel.cmdline_size,
        });
    }
    let acpi_size = acpi_tables::layout(0, &config.acpi).size;
    let plan = layout::plan(&LayoutInput {
        ram: config.ram,
        avoid: config.shared,
        pref_address: kernel.pref_address,
        kernel_alignment: kernel.kernel_alignment,
        relocatable: kernel.relocatable,
        init_size: kernel.init_size,
        kernel_len: kernel.kernel().len() as u64,
        initrd_size: initrd.len() as u64,
        initrd_addr_max: kernel.initrd_addr_max,
        cmdline_len: cmdline_len as u64 + 1,
        acpi_size: acpi_size as u64,
    })?;
    let e820 = e820::build(config.ram, config.shared, Some(plan.acpi))?;

    let write = |what: &'static str, at: u64, bytes: &[u8]| {
        memory
            .write(at, bytes)
            .map_err(|at| LinuxError::Memory { what, at })
    };
    // Page 0 (IVT, BIOS data area: Linux reads the EBDA pointer and base-memory size
    // there, and zero means "none"), then the boot area.
    memory
        .zero(0, layout::BOOT_AREA_BASE)
        .map_err(|at| LinuxError::Memory {
            what: "BIOS data area",
            at,
        })?;
    memory
        .zero(plan.boot_area.0, plan.boot_area.1 - plan.boot_area.0)
        .map_err(|at| LinuxError::Memory {
            what: "boot area",
            at,
        })?;
    layout::write_boot_structures(memory, &plan).map_err(|at| LinuxError::Memory {
        what: "boot page tables",
        at,
    })?;
    write("command line", plan.cmdline, cmdline.as_bytes())?;
    write(
        "command line",
        plan.cmdline + cmdline.len() as u64,
        suffix.as_bytes(),
    )?;
    write("command line", plan.cmdline + cmdline_len as u64, &[0])?;
    write("kernel", plan.kernel, kernel.kernel())?;
    if !initrd.is_empty() {
        write("initrd", plan.initrd.0, initrd)?;
    }

    let mut tables = [0u8; acpi_tables::MAX_SIZE];
    let acpi = acpi_tables::build(&mut tables, plan.acpi.0, &config.acpi)?;
    memory
        .zero(plan.acpi.0, plan.acpi.1 - plan.acpi.0)
        .map_err(|at| LinuxError::Memory {
            what: "ACPI tables",
            at,
        })?;
    write("ACPI tables", plan.acpi.0, &tables[..acpi.size])?;

    let zero_page = boot_params::build(
        &kernel,
        &boot_params::BootParamsInput {
            cmdline: plan.cmdline,
            initrd: (plan.initrd.0, plan.initrd.1 - plan.initrd.0),
            acpi_rsdp: acpi.rsdp_address(),
            load_address: plan.kernel,
            e820: &e820,
        },
    )?;
    write("zero page", plan.zero_page, &zero_page)?;

    Ok(LinuxEntry {
        rip: plan.entry(),
        rsi: plan.zero_page,
        rsp: plan.stack_top,
        rflags: ENTRY_RFLAGS,
        cr0: ENTRY_CR0,
        cr3: plan.pml4,
        cr4: ENTRY_CR4,
        efer: ENTRY_EFER,
        cs: layout::BOOT_CS,
        ds: layout::BOOT_DS,
        gdt_base: plan.gdt,
        gdt_limit: layout::GDT_LIMIT,
        layout: plan,
        acpi,
        e820_entries: e820.len(),
        cmdline_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::e820::E820Type;
    use std::vec::Vec as StdVec;

    use crate::guest::fake_memory::FakeRam;

    fn cpus() -> [MadtCpu; 3] {
        [
            MadtCpu {
                apic_id: 0,
                initial: true,
            },
            MadtCpu {
                apic_id: 2,
                initial: false,
            },
            MadtCpu {
                apic_id: 3,
                initial: false,
            },
        ]
    }

    /// Walks the boot page tables like the CPU would.
    fn translate(ram: &FakeRam, cr3: u64, va: u64) -> Option<u64> {
        let pml4e = ram.u64(cr3 + ((va >> 39) & 511) * 8);
        let pdpte = ram.u64((pml4e & !0xfff) + ((va >> 30) & 511) * 8);
        let pde = ram.u64((pdpte & !0xfff) + ((va >> 21) & 511) * 8);
        (pml4e & pdpte & pde & 1 == 1 && pde & 0x80 != 0)
            .then(|| (pde & !0x1f_ffff) + (va & 0x1f_ffff))
    }

    #[test]
    fn prepares_a_synthetic_kernel_end_to_end() {
        const SIZE: u64 = 64 << 20;
        let ram = FakeRam::new(SIZE as usize, 0x5a);
        let ranges = [MemoryRange {
            guest: 0,
            host: 0x1000_0000,
            size: SIZE,
        }];
        let shared = [(0x150_0000, 0x160_0000)];
        let cpus = cpus();
        let config = LinuxPartition {
            ram: &ranges,
            shared: &shared,
            acpi: AcpiConfig::new(&cpus),
        };
        let image = bzimage::tests::synthetic(0x4000);
        let initrd = [0x17u8; 0x2345];
        let entry = prepare(&ram, &image, &initrd, "console=ttyS0", &config).unwrap();

        // The kernel avoided the shared region: first 2 MiB-aligned fit above it.
        assert_eq!(entry.layout.kernel, 0x160_0000);
        assert_eq!(entry.rip, 0x160_0200);
        assert_eq!(ram.read(0x160_0000, 0x4000), &image[0x800..]);
        assert_eq!((entry.cs, entry.ds, entry.rsi), (0x10, 0x18, 0x8000));
        assert_eq!(
            (entry.cr0, entry.cr4, entry.efer),
            (0x8001_0033, 0x20, 0x500)
        );
        // Command line with maxcpus appended, NUL-terminated.
        let cmd = ram.read(0xd000, entry.cmdline_len + 1);
        assert_eq!(&cmd[..], b"console=ttyS0 maxcpus=1\0");
        // Initrd high, below the ACPI tables at the top.
        assert_eq!(entry.layout.acpi, (SIZE - 0x1000, SIZE));
        assert_eq!(entry.layout.initrd, (SIZE - 0x4000, SIZE - 0x4000 + 0x2345));
        assert_eq!(ram.read(SIZE - 0x4000, 0x2345), &initrd[..]);
        // Zero page fields.
        let zp = entry.rsi;
        assert_eq!(ram.read(zp + 0x202, 4), b"HdrS");
        assert_eq!(ram.u32(zp + 0x228), 0xd000);
        assert_eq!(ram.u32(zp + 0x218), (SIZE - 0x4000) as u32);
        assert_eq!(ram.u32(zp + 0x21c), 0x2345);
        assert_eq!(ram.u64(zp + 0x70), entry.acpi.rsdp_address());
        assert_eq!(ram.read(entry.acpi.rsdp_address(), 8), b"RSD PTR ");
        assert_eq!(ram.read(zp + 0x210, 1), [0xff]);
        let n = ram.read(zp + 0x1e8, 1)[0] as usize;
        assert_eq!(n, entry.e820_entries);
        let map: StdVec<(u64, u64, u32)> = (0..n as u64)
            .map(|i| {
                let at = zp + 0x2d0 + i * 20;
                (ram.u64(at), ram.u64(at + 8), ram.u32(at + 16))
            })
            .collect();
        assert_eq!(
            map,
            [
                (0, 0xa_0000, E820Type::Ram as u32),
                (0xa_0000, 0x6_0000, 2),
                (0x10_0000, 0x140_0000, 1),
                (0x150_0000, 0x10_0000, 2),
                (0x160_0000, SIZE - 0x1000 - 0x160_0000, 1),
                (SIZE - 0x1000, 0x1000, 3),
            ]
        );
        // BIOS data area zeroed.
        assert!(ram.read(0, 0x1000).iter().all(|b| *b == 0));
        // The identity map covers the kernel buffer, zero page, cmdline, initrd, ACPI.
        for va in [
            entry.rip,
            entry.layout.kernel_buffer.1 - 1,
            zp,
            0xd000,
            entry.layout.initrd.1 - 1,
            entry.layout.acpi.0,
            entry.rsp - 8,
        ] {
            assert_eq!(translate(&ram, entry.cr3, va), Some(va), "{va:#x}");
        }
        // GDT.
        assert_eq!(entry.gdt_limit, 31);
        assert_eq!(
            ram.u64(entry.gdt_base + 0x10),
            0x00af_9b00_0000_ffff,
            "__BOOT_CS"
        );
    }

    #[test]
    fn command_line_checks_and_maxcpus_rules() {
        let cpus = cpus();
        let acpi = AcpiConfig::new(&cpus);
        assert_eq!(maxcpus_suffix("a maxcpus=2", &acpi), "");
        assert_eq!(maxcpus_suffix("", &acpi), "maxcpus=1");
        let all_initial = [cpus[0]];
        assert_eq!(maxcpus_suffix("x", &AcpiConfig::new(&all_initial)), "");
        let mut capable = AcpiConfig::new(&cpus);
        capable.hotplug = CpuHotplug::OnlineCapable;
        assert_eq!(maxcpus_suffix("x", &capable), "");

        let ram = FakeRam::new(32 << 20, 0x5a);
        let ranges = [MemoryRange {
            guest: 0,
            host: 0,
            size: 32 << 20,
        }];
        let config = LinuxPartition {
            ram: &ranges,
            shared: &[],
            acpi,
        };
        let image = bzimage::tests::synthetic(0x1000);
        let long = "x".repeat(2040);
        assert_eq!(
            prepare(&ram, &image, &[], &long, &config),
            Err(LinuxError::CmdlineTooLong {
                len: 2050,
                max: 0x7ff
            })
        );
        assert_eq!(
            prepare(&ram, &image, &[], "a\0b", &config),
            Err(LinuxError::CmdlineHasNul)
        );
        assert_eq!(
            prepare(&ram, b"short", &[], "", &config)
                .unwrap_err()
                .to_string(),
            "the kernel image is 5 bytes, too short for its setup header (needs 518)"
        );
        // A RAM range the memory does not back: the write fails with a typed error.
        let lying = [MemoryRange {
            guest: 0,
            host: 0,
            size: 64 << 20,
        }];
        let config = LinuxPartition {
            ram: &lying,
            ..config
        };
        assert!(matches!(
            prepare(&ram, &image, &[1, 2, 3], "", &config),
            Err(LinuxError::Memory { .. })
        ));
    }

    #[test]
    fn spec_from_the_partition_configuration() {
        let text = "tandem-partitions 1\n\
             hypervisor base=0x200000 size=0x7e00000\n\
             guest linux kind=linux boot_core=2 initial=0,2 allowed=0,1,2,3\n\
             memory linux guest=0x0 host=0x10000000 size=0x10000000\n\
             shared pv host=0x30000000 size=0x100000 map=linux@0x20000000\n";
        let config = PartitionConfig::parse(text).unwrap();
        let guest = config.guest("linux").unwrap();
        let spec = LinuxGuestSpec::new(&config, guest, |c| c.index() as u32 * 2);
        assert_eq!(&spec.shared[..], &[(0x2000_0000, 0x2010_0000)]);
        let order: StdVec<_> = spec.cpus.iter().map(|c| (c.apic_id, c.initial)).collect();
        assert_eq!(order, [(4, true), (0, true), (2, false), (6, false)]);
        assert_eq!(spec.partition().ram.len(), 1);
    }

    #[test]
    fn prepares_the_debian_kernel() {
        let Some(image) = bzimage::tests::debian_kernel() else {
            return;
        };
        const SIZE: u64 = 128 << 20;
        let ram = FakeRam::new(SIZE as usize, 0x5a);
        let ranges = [MemoryRange {
            guest: 0,
            host: 0x1000_0000,
            size: SIZE,
        }];
        let cpus = cpus();
        let config = LinuxPartition {
            ram: &ranges,
            shared: &[],
            acpi: AcpiConfig::new(&cpus),
        };
        let initrd = [0u8; 0x1000];
        let entry = prepare(&ram, &image, &initrd, "console=ttyS0 quiet", &config).unwrap();
        let parsed = BzImage::parse(&image).unwrap();
        assert_eq!(entry.layout.kernel, 0x100_0000);
        assert_eq!(entry.layout.kernel_buffer.1, 0x100_0000 + parsed.init_size);
        assert!(entry.layout.initrd.1 <= entry.layout.acpi.0);
        let k = parsed.kernel_offset();
        assert_eq!(ram.read(0x100_0000, 64), &image[k..k + 64]);
        // The zero page's header is the image's, with the loader's fields.
        assert_eq!(ram.read(0x8000 + 0x1f1, 0x10), &image[0x1f1..0x201]);
        assert_eq!(ram.read(0x8000 + 0x210, 1), [0xff]);
    }
}
