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
//! | [`delegation`] | serving Lavender's delegated file system calls, and its self-test |
//! | [`control`] | Linux's control channel with the hypervisor (core events, token, status page) |
//! | [`hotplug`] | the hotplug actor: revoke -> CPU offline, grant -> CPU online |
//! | [`management`] | the socket `vmctl` talks to ([`vmctl_proto`]) |
//! | [`linux_load`] | Linux's own load for `vmctl status`, from the load reporter's readings of `/proc/stat` and `/proc/pressure/cpu` |
//! | [`exec`] | Lavender processes run from Linux: the control connection, `vmctl exec/ps/kill` |
//! | [`lavender_watch`] | what Linux lets go when Lavender stops: the delegation server, its processes |
//! | [`exec_bench`] | `vmctl exec` against fork+exec+wait, for `cargo xtask bench` |
//! | [`fdpass`] | passing descriptors over Unix sockets |
//! | [`load_report`] | Linux's load reports for the cooperative policy (`/proc/loadavg`, `/proc/stat`, PSI) |
//! | [`policy_bench`] | `tandem.selftest=policy-bench:SEEDS:WORKLOADS`: the policies on each workload, for `cargo xtask bench` |
//! | [`policy_selftest`] | `tandem.selftest=policies`: the policies on a phase-changing load, through `vmctl` |

mod cmdline;
mod control;
mod delegation;
mod devmem;
mod doorbell;
mod exec;
mod exec_bench;
mod fdpass;
mod hotplug;
mod init;
mod lavender_watch;
mod linux_load;
mod load_report;
mod management;
mod policy_bench;
mod policy_selftest;
mod report;
mod selftest;
mod shared;
mod shell;
mod soak;
mod system;
mod vmctl_proto;
mod vmctl_selftest;

use std::fs;
use std::process::ExitCode;

use report::SharedStatus;

const PROC_CMDLINE: &str = "/proc/cmdline";
/// The directory Lavender's delegated paths resolve under, unless the command line names one.
const DELEGATION_ROOT: &str = "/srv/lavender";

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
    let attached = attach_and_report();
    let cmdline = fs::read_to_string(PROC_CMDLINE).unwrap_or_default();
    let mut service = start_delegation(&attached, &cmdline);
    if service.is_some() {
        // After the server's fork (it starts a listener of its own): PID 1's, for the
        // control connection.
        if let Err(reason) = doorbell::listen() {
            report::emit(&report::error("doorbell", &reason, |_| {}));
        }
    }
    let channel = start_control();
    if let Some(cycles) = selftest::requested(&cmdline) {
        selftest::cpu_hotplug(cycles);
    }
    if let Some(delay) = selftest::hang_requested(&cmdline) {
        selftest::hang(delay);
    }
    if let Some((control, counters)) = service.as_mut() {
        if delegation::selftest::requested(&cmdline) {
            delegation::selftest::run(
                control,
                counters,
                &delegation_root(&cmdline),
                delegation::selftest::panic_requested(&cmdline),
            );
        }
        if delegation::bench::requested(&cmdline) {
            delegation::bench::run(
                control,
                counters,
                &delegation_root(&cmdline),
                channel.as_deref(),
            );
        }
    }
    // The self-test above drove the control connection alone; from here `vmctl` does.
    if let Some((control, _)) = service {
        exec::start(control);
        if let Some(runs) = exec_bench::requested(&cmdline) {
            exec_bench::run(runs);
        }
        if let Some(request) = policy_bench::requested(&cmdline) {
            policy_bench::run(&request, &delegation_root(&cmdline), channel.as_deref());
        }
    }
    // After `vmctl exec` is served: the soak load runs Lavender programs with it.
    if let Some((mode, rounds)) = vmctl_selftest::requested(&cmdline) {
        match vmctl_selftest::slowdown(&cmdline) {
            Ok(slowdown) => vmctl_selftest::run(mode, rounds, slowdown),
            Err(reason) => report::emit(&report::error("selftest", &reason, |o| {
                o.str("test", "vmctl-moves");
            })),
        }
    }
    // After `exec::start`: it starts and kills Lavender's worker with `vmctl exec`/`kill`.
    if policy_selftest::requested(&cmdline) {
        policy_selftest::run();
    }
    shell::supervise(&signals)
}

/// Where delegated paths resolve: `tandem.delegation_root=PATH`, else [`DELEGATION_ROOT`].
fn delegation_root(cmdline: &str) -> std::path::PathBuf {
    cmdline
        .split_ascii_whitespace()
        .find_map(|word| word.strip_prefix("tandem.delegation_root="))
        .unwrap_or(DELEGATION_ROOT)
        .into()
}

/// On the region laid out for delegation (the one shared with Lavender): starts the server
/// process and opens the control connection for PID 1.
fn start_delegation(
    attached: &[shared::Attached],
    cmdline: &str,
) -> Option<(delegation::Control, &'static delegation::Counters)> {
    let region = attached
        .iter()
        .find(|region| region.header.ring_count == vmcall_proto::delegation::RING_COUNT)?;
    let root = delegation_root(cmdline);
    // The doorbells, before the server forks so that it inherits them: into Linux (its
    // driver) and into Lavender (the region's base and the holder token, which only Linux's
    // control region carries). Without one, the waiters on that side poll.
    let doorbell_in = doorbell::load_driver();
    if let Err(reason) = &doorbell_in {
        report::emit(&report::error("doorbell", reason, |_| {}));
    }
    let control_spec = cmdline::parse(cmdline)
        .shared
        .into_iter()
        .find(|s| s.name == control::CONTROL_REGION);
    let doorbell_out = control_spec.map(|spec| {
        control::holder_token(&spec).map(|token| doorbell::set_lavender(region.phys, token))
    });
    if let Some(Err(reason)) = &doorbell_out {
        report::emit(&report::error("doorbell", reason, |_| {}));
    }
    let started = (|| {
        let region = region.mapping.region().map_err(|e| e.to_string())?;
        fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let control = delegation::open_control(region)?;
        let counters = delegation::server::shared_counters()?;
        delegation::server::start(
            region,
            root.clone(),
            delegation::Limits::default(),
            counters,
        )?;
        Ok::<_, String>((control, counters))
    })();
    match started {
        Ok((control, counters)) => {
            report::emit(&report::marker("delegation_ready", |o| {
                o.str("root", &root.display().to_string())
                    .u64(
                        "connections",
                        u64::from(vmcall_proto::delegation::PROCESS_CONNECTIONS),
                    )
                    .u64("slice_bytes", u64::from(control.plan.slice_len()))
                    .bool("doorbell_from_lavender", doorbell_in.is_ok())
                    .bool("doorbell_to_lavender", matches!(doorbell_out, Some(Ok(()))));
            }));
            Some((control, counters))
        }
        Err(reason) => {
            report::emit(&report::error("delegation", &reason, |_| {}));
            None
        }
    }
}

/// Attaches Linux's control region, when the hypervisor gave one, and starts the hotplug
/// actor and the management socket on threads of their own; the channel, for the policy
/// benchmark's load trace.
fn start_control() -> Option<std::sync::Arc<control::Control>> {
    let cmdline = fs::read_to_string(PROC_CMDLINE).unwrap_or_default();
    let parsed = cmdline::parse(&cmdline);
    let spec = parsed
        .shared
        .iter()
        .find(|s| s.name == control::CONTROL_REGION)?;
    match control::Control::attach(spec) {
        Ok(channel) => {
            let channel = std::sync::Arc::new(channel);
            let cores = control::cpu_cores(&cmdline);
            let actor = channel.clone();
            let reporter = channel.clone();
            let manager = channel.clone();
            let reported = cores.clone();
            std::thread::spawn(move || hotplug::serve(actor, cores));
            std::thread::spawn(move || load_report::serve(reporter, reported));
            std::thread::spawn(move || management::serve(manager));
            Some(channel)
        }
        Err(e) => {
            report::emit(&report::error("control_region", &e, |o| {
                o.str("region", control::CONTROL_REGION);
            }));
            None
        }
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
