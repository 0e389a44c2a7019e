//! The Lavender kernel (bare metal only). Boot sequence, in `kernel_main`:
//!
//! 1. descriptor tables (GDT with this core's TSS, IDT), so every fault from here on is reported;
//! 2. the boot-info page, read and validated, and the command line;
//! 3. the banner;
//! 4. memory: frame allocator over the `Usable` regions, the AP trampoline page, Lavender's own
//!    page tables, the kernel heap;
//! 5. the `Hello` round trip with the hypervisor;
//! 6. the isolation test, if the command line asks for it;
//! 7. time (TSC frequency, APIC timer calibration), the scheduler on the boot core, the control
//!    channel with the hypervisor (core grants and revokes, load reports), the delegation
//!    connections with Linux;
//! 8. the workload the command line names, as a user process;
//! 9. the boot core's idle loop, which runs threads and takes interrupts from here on.

mod arch;
mod console;
mod control;
mod delegation;
mod faults;
mod interrupts;
mod isolation;
mod jobs;
mod memory;
mod process;
mod sched;
mod smp;
mod sync;
mod syscall;
mod time;
mod trap;
mod workload;

use guest_lavender::cmdline::{self, Cmdline};
use guest_lavender::frames::FRAME_SIZE;
use log::{error, info, warn};
use spin::Once;
use vmcall_proto::bootinfo::BootInfo;
use vmcall_proto::hypercall::{hello_matches, HypercallFailure};
use vmcall_proto::{AbiVersion, ABI_VERSION};

/// The boot core uses core slot 0; cores added later take free slots (`core_events`).
const BOOT_CORE_SLOT: usize = 0;
/// Argument of the `Hello` round trip: "lavender" in ASCII.
const HELLO_ARGUMENT: u64 = u64::from_le_bytes(*b"lavender");
const MIB: u64 = 1 << 20;

/// The validated boot-info page, kept for the kernel's lifetime (shared regions, cores).
static BOOT_INFO: Once<BootInfo> = Once::new();

/// The Rust entry, called by `_start` (arch/entry.rs) on the boot core.
#[no_mangle]
extern "sysv64" fn kernel_main(boot_info_address: u64) -> ! {
    arch::gdt::load(BOOT_CORE_SLOT);
    arch::idt::load();
    arch::user::enable_syscall_on_boot_core();
    arch::user::init_core(BOOT_CORE_SLOT);
    console::init_logger(log::LevelFilter::Info);

    let boot_info = match arch::boot_info::read(boot_info_address) {
        Ok(page) => BOOT_INFO.call_once(|| page),
        Err(fault) => fatal(format_args!(
            "boot-info page at {boot_info_address:#x}: {fault}"
        )),
    };
    let cmdline = read_cmdline(boot_info.cmdline());
    control::print_load_markers(cmdline.load_markers);
    banner(boot_info);

    // Any local's address is on the boot stack, which must survive the page-table switch.
    let stack_probe = 0u8;
    let trampoline_page = match memory::init(boot_info, (&raw const stack_probe) as u64) {
        Ok(report) => {
            info!(
                "memory: page tables at {:#x} ({} x 2 MiB + {} x 4 KiB pages), heap {} MiB at {:#x}, {} free frames ({} MiB){}",
                report.page_table_root,
                report.large_pages,
                report.small_pages,
                report.heap_bytes as u64 / MIB,
                report.heap_start,
                report.free_frames,
                report.free_frames as u64 * FRAME_SIZE / MIB,
                if report.untracked_bytes > 0 { " (memory above 4 GiB ignored)" } else { "" },
            );
            report.trampoline_page
        }
        Err(problem) => fatal(format_args!("memory setup: {problem}")),
    };
    console::start_queueing();

    hello();
    if cmdline.leave_traces {
        isolation::leave_traces(boot_info);
    }
    if cmdline.check_inherited {
        smp::report_arrivals();
    }
    if let Some(plan) = cmdline.isolation {
        isolation::run(plan, boot_info);
    }

    start_scheduling(boot_info, trampoline_page, cmdline.tsc_khz);
    faults::arm(cmdline.ignore_revoke, cmdline.fault);
    delegation::init(boot_info);
    if cmdline.user_test {
        workload::start_hostile();
    }
    if let Some(plan) = cmdline.primes {
        workload::start_primes(plan);
    }
    if cmdline.idle {
        workload::start_idle();
    }
    console::marker("lavender_idle", |_| {});
    sched::idle_loop(BOOT_CORE_SLOT, |_| {})
}

/// Time, the boot core's scheduler and timer, AP bring-up and the control channel.
fn start_scheduling(boot_info: &BootInfo, trampoline_page: Option<u64>, tsc_khz: Option<u64>) {
    // Enabled before the timer is calibrated: a software-disabled APIC keeps its LVT entries
    // masked (Intel SDM Vol. 3A §11.4.7.2).
    smp::enable_apic(boot_info.boot_core());
    let (tsc_hz, source, apic_per_million) = time::init(tsc_khz);
    info!(
        "time: TSC {} kHz ({}), APIC timer {apic_per_million} ticks per 10^6 TSC ticks",
        tsc_hz / 1000,
        source.as_str()
    );
    console::marker("lavender_clock", |o| {
        o.u64("tsc_hz", tsc_hz)
            .str("source", source.as_str())
            .u64("apic_ticks_per_mtsc", apic_per_million);
    });
    match trampoline_page {
        Some(page) => smp::set_trampoline_page(page),
        None => warn!("no usable page below 1 MiB: granted cores cannot be started"),
    }
    smp::init_boot_core(
        boot_info.boot_core(),
        boot_info.cores_allowed().len() as usize,
    );
    control::init(
        boot_info,
        &[
            interrupts::TIMER_VECTOR,
            interrupts::RESCHEDULE_VECTOR,
            interrupts::SPURIOUS_VECTOR,
        ],
    );
    control::start_initial_cores(boot_info);
}

/// Parses the command line, reporting every ignored word, and applies the log level.
fn read_cmdline(text: &'static str) -> Cmdline {
    let cmdline = cmdline::parse(text, |problem| {
        warn!(
            "command line: ignored {:?}: {}",
            problem.word, problem.reason
        );
        console::marker("lavender_cmdline_ignored", |o| {
            o.str("word", problem.word)
                .display("reason", &problem.reason);
        });
    });
    log::set_max_level(cmdline.log_level);
    cmdline
}

fn banner(boot_info: &BootInfo) {
    let version = env!("CARGO_PKG_VERSION");
    let boot_core = boot_info.boot_core().index() as u64;
    let memory_mib = boot_info
        .memory_regions()
        .iter()
        .map(|region| region.size)
        .sum::<u64>()
        / MIB;
    let cores_allowed = boot_info.cores_allowed();
    info!(
        "Lavender {version} on core {boot_core}: {memory_mib} MiB, may hold cores {:#x} (starts with {:#x}), command line {:?}",
        cores_allowed.0,
        boot_info.cores_initial().0,
        boot_info.cmdline(),
    );
    console::marker("lavender_banner", |o| {
        o.str("version", version)
            .u64("boot_core", boot_core)
            .u64("memory_mib", memory_mib)
            .array("cores_allowed", |a| {
                for core in cores_allowed.iter() {
                    a.u64(core.index() as u64);
                }
            })
            .str("cmdline", boot_info.cmdline());
    });
}

/// The `Hello` round trip: proves the hypercall channel works and both sides speak one ABI.
fn hello() {
    let result = arch::hypercall::hello(HELLO_ARGUMENT);
    let ok = result.is_ok_and(|reply| hello_matches(HELLO_ARGUMENT, reply));
    match result {
        Ok(_) if ok => info!("hello: hypervisor answered, ABI {ABI_VERSION}"),
        Ok(reply) => error!(
            "hello: wrong answer {:#x}, ABI {} (expected ABI {ABI_VERSION})",
            reply.results[0],
            AbiVersion::from_u32(reply.results[1] as u32)
        ),
        Err(failure) => error!("hello: hypercall failed: {failure:?}"),
    }
    console::marker("lavender_hello", |o| {
        o.bool("ok", ok).display("abi", &ABI_VERSION);
        match result {
            Ok(reply) => {
                o.display("hv_abi", &AbiVersion::from_u32(reply.results[1] as u32));
            }
            Err(HypercallFailure::Status(status)) => {
                o.display("error", &status);
            }
            Err(HypercallFailure::Unknown(unknown)) => {
                o.display("error", &unknown);
            }
        }
    });
}

/// Reports a boot failure and stops.
fn fatal(reason: core::fmt::Arguments<'_>) -> ! {
    error!("fatal: {reason}");
    console::marker("lavender_fatal", |o| {
        o.display("reason", &reason);
    });
    arch::cpu::halt_forever()
}

/// A panic is reported on the console and to the hypervisor (`PANIC`), which stops the whole
/// guest: one core's broken invariant may be every core's (a lock never released, a corrupt
/// heap), so Lavender does not run on with its other cores. Should the hypervisor refuse the
/// message it is reported without one, and should even that fail (no hypervisor) the core
/// halts.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::emergency_line(|out| core::fmt::Write::write_fmt(out, format_args!("PANIC {info}")));
    console::emergency_marker("lavender_panic", |o| {
        o.display("message", info);
    });
    let mut message = guest_lavender::panic_message::PanicMessageBuffer::new();
    // Never fails: the buffer drops what does not fit.
    let _ = core::fmt::Write::write_fmt(&mut message, format_args!("{info}"));
    let refused = arch::hypercall::report_panic(message.as_bytes());
    let refused_again = arch::hypercall::report_panic(&[]);
    console::emergency_line(|out| {
        core::fmt::Write::write_fmt(
            out,
            format_args!("PANIC not reported to the hypervisor: {refused:?}, {refused_again:?}"),
        )
    });
    arch::cpu::halt_forever()
}
