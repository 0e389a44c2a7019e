//! The workloads the command line can start at boot, as user processes:
//! `workload=primes` runs the `primes` program (the parallel worker) with the command line's
//! `threads=`, `limit=` and `rounds=`; `workload=idle` runs the `idle` program; `test=user`
//! runs the `hostile` program first. The programs
//! report their results on the console; the kernel reports each process's start and exit
//! (`process_start`, `process_exit` markers, the latter with the process's thread count and the
//! kernel's thread accounting).

use alloc::format;
use guest_lavender::cmdline::PrimesPlan;
use log::error;

use crate::kernel::process;

/// Starts the primes worker process.
pub fn start_primes(plan: PrimesPlan) {
    let args = format!(
        "threads={} limit={} rounds={}",
        plan.threads, plan.limit, plan.rounds
    );
    start("primes", &args);
}

/// Starts the hostile program (`test=user`).
pub fn start_hostile() {
    start("hostile", "");
}

/// Starts the idle program.
pub fn start_idle() {
    start("idle", "");
}

fn start(program: &str, args: &str) {
    if let Err(problem) = process::spawn(program, args) {
        error!("workload: cannot start {program}: {problem}");
        crate::kernel::console::marker("process_spawn_failed", |o| {
            o.str("name", program).display("error", &problem);
        });
    }
}
