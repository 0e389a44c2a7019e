//! ACPI tables for the Linux guest, built by the hypervisor (the partition has no
//! firmware of its own): RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! References are to the ACPI 6.5 specification (section numbers in comments).
//!
//! # Decisions
//!
//! **HW-reduced ACPI** (FADT flag `HW_REDUCED_ACPI`, §5.2.9 Table 5.10, §4.1). A
//! HW-reduced platform has no ACPI fixed hardware: no PM1 event/control blocks, no PM
//! timer, no GPE blocks, no SMI command port, no FACS, no SCI. The alternative, full
//! ACPI, would oblige the hypervisor to emulate a PM1a event/control block (ACPICA logs
//! "ACPI BIOS Error: Required FADT field Pm1aEventBlock has zero address" without one)
//! and an SCI, or to pass the chipset's real ones through, which would let Linux power
//! the whole machine off (PM1a_CNT.SLP_TYP) from under Lavender. Firecracker and Cloud
//! Hypervisor boot stock x86 kernels with HW-reduced tables. What it means for Linux 6.1
//! (`arch/x86/kernel/acpi/boot.c: acpi_reduced_hw_init()`): no 8259 (`null_legacy_pic`,
//! so ISA IRQs are only reachable through the IOAPIC and need the devices declared in
//! the DSDT, see below), no PIT/HPET clockevent set up by `timer_init` (each CPU uses
//! its local APIC timer, calibrated from the TSC; the TSC itself is calibrated by CPUID
//! 0x15/0x16 or by reading PIT channel 2 directly, which still works since Linux owns
//! the PIT), no ACPI PM-timer clocksource (the TSC is the clocksource). Poweroff through
//! ACPI is not offered: Linux falls back to halting, which the hypervisor sees. Reset is,
//! through the FADT's reset register ([`RESET_REGISTER`], a field HW-reduced tables keep),
//! which the hypervisor intercepts and answers by stopping the guest (it restarts none).
//!
//! **DSDT**: a valid definition block (§5.2.11.1, AML per §20) declaring only the legacy
//! devices Linux owns and needs interrupts for: COM1 (`PNP0501`, I/O 0x3f8, IRQ 4) and
//! the CMOS RTC (`PNP0B00`, I/O 0x70, IRQ 8). Without the PIC, Linux only maps an ISA
//! IRQ to an IOAPIC pin for devices that declare it (`acpi_register_gsi` from PNP
//! `_CRS`); the legacy serial port table alone would get `request_irq(4)` refused.
//!
//! **MADT** (§5.2.12): a Local APIC structure per core (Local x2APIC for APIC IDs >= 255,
//! as §5.2.12.12 requires), an I/O APIC structure when Linux owns the IOAPIC, the
//! interrupt source overrides of PC firmware (ISA IRQ0 -> GSI 2 edge/high, IRQ9 -> GSI 9
//! level/high), and LINT1 NMI structures for all processors. How the cores Linux does
//! not start with are listed is [`CpuHotplug`]'s choice; see there for why
//! `AllEnabled` is the default and `OnlineCapable` is not enough by itself.
//!
//! **FADT** boot-architecture flags (§5.2.9.3): "VGA Not Present" and "CMOS RTC Not
//! Present" and "8042" follow [`LegacyDevices`]; the default gives Linux the RTC and
//! COM1 and no VGA or 8042 (so it neither probes the VGA window nor the keyboard
//! controller's ports, which it does not own). `FORCE_APIC_PHYSICAL_DESTINATION_MODE`
//! (§5.2.9 Table 5.10 bit 19) is set by default so Linux's x2APIC driver uses physical
//! destinations (`x2apic_phys`): an intercepted ICR write then names an APIC ID the
//! hypervisor translates directly, with no logical cluster IDs to emulate.

use core::fmt;

use heapless::Vec;

/// Signature of the RSDP (§5.2.5.3).
pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
pub const OEM_ID: &[u8; 6] = b"TANDEM";
const CREATOR_ID: &[u8; 4] = b"TNDM";
const CREATOR_REVISION: u32 = 1;
const OEM_REVISION: u32 = 1;
/// Default xAPIC/x2APIC MMIO base reported in the MADT header.
pub const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;

const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
/// FADT revision 6 (ACPI 6.x) is 276 bytes (§5.2.9 Table 5.9).
pub const FADT_LEN: usize = 276;
pub const FADT_REVISION: u8 = 6;
/// ACPI 6.5: Linux honours MADT "Online Capable" only from FADT 6.3 on
/// (`acpi_parse_madt`: `revision > 6 || (revision == 6 && minor_revision >= 3)`).
pub const FADT_MINOR_REVISION: u8 = 5;
/// MADT revision 5 (ACPI 6.3+ layout with the Online Capable flag).
pub const MADT_REVISION: u8 = 5;
const MADT_FIXED_LEN: usize = HEADER_LEN + 8;
const XSDT_ENTRIES: usize = 2;

/// MADT Local APIC flags (§5.2.12.2 Table 5.23).
pub const MADT_ENABLED: u32 = 1 << 0;
pub const MADT_ONLINE_CAPABLE: u32 = 1 << 1;
/// MPS INTI flags (§5.2.12.5 Table 5.26): polarity bits 1:0, trigger bits 3:2.
pub const INTI_ACTIVE_HIGH: u16 = 0b01;
pub const INTI_EDGE: u16 = 0b01 << 2;
pub const INTI_LEVEL: u16 = 0b11 << 2;

/// FADT flags (§5.2.9 Table 5.10).
pub mod fadt_flags {
    pub const WBINVD: u32 = 1 << 0;
    pub const PWR_BUTTON: u32 = 1 << 4;
    pub const SLP_BUTTON: u32 = 1 << 5;
    pub const RESET_REG_SUP: u32 = 1 << 10;
    pub const FORCE_APIC_PHYSICAL_DESTINATION_MODE: u32 = 1 << 19;
    pub const HW_REDUCED_ACPI: u32 = 1 << 20;
}

/// IA-PC boot architecture flags (§5.2.9.3 Table 5.11).
pub mod iapc_boot_arch {
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    pub const I8042: u16 = 1 << 1;
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// FADT field offsets (§5.2.9 Table 5.9).
pub mod fadt_offset {
    pub const SCI_INT: usize = 46;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_REVISION: usize = 131;
    pub const X_DSDT: usize = 140;
    pub const HYPERVISOR_VENDOR_ID: usize = 268;
}

/// One processor Linux may ever hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtCpu {
    /// The local APIC ID Linux sees (and addresses IPIs to).
    pub apic_id: u32,
    /// Linux holds this core from boot.
    pub initial: bool,
}

/// How the cores that Linux does not hold at boot are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CpuHotplug {
    /// Every core is *Enabled*, the initial ones first, and the caller adds
    /// `maxcpus=<initial count>` to the command line (see `super::prepare`). Linux
    /// counts all of them *present*, starts only the first `maxcpus` at boot, and the
    /// rest can be started at any time through `/sys/devices/system/cpu/cpuN/online`
    /// (Documentation/core-api/cpu_hotplug.rst, "maxcpus=n").
    #[default]
    AllEnabled,
    /// The initial cores *Enabled*, the others only *Online Capable* (ACPI 6.3+). Linux
    /// 6.1 counts them *possible* but not *present* (`acpi_register_lapic` with
    /// `enabled == 0` only bumps `disabled_cpus`), so no `cpuN/online` file exists for
    /// them until ACPI hot-adds them: that needs a processor device in the namespace
    /// and a `Notify` through a GED or the SCI, which these HW-reduced tables do not
    /// provide. Kept for a later hot-add implementation.
    OnlineCapable,
}

/// The legacy PC devices Linux owns (FADT boot-architecture flags and DSDT devices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegacyDevices {
    pub com1: bool,
    pub cmos_rtc: bool,
    pub vga: bool,
    pub i8042: bool,
}

impl Default for LegacyDevices {
    fn default() -> Self {
        Self {
            com1: true,
            cmos_rtc: true,
            vga: false,
            i8042: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicConfig {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

impl Default for IoApicConfig {
    fn default() -> Self {
        Self {
            id: 0,
            address: 0xfec0_0000,
            gsi_base: 0,
        }
    }
}

/// An I/O-port reset register for the FADT (`RESET_REG`, §4.8.3.6): OSPM resets the
/// platform by writing `value` to `port` (§4.8.3.6, "Reset Register"). The hypervisor
/// intercepts it (the port is not the guest's, so every access exits) and stops the guest
/// that writes it ([`ResetRegister::resets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRegister {
    pub port: u16,
    pub value: u8,
}

/// The reset register Linux is offered: the PC chipsets' reset control register, I/O port
/// 0xcf9, where bit 1 asks for a full reset and bit 2 starts it, so 0x06 resets. Linux's own
/// `reboot=pci` writes the same register (0x0e or all ones after reading 0xff), which
/// [`ResetRegister::resets`] takes as a reset too.
pub const RESET_REGISTER: ResetRegister = ResetRegister {
    port: 0xcf9,
    value: 0x06,
};

impl ResetRegister {
    /// Whether a write of `size` bytes of `value` to `port` resets: a byte written to the
    /// register that sets every bit of the reset value.
    pub fn resets(&self, port: u16, size: u8, value: u64) -> bool {
        port == self.port && size == 1 && value as u8 & self.value == self.value
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig<'a> {
    pub cpus: &'a [MadtCpu],
    /// `Some` when Linux owns the IOAPIC.
    pub ioapic: Option<IoApicConfig>,
    pub legacy: LegacyDevices,
    pub hotplug: CpuHotplug,
    pub physical_apic_destination: bool,
    pub reset: Option<ResetRegister>,
    /// `Some(gsi)`: the DSDT declares the virtual PCI bus (`crate::pci`) as a root bridge
    /// whose slot-1 device (the doorbell) interrupts on `gsi` (it needs the IOAPIC too).
    pub pci_doorbell_gsi: Option<u8>,
}

impl<'a> AcpiConfig<'a> {
    pub fn new(cpus: &'a [MadtCpu]) -> Self {
        Self {
            cpus,
            ioapic: Some(IoApicConfig::default()),
            legacy: LegacyDevices::default(),
            hotplug: CpuHotplug::default(),
            physical_apic_destination: true,
            reset: Some(RESET_REGISTER),
            pci_doorbell_gsi: Some(crate::pci::DOORBELL_IRQ),
        }
    }

    /// The doorbell's GSI when the DSDT has a PCI root for it.
    fn pci_root(&self) -> Option<u8> {
        self.ioapic.and(self.pci_doorbell_gsi)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    NoCpus,
    NoInitialCpu,
    TooManyCpus {
        count: usize,
    },
    DuplicateApicId(u32),
    /// 0xff (xAPIC) and 0xffffffff (x2APIC) mean "invalid" / "all processors".
    InvalidApicId(u32),
    BufferTooSmall {
        needed: usize,
        len: usize,
    },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCpus => f.write_str("ACPI: the Linux guest has no core to list in the MADT"),
            Self::NoInitialCpu => f.write_str("ACPI: the Linux guest has no initial core"),
            Self::TooManyCpus { count } => write!(
                f,
                "ACPI: {count} cores is more than the {MAX_CPUS} the MADT builder supports"
            ),
            Self::DuplicateApicId(id) => write!(f, "ACPI: APIC ID {id} is listed twice"),
            Self::InvalidApicId(id) => write!(f, "ACPI: APIC ID {id:#x} is reserved"),
            Self::BufferTooSmall { needed, len } => {
                write!(
                    f,
                    "ACPI: the tables need {needed} bytes, the area has {len}"
                )
            }
        }
    }
}

pub const MAX_CPUS: usize = 64;

/// Where each table is, as offsets from the area's base, and the total size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Guest-physical address of the area (and of the RSDP, which comes first).
    pub base: u64,
    pub rsdp: (usize, usize),
    pub xsdt: (usize, usize),
    pub fadt: (usize, usize),
    pub madt: (usize, usize),
    pub dsdt: (usize, usize),
    /// Bytes used from the base.
    pub size: usize,
}

impl AcpiLayout {
    pub fn rsdp_address(&self) -> u64 {
        self.base + self.rsdp.0 as u64
    }
}

const fn align16(x: usize) -> usize {
    (x + 15) & !15
}

fn madt_len(config: &AcpiConfig) -> usize {
    let mut len = MADT_FIXED_LEN;
    let (mut xapic, mut x2apic) = (false, false);
    for cpu in config.cpus {
        if cpu.apic_id < 0xff {
            len += 8;
            xapic = true;
        } else {
            len += 16;
            x2apic = true;
        }
    }
    if xapic {
        len += 6;
    }
    if x2apic {
        len += 12;
    }
    if config.ioapic.is_some() {
        len += 12 + 2 * 10;
    }
    len
}

/// The table offsets for `config` (they depend on the number of cores and the DSDT).
pub fn layout(base: u64, config: &AcpiConfig) -> AcpiLayout {
    let rsdp = (0, RSDP_LEN);
    let xsdt = (align16(rsdp.1), HEADER_LEN + 8 * XSDT_ENTRIES);
    let fadt = (align16(xsdt.0 + xsdt.1), FADT_LEN);
    let madt = (align16(fadt.0 + fadt.1), madt_len(config));
    let dsdt = (
        align16(madt.0 + madt.1),
        dsdt(&config.legacy, config.pci_root()).len(),
    );
    AcpiLayout {
        base,
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
        size: dsdt.0 + dsdt.1,
    }
}

/// The most bytes [`build`] can need (64 cores, every device): a page.
pub const MAX_SIZE: usize = 4096;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Writes the common SDT header (§5.2.6 Table 5.4) except the checksum.
fn header(t: &mut [u8], signature: &[u8; 4], revision: u8, table_id: &[u8; 8]) {
    let len = t.len() as u32;
    t[0..4].copy_from_slice(signature);
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(OEM_ID);
    t[16..24].copy_from_slice(table_id);
    t[24..28].copy_from_slice(&OEM_REVISION.to_le_bytes());
    t[28..32].copy_from_slice(CREATOR_ID);
    t[32..36].copy_from_slice(&CREATOR_REVISION.to_le_bytes());
}

fn seal(t: &mut [u8]) {
    t[9] = 0;
    t[9] = checksum(t);
}

fn put(t: &mut [u8], at: usize, bytes: &[u8]) {
    t[at..at + bytes.len()].copy_from_slice(bytes);
}

fn check(config: &AcpiConfig) -> Result<(), AcpiError> {
    let cpus = config.cpus;
    if cpus.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    if cpus.len() > MAX_CPUS {
        return Err(AcpiError::TooManyCpus { count: cpus.len() });
    }
    if !cpus.iter().any(|c| c.initial) {
        return Err(AcpiError::NoInitialCpu);
    }
    for (i, cpu) in cpus.iter().enumerate() {
        if cpu.apic_id == 0xff || cpu.apic_id == u32::MAX {
            return Err(AcpiError::InvalidApicId(cpu.apic_id));
        }
        if cpus[..i].iter().any(|c| c.apic_id == cpu.apic_id) {
            return Err(AcpiError::DuplicateApicId(cpu.apic_id));
        }
    }
    Ok(())
}

/// Builds the tables into `buf`, which the guest will see at guest-physical `base`.
/// The initial cores are listed first (Linux numbers the others after them, and
/// `maxcpus=` starts the first ones), each group in the caller's order; processor UIDs
/// are the position in that order.
pub fn build(buf: &mut [u8], base: u64, config: &AcpiConfig) -> Result<AcpiLayout, AcpiError> {
    check(config)?;
    let l = layout(base, config);
    if buf.len() < l.size {
        return Err(AcpiError::BufferTooSmall {
            needed: l.size,
            len: buf.len(),
        });
    }
    buf[..l.size].fill(0);
    let at = |(offset, _): (usize, usize)| base + offset as u64;

    // RSDP (§5.2.5.3 Table 5.3): revision 2, 36 bytes, XSDT address, two checksums.
    {
        let r = &mut buf[l.rsdp.0..l.rsdp.0 + l.rsdp.1];
        put(r, 0, RSDP_SIGNATURE);
        put(r, 9, OEM_ID);
        r[15] = 2;
        // RsdtAddress (16) stays 0: revision 2 OSPMs use the XSDT.
        put(r, 20, &(RSDP_LEN as u32).to_le_bytes());
        put(r, 24, &at(l.xsdt).to_le_bytes());
        r[8] = checksum(&r[..20]);
        r[32] = checksum(r);
    }
    // XSDT (§5.2.8): FADT, MADT.
    {
        let t = &mut buf[l.xsdt.0..l.xsdt.0 + l.xsdt.1];
        header(t, b"XSDT", 1, b"TANDEMXS");
        put(t, HEADER_LEN, &at(l.fadt).to_le_bytes());
        put(t, HEADER_LEN + 8, &at(l.madt).to_le_bytes());
        seal(t);
    }
    write_fadt(&mut buf[l.fadt.0..l.fadt.0 + l.fadt.1], at(l.dsdt), config);
    write_madt(&mut buf[l.madt.0..l.madt.0 + l.madt.1], config);
    {
        let t = &mut buf[l.dsdt.0..l.dsdt.0 + l.dsdt.1];
        t.copy_from_slice(&dsdt(&config.legacy, config.pci_root()));
        seal(t);
    }
    Ok(l)
}

/// FADT revision 6 (§5.2.9 Table 5.9). Fields for fixed hardware stay zero: OSPM
/// ignores offsets 46..=108 and 148..=232 on HW-reduced platforms (§5.2.9, after Table
/// 5.9), and FIRMWARE_CTRL/X_FIRMWARE_CTRL are 0 because HW-reduced needs no FACS
/// (§5.2.10). The DSDT is given by X_DSDT only ("if X_DSDT is non-zero, DSDT must be
/// zero").
fn write_fadt(t: &mut [u8], dsdt: u64, config: &AcpiConfig) {
    use fadt_flags::*;
    use iapc_boot_arch::*;
    header(t, b"FACP", FADT_REVISION, b"TANDEMFA");
    // SCI_INT: ignored on HW-reduced; 9 keeps it consistent with the IRQ9 override
    // (a 0 here would make Linux treat the IRQ0 override as the SCI's).
    put(t, fadt_offset::SCI_INT, &9u16.to_le_bytes());
    let legacy = &config.legacy;
    let mut boot_arch = 0u16;
    if legacy.com1 || legacy.cmos_rtc || legacy.i8042 {
        boot_arch |= LEGACY_DEVICES;
    }
    if legacy.i8042 {
        boot_arch |= I8042;
    }
    if !legacy.vga {
        boot_arch |= VGA_NOT_PRESENT;
    }
    if !legacy.cmos_rtc {
        boot_arch |= CMOS_RTC_NOT_PRESENT;
    }
    put(t, fadt_offset::IAPC_BOOT_ARCH, &boot_arch.to_le_bytes());
    let mut flags = WBINVD | PWR_BUTTON | SLP_BUTTON | HW_REDUCED_ACPI;
    if config.physical_apic_destination {
        flags |= FORCE_APIC_PHYSICAL_DESTINATION_MODE;
    }
    if let Some(reset) = config.reset {
        flags |= RESET_REG_SUP;
        // Generic Address Structure (§5.2.3.2): System I/O, 8 bits, byte access.
        put(t, fadt_offset::RESET_REG, &[1, 8, 0, 1]);
        put(
            t,
            fadt_offset::RESET_REG + 4,
            &(reset.port as u64).to_le_bytes(),
        );
        t[fadt_offset::RESET_VALUE] = reset.value;
    }
    put(t, fadt_offset::FLAGS, &flags.to_le_bytes());
    t[fadt_offset::MINOR_REVISION] = FADT_MINOR_REVISION;
    put(t, fadt_offset::X_DSDT, &dsdt.to_le_bytes());
    put(t, fadt_offset::HYPERVISOR_VENDOR_ID, b"TandemHV");
    seal(t);
}

/// MADT (§5.2.12): header + Local Interrupt Controller Address + flags, then the
/// interrupt controller structures.
fn write_madt(t: &mut [u8], config: &AcpiConfig) {
    header(t, b"APIC", MADT_REVISION, b"TANDEMAP");
    put(t, HEADER_LEN, &LOCAL_APIC_ADDRESS.to_le_bytes());
    // Flags: PCAT_COMPAT clear, Linux gets no 8259 on a HW-reduced platform.
    let mut at = MADT_FIXED_LEN;
    let mut entry = |t: &mut [u8], bytes: &[u8]| {
        put(t, at, bytes);
        at += bytes.len();
    };
    let ordered = config
        .cpus
        .iter()
        .filter(|c| c.initial)
        .chain(config.cpus.iter().filter(|c| !c.initial));
    let (mut xapic, mut x2apic) = (false, false);
    for (uid, cpu) in ordered.enumerate() {
        let flags = match (cpu.initial, config.hotplug) {
            (true, _) | (false, CpuHotplug::AllEnabled) => MADT_ENABLED,
            (false, CpuHotplug::OnlineCapable) => MADT_ONLINE_CAPABLE,
        };
        if cpu.apic_id < 0xff {
            // Processor Local APIC (§5.2.12.2 Table 5.22): type 0, length 8.
            let mut e = [0u8; 8];
            e[0] = 0;
            e[1] = 8;
            e[2] = uid as u8;
            e[3] = cpu.apic_id as u8;
            e[4..8].copy_from_slice(&flags.to_le_bytes());
            entry(t, &e);
            xapic = true;
        } else {
            // Processor Local x2APIC (§5.2.12.12 Table 5.37): type 9, length 16.
            let mut e = [0u8; 16];
            e[0] = 9;
            e[1] = 16;
            e[4..8].copy_from_slice(&cpu.apic_id.to_le_bytes());
            e[8..12].copy_from_slice(&flags.to_le_bytes());
            e[12..16].copy_from_slice(&(uid as u32).to_le_bytes());
            entry(t, &e);
            x2apic = true;
        }
    }
    if let Some(io) = config.ioapic {
        // I/O APIC (§5.2.12.3 Table 5.24): type 1, length 12.
        let mut e = [0u8; 12];
        e[0] = 1;
        e[1] = 12;
        e[2] = io.id;
        e[4..8].copy_from_slice(&io.address.to_le_bytes());
        e[8..12].copy_from_slice(&io.gsi_base.to_le_bytes());
        entry(t, &e);
        // Interrupt Source Overrides (§5.2.12.5 Table 5.25): type 2, length 10, bus 0
        // (ISA). The PIT's IRQ0 is wired to IOAPIC pin 2; the SCI line IRQ9 is level,
        // active high, as PC firmware describes them.
        for (irq, gsi, flags) in [
            (0u8, 2u32, INTI_EDGE | INTI_ACTIVE_HIGH),
            (9, 9, INTI_LEVEL | INTI_ACTIVE_HIGH),
        ] {
            let mut e = [0u8; 10];
            e[0] = 2;
            e[1] = 10;
            e[3] = irq;
            e[4..8].copy_from_slice(&(io.gsi_base + gsi).to_le_bytes());
            e[8..10].copy_from_slice(&flags.to_le_bytes());
            entry(t, &e);
        }
    }
    // Local APIC NMI (§5.2.12.7 Table 5.29, type 4) and Local x2APIC NMI (§5.2.12.13
    // Table 5.38, type 0xa): LINT1 of all processors (UID 0xff / 0xffffffff), edge,
    // active high.
    let nmi_flags = INTI_EDGE | INTI_ACTIVE_HIGH;
    if xapic {
        let f = nmi_flags.to_le_bytes();
        entry(t, &[4, 6, 0xff, f[0], f[1], 1]);
    }
    if x2apic {
        let mut e = [0u8; 12];
        e[0] = 0xa;
        e[1] = 12;
        e[2..4].copy_from_slice(&nmi_flags.to_le_bytes());
        e[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        e[8] = 1;
        entry(t, &e);
    }
    seal(t);
}

type Aml = Vec<u8, 256>;

/// AML PkgLength (§20.2.4): the length includes the PkgLength bytes themselves.
fn pkg_length(out: &mut Aml, contents: usize) {
    let total1 = contents + 1;
    let total2 = contents + 2;
    if total1 < 0x40 {
        let _ = out.push(total1 as u8);
    } else {
        // Two bytes cover up to 4095, far more than these small blocks use.
        let _ = out.push(0x40 | (total2 & 0xf) as u8);
        let _ = out.push((total2 >> 4) as u8);
    }
}

fn extend(out: &mut Aml, bytes: &[u8]) {
    let _ = out.extend_from_slice(bytes);
}

/// `Name(NAME, value)` with an integer as the smallest constant (§20.2.3).
fn name_integer(out: &mut Aml, name: &[u8; 4], value: u32) {
    extend(out, &[0x08]);
    extend(out, name);
    match value {
        0 => extend(out, &[0x00]),
        1 => extend(out, &[0x01]),
        2..=0xff => extend(out, &[0x0a, value as u8]),
        _ => {
            extend(out, &[0x0c]);
            extend(out, &value.to_le_bytes());
        }
    }
}

/// `EisaId("PNPxxxx")` as the compressed 32-bit ID (§19.6.35): three 5-bit letters and
/// four hex digits, stored big-endian.
const fn eisa_id(id: &[u8; 7]) -> u32 {
    const fn hex(c: u8) -> u32 {
        (if c <= b'9' { c - b'0' } else { c - b'A' + 10 }) as u32
    }
    let vendor =
        ((id[0] - 0x40) as u32) << 10 | ((id[1] - 0x40) as u32) << 5 | (id[2] - 0x40) as u32;
    let product = hex(id[3]) << 12 | hex(id[4]) << 8 | hex(id[5]) << 4 | hex(id[6]);
    (vendor << 16 | product).swap_bytes()
}

/// `Name(_CRS, Buffer() { resources })`: a resource template (§6.4.2) of fewer than 256 bytes.
fn name_resources(out: &mut Aml, resources: &[u8]) {
    extend(out, &[0x08]);
    extend(out, b"_CRS");
    extend(out, &[0x11]); // BufferOp
    pkg_length(out, 2 + resources.len());
    extend(out, &[0x0a, resources.len() as u8]);
    extend(out, resources);
}

/// `Device(NAME) { _HID, [_UID], _CRS: IO(Decode16, port, port, 1, len), IRQNoFlags(){irq} }`.
fn legacy_device(
    out: &mut Aml,
    name: &[u8; 4],
    hid: &[u8; 7],
    uid: Option<u32>,
    port: u16,
    len: u8,
    irq: u8,
) {
    let mut body = Aml::new();
    name_integer(&mut body, b"_HID", eisa_id(hid));
    if let Some(uid) = uid {
        name_integer(&mut body, b"_UID", uid);
    }
    // Resource template (§6.4.2): I/O port descriptor (§6.4.2.5, 8 bytes), IRQ
    // descriptor without flags (§6.4.2.1, 3 bytes: edge, active high), end tag
    // (§6.4.2.9, checksum 0 = "treat as valid").
    let p = port.to_le_bytes();
    let mask = (1u16 << irq).to_le_bytes();
    let resources = [
        0x47, 0x01, p[0], p[1], p[0], p[1], 0x01, len, 0x22, mask[0], mask[1], 0x79, 0x00,
    ];
    name_resources(&mut body, &resources);

    extend(out, &[0x5b, 0x82]); // DeviceOp
    pkg_length(out, 4 + body.len());
    extend(out, name);
    extend(out, &body);
}

/// `Device(PCI0)`: the virtual PCI bus (`crate::pci`) as a PCI host bridge (`PNP0A03`),
/// so that Linux scans it: with ACPI, Linux enumerates PCI only from root bridges the
/// namespace declares.
/// * `_CRS`: bus 0 only (a WordBusNumber producer, §6.4.3.5.3: general flags MinFixed |
///   MaxFixed, granularity 0, 0..0, translation 0, length 1); Linux calls a root bridge
///   without a bus range a firmware bug. No I/O or memory window: no device has a BAR.
/// * `_PRT` (§6.2.13): slot 1 (`0x0001FFFF`: any function), pin INTA (0), no link device
///   (source 0), so its interrupt is GSI `gsi`, level-triggered and active low as PCI
///   interrupts are (Linux programs that IOAPIC pin; the hypervisor raises it).
fn pci_root(out: &mut Aml, gsi: u8) {
    let mut body = Aml::new();
    name_integer(&mut body, b"_HID", eisa_id(b"PNP0A03"));
    let bus_range = [
        0x88, 0x0d, 0x00, // Word Address Space Descriptor, 13 bytes follow
        0x02, // resource type: bus number range
        0x0c, // general flags: MinFixed, MaxFixed, positive decode, producer
        0x00, // type-specific flags
        0x00, 0x00, // granularity
        0x00, 0x00, // minimum: bus 0
        0x00, 0x00, // maximum: bus 0
        0x00, 0x00, // translation offset
        0x01, 0x00, // length: one bus
        0x79, 0x00, // end tag
    ];
    name_resources(&mut body, &bus_range);
    // Package(4) { 0x0001FFFF, Zero, Zero, gsi }
    let mut entry = Aml::new();
    extend(
        &mut entry,
        &[0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, gsi],
    );
    let mut routes = Aml::new();
    extend(&mut routes, &[0x01, 0x12]); // one element, PackageOp
    pkg_length(&mut routes, entry.len());
    extend(&mut routes, &entry);
    extend(&mut body, &[0x08]);
    extend(&mut body, b"_PRT");
    extend(&mut body, &[0x12]); // PackageOp
    pkg_length(&mut body, routes.len());
    extend(&mut body, &routes);

    extend(out, &[0x5b, 0x82]); // DeviceOp
    pkg_length(out, 4 + body.len());
    extend(out, b"PCI0");
    extend(out, &body);
}

/// The DSDT (§5.2.11.1) with its checksum still to compute: header + AML
/// `Scope(\_SB) { Device(COM1) {...} Device(RTC) {...} Device(PCI0) {...} }`.
fn dsdt(legacy: &LegacyDevices, pci_doorbell_gsi: Option<u8>) -> Vec<u8, 512> {
    let mut devices = Aml::new();
    if legacy.com1 {
        legacy_device(&mut devices, b"COM1", b"PNP0501", Some(1), 0x3f8, 8, 4);
    }
    if legacy.cmos_rtc {
        legacy_device(&mut devices, b"RTC_", b"PNP0B00", None, 0x70, 2, 8);
    }
    if let Some(gsi) = pci_doorbell_gsi {
        pci_root(&mut devices, gsi);
    }
    let mut aml = Aml::new();
    if !devices.is_empty() {
        extend(&mut aml, &[0x10]); // ScopeOp
        pkg_length(&mut aml, 5 + devices.len());
        extend(&mut aml, b"\\_SB_");
        extend(&mut aml, &devices);
    }
    let mut table: Vec<u8, 512> = Vec::new();
    let _ = table.resize(HEADER_LEN + aml.len(), 0);
    // Revision 2: integers are 64 bits (§5.2.11.1).
    header(&mut table, b"DSDT", 2, b"TANDEMDS");
    table[HEADER_LEN..].copy_from_slice(&aml);
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi::fadt::Fadt;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
    use core::ptr::NonNull;
    use std::vec::Vec as StdVec;

    const BASE: u64 = 0x7fe_0000;

    /// Maps "guest-physical" addresses onto a byte buffer at `BASE`.
    #[derive(Clone)]
    struct BufferHandler {
        start: *const u8,
        len: usize,
    }

    impl AcpiHandler for BufferHandler {
        unsafe fn map_physical_region<T>(
            &self,
            physical_address: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            let offset = physical_address - BASE as usize;
            assert!(offset + size <= self.len, "mapping outside the tables");
            // SAFETY: the range was just checked to lie inside the buffer, which
            // outlives the `AcpiTables` in every test; the tables are only read.
            unsafe {
                PhysicalMapping::new(
                    physical_address,
                    NonNull::new(self.start.add(offset) as *mut T).unwrap(),
                    size,
                    size,
                    self.clone(),
                )
            }
        }
        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn tables(buf: &[u8], layout: &AcpiLayout) -> AcpiTables<BufferHandler> {
        let handler = BufferHandler {
            start: buf.as_ptr(),
            len: buf.len(),
        };
        // SAFETY: the address is the RSDP's inside `buf` (see `BufferHandler`).
        unsafe { AcpiTables::from_rsdp(handler, layout.rsdp_address() as usize).unwrap() }
    }

    fn cpus(list: &[(u32, bool)]) -> StdVec<MadtCpu> {
        list.iter()
            .map(|&(apic_id, initial)| MadtCpu { apic_id, initial })
            .collect()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn eisa_ids_match_the_well_known_values() {
        assert_eq!(eisa_id(b"PNP0501"), 0x0105_d041);
        assert_eq!(eisa_id(b"PNP0B00"), 0x000b_d041);
    }

    #[test]
    fn tables_parse_back_with_the_acpi_crate() {
        let list = cpus(&[(2, false), (0, true), (1, true), (3, false)]);
        let config = AcpiConfig::new(&list);
        let mut buf = [0xccu8; MAX_SIZE];
        let l = build(&mut buf, BASE, &config).unwrap();
        assert!(l.size <= MAX_SIZE);
        // Every checksum, by hand.
        assert_eq!(sum(&buf[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&buf[..36]), 0, "RSDP extended checksum");
        for (o, n) in [l.xsdt, l.fadt, l.madt, l.dsdt] {
            assert_eq!(sum(&buf[o..o + n]), 0);
            assert_eq!(
                u32::from_le_bytes(buf[o + 4..o + 8].try_into().unwrap()) as usize,
                n
            );
        }
        let t = tables(&buf, &l);
        assert_eq!(t.revision(), 2);
        let sigs: StdVec<_> = t
            .headers()
            .map(|h| std::string::String::from(h.signature.as_str()))
            .collect();
        assert_eq!(sigs, ["FACP", "APIC"]);

        let fadt = t.find_table::<Fadt>().unwrap();
        assert_eq!({ fadt.header().revision }, 6);
        assert_eq!({ fadt.header().length } as usize, FADT_LEN);
        assert!({ fadt.flags }.system_is_hw_reduced_acpi());
        assert!({ fadt.flags }.local_xapics_must_use_physical_destination_mode());
        assert!({ fadt.flags }.power_button_is_control_method());
        assert!({ fadt.flags }.supports_system_reset_via_fadt());
        let reset = fadt.reset_register().unwrap();
        assert_eq!((reset.address, { fadt.reset_value }), (0xcf9, 6));
        assert!({ fadt.iapc_boot_arch }.dont_probe_vga());
        assert!(!{ fadt.iapc_boot_arch }.motherboard_implements_8042());
        assert!({ fadt.iapc_boot_arch }.legacy_devices_are_accessible());
        assert_eq!(
            buf[l.fadt.0 + fadt_offset::IAPC_BOOT_ARCH] & 0x20,
            0,
            "RTC present"
        );
        assert_eq!(buf[l.fadt.0 + fadt_offset::MINOR_REVISION], 5);
        assert_eq!(fadt.dsdt_address().unwrap() as u64, BASE + l.dsdt.0 as u64);
        assert!(fadt.facs_address().is_err(), "no FACS on HW-reduced");
        assert_eq!(fadt.pm_timer_block().unwrap(), None);
        assert_eq!({ fadt.smi_cmd_port }, 0);
        assert_eq!(
            &buf[l.fadt.0 + 40..l.fadt.0 + 44],
            &[0; 4],
            "32-bit DSDT is 0"
        );

        let dsdt = t.dsdt().unwrap();
        assert_eq!(dsdt.address as u64, BASE + (l.dsdt.0 + 36) as u64);
        assert_eq!(dsdt.length as usize, l.dsdt.1 - 36);

        let madt = t.find_table::<Madt>().unwrap();
        assert_eq!(madt.get().header.revision, 5);
        assert_eq!({ madt.get().local_apic_address }, 0xfee0_0000);
        assert!(!madt.get().supports_8259());
        let mut lapics = StdVec::new();
        let mut overrides = StdVec::new();
        let (mut ioapics, mut nmis) = (0, 0);
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(e) => lapics.push((e.processor_id, e.apic_id, { e.flags })),
                MadtEntry::IoApic(e) => {
                    ioapics += 1;
                    assert_eq!({ e.io_apic_address }, 0xfec0_0000);
                    assert_eq!({ e.global_system_interrupt_base }, 0);
                }
                MadtEntry::InterruptSourceOverride(e) => {
                    overrides.push((e.bus, e.irq, { e.global_system_interrupt }, { e.flags }))
                }
                MadtEntry::LocalApicNmi(e) => {
                    nmis += 1;
                    assert_eq!((e.processor_id, { e.flags }, e.nmi_line), (0xff, 5, 1));
                }
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        // Initial cores first, then the rest; all Enabled (CpuHotplug::AllEnabled).
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(overrides, [(0, 0, 2, 0b0101), (0, 9, 9, 0b1101)]);
        assert_eq!((ioapics, nmis), (1, 1));
    }

    #[test]
    fn online_capable_x2apic_and_no_ioapic() {
        let list = cpus(&[(0, true), (300, true), (5, false), (0x1_0000, false)]);
        let mut config = AcpiConfig::new(&list);
        config.hotplug = CpuHotplug::OnlineCapable;
        config.ioapic = None;
        config.legacy = LegacyDevices {
            com1: false,
            cmos_rtc: false,
            vga: true,
            i8042: true,
        };
        config.physical_apic_destination = false;
        config.reset = None;
        let mut buf = [0u8; MAX_SIZE];
        let l = build(&mut buf, BASE, &config).unwrap();
        let t = tables(&buf, &l);
        let fadt = t.find_table::<Fadt>().unwrap();
        assert!(!{ fadt.flags }.local_xapics_must_use_physical_destination_mode());
        assert!(!{ fadt.flags }.supports_system_reset_via_fadt());
        assert!(!{ fadt.iapc_boot_arch }.dont_probe_vga());
        assert!({ fadt.iapc_boot_arch }.motherboard_implements_8042());
        assert_ne!(
            buf[l.fadt.0 + fadt_offset::IAPC_BOOT_ARCH] & 0x20,
            0,
            "no RTC"
        );
        assert_eq!(l.dsdt.1, 36, "no devices: header only");
        let madt = t.find_table::<Madt>().unwrap();
        let mut seen = StdVec::new();
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(e) => {
                    seen.push((0, { e.processor_id } as u32, e.apic_id as u32, { e.flags }))
                }
                MadtEntry::LocalX2Apic(e) => {
                    seen.push((9, { e.processor_uid }, { e.x2apic_id }, { e.flags }))
                }
                MadtEntry::LocalApicNmi(e) => assert_eq!(e.processor_id, 0xff),
                MadtEntry::X2ApicNmi(e) => {
                    assert_eq!(({ e.processor_uid }, e.nmi_line), (u32::MAX, 1))
                }
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                (0, 0, 0, 1),
                (9, 1, 300, 1),
                (0, 2, 5, 2),
                (9, 3, 0x1_0000, 2)
            ]
        );
    }

    /// AML PkgLength at `at`: (length it encodes, bytes it takes).
    fn read_pkg_length(aml: &[u8], at: usize) -> (usize, usize) {
        let lead = aml[at];
        let follow = usize::from(lead >> 6);
        let mut len = usize::from(if follow == 0 {
            lead & 0x3f
        } else {
            lead & 0x0f
        });
        for i in 0..follow {
            len |= usize::from(aml[at + 1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    #[test]
    fn the_dsdt_declares_the_virtual_pci_root_and_its_doorbell_route() {
        let d = dsdt(&LegacyDevices::default(), Some(10));
        let aml = &d[HEADER_LEN..];
        let (scope_len, _) = read_pkg_length(aml, 1);
        assert_eq!(scope_len, aml.len() - 1, "the scope covers every device");
        let at = aml.windows(4).position(|w| w == b"PCI0").expect("no PCI0");
        // DeviceOp, PkgLength, name: the device ends where the block does (the last one).
        let op = (at - 4..at - 2)
            .find(|&op| aml[op..op + 2] == [0x5b, 0x82])
            .expect("no DeviceOp before PCI0");
        let (device_len, n2) = read_pkg_length(aml, op + 2);
        assert_eq!(op + 2 + n2, at);
        assert_eq!(op + 2 + device_len, aml.len());
        let device = &aml[at + 4..];
        // _HID EisaId("PNP0A03").
        assert_eq!(
            &device[..10],
            &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]
        );
        // _CRS: bus 0..0 only, then the end tag.
        let crs = &device[10..];
        assert_eq!(crs[0], 0x08, "NameOp");
        assert_eq!(&crs[1..5], b"_CRS");
        let descriptor = &crs[9..];
        assert_eq!(&descriptor[..5], &[0x88, 0x0d, 0x00, 0x02, 0x0c]);
        assert_eq!(&descriptor[8..16], &[0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&descriptor[16..18], &[0x79, 0x00]);
        // _PRT: one route, slot 1 any function, INTA, no link, GSI 10.
        let prt = &descriptor[18..];
        assert_eq!(&prt[1..5], b"_PRT");
        assert_eq!(prt[5], 0x12);
        let (routes_len, m) = read_pkg_length(prt, 6);
        assert_eq!(
            6 + routes_len,
            prt.len(),
            "_PRT is the device's last object"
        );
        let routes = &prt[6 + m..];
        assert_eq!(routes[0], 1, "one route");
        assert_eq!(routes[1], 0x12);
        let entry = &routes[3..];
        assert_eq!(
            entry,
            &[0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 10]
        );
        assert_eq!(usize::from(routes[2]), 1 + entry.len());
        // Without the doorbell the DSDT is as before.
        assert!(!dsdt(&LegacyDevices::default(), None)
            .windows(4)
            .any(|w| w == b"PCI0"));
    }

    #[test]
    fn dsdt_aml_is_well_formed() {
        let d = dsdt(&LegacyDevices::default(), None);
        let aml = &d[HEADER_LEN..];
        // Scope(\_SB_) whose PkgLength covers the rest of the block exactly.
        assert_eq!(aml[0], 0x10);
        let (len, n) = if aml[1] & 0xc0 == 0 {
            (aml[1] as usize, 1)
        } else {
            ((aml[1] & 0xf) as usize | (aml[2] as usize) << 4, 2)
        };
        assert_eq!(n, 2, "two devices need a two-byte PkgLength");
        assert_eq!(len, aml.len() - 1);
        assert_eq!(&aml[1 + n..1 + n + 5], b"\\_SB_");
        let devices = &aml[1 + n + 5..];
        assert_eq!(&devices[..2], &[0x5b, 0x82]);
        let com1_len = devices[2] as usize;
        assert_eq!(&devices[3..7], b"COM1");
        assert_eq!(&devices[7..12], &[0x08, b'_', b'H', b'I', b'D']);
        assert_eq!(&devices[12..17], &[0x0c, 0x41, 0xd0, 0x05, 0x01]);
        let rtc = &devices[2 + com1_len..];
        assert_eq!(&rtc[..2], &[0x5b, 0x82]);
        assert_eq!(&rtc[3..7], b"RTC_");
        assert_eq!(2 + rtc[2] as usize, rtc.len(), "RTC is the last object");
        // COM1 _CRS: IO 0x3f8 len 8, IRQ 4.
        let crs = devices
            .windows(4)
            .position(|w| w == b"_CRS")
            .map(|p| &devices[p + 4..])
            .unwrap();
        assert_eq!(&crs[..4], &[0x11, 0x10, 0x0a, 13]);
        assert_eq!(
            &crs[4..17],
            &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0, 0x79, 0]
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut buf = [0u8; MAX_SIZE];
        let build_with = |list: &[(u32, bool)], buf: &mut [u8]| {
            let list = cpus(list);
            build(buf, BASE, &AcpiConfig::new(&list))
        };
        assert_eq!(build_with(&[], &mut buf), Err(AcpiError::NoCpus));
        assert_eq!(
            build_with(&[(1, false)], &mut buf),
            Err(AcpiError::NoInitialCpu)
        );
        assert_eq!(
            build_with(&[(1, true), (1, false)], &mut buf),
            Err(AcpiError::DuplicateApicId(1))
        );
        assert_eq!(
            build_with(&[(0xff, true)], &mut buf),
            Err(AcpiError::InvalidApicId(0xff))
        );
        let many: StdVec<_> = (0..65).map(|i| (i, true)).collect();
        assert_eq!(
            build_with(&many, &mut buf),
            Err(AcpiError::TooManyCpus { count: 65 })
        );
        let sixty_four: StdVec<_> = (0..64).map(|i| (i * 300, i == 0)).collect();
        let l = build_with(&sixty_four, &mut buf).unwrap();
        assert!(l.size <= MAX_SIZE, "{:#x}", l.size);
        assert!(matches!(
            build_with(&[(0, true)], &mut buf[..100]),
            Err(AcpiError::BufferTooSmall { len: 100, .. })
        ));
    }

    #[test]
    fn writes_that_set_the_reset_value_reset() {
        let reset = RESET_REGISTER;
        // ACPI's write (reboot=acpi) and the last of Linux's reboot=pci writes.
        assert!(reset.resets(0xcf9, 1, 0x06));
        assert!(reset.resets(0xcf9, 1, 0x0e));
        assert!(reset.resets(0xcf9, 1, 0xff));
        assert!(reset.resets(0xcf9, 1, 0x1_06), "only the byte counts");
        // reboot=pci's first write (0xff read, bits 1-3 cleared, hard reset asked for) does
        // not start it; nor do other ports or sizes (a dword to 0xcf8, PCI's address port,
        // covers 0xcf9 and is configuration access, not a reset).
        assert!(!reset.resets(0xcf9, 1, 0xf3));
        assert!(!reset.resets(0xcf9, 1, 0x04));
        assert!(!reset.resets(0xcf8, 4, 0x8000_0000));
        assert!(!reset.resets(0xcf9, 2, 0x06));
        assert!(!reset.resets(0x64, 1, 0xfe));
    }
}
