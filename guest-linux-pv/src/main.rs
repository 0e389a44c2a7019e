//! `tandem-agent`: the Linux guest's PV agent, run as `/init` (PID 1) of the initramfs.
//!
//! Boot sequence: block the signals PID 1 handles, mount /proc /sys /dev /dev/pts /tmp,
//! attach the shared regions the hypervisor named on the kernel command line (see
//! [`cmdline`] for the contract), print one `agent_ready` marker, then keep a shell on the
//! console for good. Anything that fails is reported as an `agent_error` marker and the boot
//! goes on: Linux stays usable without the hypervisor's channel.
//!
//! | module | concern |
//! |---|---|
//! | [`cmdline`] | parsing the `tandem.shared=` words of `/proc/cmdline` |
//! | [`devmem`] | mapping physical ranges through `/dev/mem` |
//! | [`shared`] | attaching a shared region: map + header validation |
//! | [`system`] | CPUs, uptime, kernel release from procfs/sysfs |
//! | [`init`] | PID-1 duties: mounts, signals, reaping, shutdown |
//! | [`shell`] | the console shell and the main loop |
//! | [`report`] | the console markers |
//! | [`selftest`] | self-tests a scenario can ask for on the command line |
//! | [`control`] | Linux's control channel with the hypervisor (core events, token, status page) |
//! | [`hotplug`] | the hotplug actor: revoke -> CPU offline, grant -> CPU online |
//! | [`management`] | the socket `vmctl` talks to ([`vmctl_proto`]) |

mod cmdline;
mod control;
mod devmem;
mod hotplug;
mod init;
mod management;
mod report;
mod selftest;
mod shared;
mod shell;
mod system;
mod vmctl_proto;
mod vmctl_selftest;

use std::fs;
use std::process::ExitCode;

use report::SharedStatus;

const PROC_CMDLINE: &str = "/proc/cmdline";

fn main() -> ExitCode {
    // Mounting over /dev and killing every process at shutdown are only right for the
    // system's init; anywhere else refuse before touching anything.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, request] = args.as_slice() {
        if flag == "--raw-request" {
            return vmctl_selftest::raw_client(request);
        }
    }
    if std::process::id() != 1 {
        eprintln!("tandem-agent: must run as PID 1 (the initramfs's /init); refusing to start");
        return ExitCode::from(2);
    }
    let signals = match init::block_signals() {
        Ok(signals) => signals,
        Err(e) => {
            report::emit(&report::error("signals", &e.desc(), |_| {}));
            nix::sys::signal::SigSet::empty()
        }
    };
    init::prepare_system();
    // Kept alive for good: later issues serve the rings in these regions.
    let _attached = attach_and_report();
    start_control();
    if let Some(cycles) = fs::read_to_string(PROC_CMDLINE)
        .ok()
        .as_deref()
        .and_then(selftest::requested)
    {
        selftest::cpu_hotplug(cycles);
    }
    if let Some(rounds) = fs::read_to_string(PROC_CMDLINE)
        .ok()
        .as_deref()
        .and_then(vmctl_selftest::requested)
    {
        vmctl_selftest::run(rounds);
    }
    shell::supervise(&signals)
}

/// Attaches Linux's control region, when the hypervisor gave one, and starts the hotplug
/// actor and the management socket on threads of their own.
fn start_control() {
    let cmdline = fs::read_to_string(PROC_CMDLINE).unwrap_or_default();
    let parsed = cmdline::parse(&cmdline);
    let Some(spec) = parsed
        .shared
        .iter()
        .find(|s| s.name == control::CONTROL_REGION)
    else {
        return;
    };
    match control::Control::attach(spec) {
        Ok(channel) => {
            let channel = std::sync::Arc::new(channel);
            let cores = control::cpu_cores(&cmdline);
            let actor = channel.clone();
            std::thread::spawn(move || hotplug::serve(actor, cores));
            std::thread::spawn(move || management::serve(channel));
        }
        Err(e) => report::emit(&report::error("control_region", &e, |o| {
            o.str("region", control::CONTROL_REGION);
        })),
    }
}

/// Attaches every region named on the command line and prints the errors and the
/// `agent_ready` marker.
fn attach_and_report() -> Vec<shared::Attached> {
    let cmdline = fs::read_to_string(PROC_CMDLINE).unwrap_or_else(|e| {
        report::emit(&report::error("cmdline", &e, |o| {
            o.str("path", PROC_CMDLINE);
        }));
        String::new()
    });
    let parsed = cmdline::parse(&cmdline);
    for error in &parsed.errors {
        report::emit(&report::error("bad_cmdline", error, |o| {
            o.str("error", error.kind.code()).str("word", &error.word);
        }));
    }
    if parsed.shared.is_empty() {
        report::emit(&report::error(
            "no_shared_region",
            &format_args!(
                "no usable {}= on the kernel command line",
                cmdline::SHARED_KEY
            ),
            |_| {},
        ));
    }

    let mut attached = Vec::new();
    let mut statuses = Vec::new();
    for spec in &parsed.shared {
        let result = match shared::attach(spec) {
            Ok(region) => {
                let rings = region.header.ring_count;
                attached.push(region);
                Ok(rings)
            }
            Err(e) => {
                report::emit(&report::shared_error(spec, e));
                Err(e)
            }
        };
        statuses.push(SharedStatus { spec, result });
    }

    let cpus = system::cpus().unwrap_or_else(|reason| {
        report::emit(&report::error("cpus", &reason, |_| {}));
        system::Cpus {
            online: String::new(),
            present: Vec::new(),
        }
    });
    let kernel = system::kernel_release().unwrap_or_else(|e| {
        report::emit(&report::error("kernel_release", &e, |_| {}));
        String::new()
    });
    let uptime_ms = system::uptime_ms().unwrap_or_else(|e| {
        report::emit(&report::error("uptime", &e, |_| {}));
        0
    });
    report::emit(&report::ready(&report::Ready {
        cpus_online: &cpus.online,
        cpus_present: &cpus.present,
        kernel: &kernel,
        shared: &statuses,
        uptime_ms,
    }));
    attached
}
