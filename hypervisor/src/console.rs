//! The hypervisor console on COM2: human-readable log lines (through the `log` crate)
//! and structured markers (see `vmcall_proto::marker`), each line tagged `[hv] `.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::SerialPort;
use vmcall_proto::marker::{write_marker, JsonObject};

use crate::arch;

/// Tag at the start of every line the hypervisor prints.
const SOURCE_TAG: &str = "[hv] ";

/// One lock for the whole line, so lines from different cores never interleave.
static CONSOLE: Mutex<Option<SerialPort>> = Mutex::new(None);

struct Logger;
static LOGGER: Logger = Logger;

/// Initializes COM2 and installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    let mut port = arch::serial::com2();
    port.init();
    arch::serial::set_115200_baud();
    *CONSOLE.lock() = Some(port);
    // Only fails if a logger is already set, i.e. on a second call: keep the first.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Sets the log level after the command line has been read.
pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
}

fn with_line(f: impl FnOnce(&mut SerialPort) -> fmt::Result) {
    let mut console = CONSOLE.lock();
    if let Some(port) = console.as_mut() {
        // A serial port never reports a write error; nothing to do with one.
        let _ = port
            .write_str(SOURCE_TAG)
            .and_then(|()| f(port))
            .and_then(|()| port.write_str("\n"));
    }
}

/// Prints one line of a guest's console, tagged with the guest's name.
pub fn guest_line(guest: &str, line: &str) {
    let mut console = CONSOLE.lock();
    if let Some(port) = console.as_mut() {
        let _ = writeln!(port, "[{guest}] {line}");
    }
}

/// Reports an exception taken by the hypervisor itself (a bug).
pub fn report_host_exception(vector: u64, error_code: u64, rip: u64, rsp: u64, cr2: u64) {
    let (_guard, mut port) = emergency_port();
    let _ = write!(
        port,
        "\n{SOURCE_TAG}EXCEPTION vector {vector} error {error_code:#x} at RIP {rip:#x} RSP {rsp:#x} CR2 {cr2:#x}\n{SOURCE_TAG}"
    );
    let _ = write_marker(&mut port, "panic", |o| {
        o.str("message", "exception in the hypervisor")
            .u64("vector", vector)
            .hex("error_code", error_code)
            .hex("rip", rip)
            .hex("cr2", cr2);
    });
    let _ = port.write_str("\n");
}

/// Prints one marker line: `[hv] @@tandem {"ev":event,...}`.
pub fn marker(event: &str, fields: impl FnOnce(&mut JsonObject<'_, SerialPort>)) {
    with_line(|port| write_marker(port, event, fields));
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            with_line(|port| write!(port, "{:<5} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

/// The console for a report from a failing core: the lock if it can be had soon (so the
/// report is not interleaved), else a private handle (the failing core may hold the lock).
fn emergency_port() -> (
    Option<spin::MutexGuard<'static, Option<SerialPort>>>,
    SerialPort,
) {
    for _ in 0..1_000_000 {
        if let Some(guard) = CONSOLE.try_lock() {
            return (Some(guard), arch::serial::com2());
        }
        core::hint::spin_loop();
    }
    (None, arch::serial::com2())
}

/// Reports a panic, preferably under the console lock.
pub fn report_panic(cpu: Option<usize>, info: &core::panic::PanicInfo) {
    let (_guard, mut port) = emergency_port();
    let _ = write!(port, "\n{SOURCE_TAG}PANIC {info}\n{SOURCE_TAG}");
    let _ = write_marker(&mut port, "panic", |o| {
        if let Some(cpu) = cpu {
            o.u64("cpu", cpu as u64);
        }
        o.display("message", info);
    });
    let _ = port.write_str("\n");
}
