//! The hypervisor console on COM2: human-readable log lines (through the `log` crate)
//! and structured markers (see `vmcall_proto::marker`), each line tagged `[hv] `, and
//! the guests' console lines, tagged with the guest's name.
//!
//! Once the guests run, the console is asynchronous. Under Bochs a byte costs about
//! 87 µs on the serial line, so a line written in place stalls the core that prints it
//! (a vCPU core handling its guest's `CONSOLE_WRITE`, an exit handler that logs) for
//! milliseconds. Instead:
//! - A producer formats its line on its own stack and appends it whole to `QUEUE`, a
//!   64 KiB byte queue, under a lock held only for the copy.
//! - The monitor's passes (`monitor.rs`, on core 0 or on the guests' cores) drain: a pass
//!   hands the UART a transmit FIFO's worth whenever the FIFO is empty and the next comes
//!   when it can have been sent (`drain_without_waiting`), so nobody waits on the line, and
//!   the core-move test's polling loop moves only the bytes the UART takes at once
//!   (`drain_ready`).
//! - Wake rule: a producer that finds the queue empty before its append asks the monitor
//!   for a pass (on core 0 when the monitor has its own core, an IPI). One per burst: while
//!   bytes are queued the passes keep coming.
//! - Order: lines come out whole, in the order they were queued. Only the holder of
//!   `UART` writes to the UART, and a line written in place (below) first writes out
//!   everything queued before it.
//! - Full queue: nothing is dropped, the producer blocks. A line that does not fit in
//!   the queue (or in its stack buffer) is written in place: the producer takes the UART,
//!   writes out what was queued before it, then its line, as before the console queued.
//!   Markers, which the test harness reads, are never lost.
//! - Before the monitor starts draining (`start_queueing`, boot, with one core at first)
//!   and after it stops (`stop_queueing`, when there are no guests) every line is written
//!   in place.
//! - Panics and host exceptions write out what is queued (best effort), then their
//!   report in place.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use heapless::Vec;
use spin::{Mutex, MutexGuard};
use uart_16550::SerialPort;
use vmcall_proto::marker::{write_marker, JsonObject};

use crate::arch;
use crate::arch::lapic::LocalApic;
use crate::arch::percpu::CPUS;
use crate::line_queue::LineQueue;

/// Tag at the start of every line the hypervisor prints.
const SOURCE_TAG: &str = "[hv] ";

/// Bytes the queue holds: over five seconds of output at the serial line's pace.
const QUEUE_BYTES: usize = 64 * 1024;
/// A hypervisor line longer than this is written in place (the long markers, like the
/// boot report and the exit counters, come from the monitor).
const LINE_BUFFER: usize = 1024;
/// Bytes taken from the queue per lock when writing it out.
const CHUNK: usize = 64;

/// The UART. Whoever holds this lock is the only one writing to it, so bytes taken from
/// `QUEUE` keep their order. Lock order: `UART`, then `QUEUE`.
static UART: Mutex<Option<SerialPort>> = Mutex::new(None);
/// Lines waiting for the UART.
static QUEUE: Mutex<LineQueue<QUEUE_BYTES>> = Mutex::new(LineQueue::new());
/// Whether lines are queued for the monitor to write out (between `start_queueing` and
/// `stop_queueing`); otherwise they are written in place.
static QUEUEING: AtomicBool = AtomicBool::new(false);

type Uart = MutexGuard<'static, Option<SerialPort>>;

struct Logger;
static LOGGER: Logger = Logger;

/// Initializes COM2 and installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    let mut port = arch::serial::com2();
    port.init();
    arch::serial::set_115200_baud();
    *UART.lock() = Some(port);
    // Only fails if a logger is already set, i.e. on a second call: keep the first.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Sets the log level after the command line has been read.
pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
}

/// From now on lines are queued: the monitor's passes (and the core-move test) drain the
/// queue.
pub fn start_queueing() {
    QUEUEING.store(true, Ordering::SeqCst);
}

/// Nobody will drain the queue (there are no guests, so no monitor): writes out everything
/// queued and has every later line written in place.
pub fn stop_queueing() {
    QUEUEING.store(false, Ordering::SeqCst);
    let mut uart = UART.lock();
    write_queued(&mut uart, usize::MAX);
}

/// Writes what COM2 takes now without waiting: nothing while its transmit FIFO still sends,
/// up to a FIFO's worth once it is empty. Returns whether bytes are still queued, for the
/// monitor to come back in [`FIFO_DRAIN_US`]. At 115200 baud a byte takes 87 µs on the
/// line (modelled by the emulators too): a burst of markers written in place would hold the
/// core that runs the monitor, and the policy engine and the moves it runs, for tens of
/// milliseconds.
pub fn drain_without_waiting() -> bool {
    let Some(uart) = UART.try_lock() else {
        // Another core is writing in place; it empties the queue up to its line.
        return !QUEUE.lock().is_empty();
    };
    if uart.is_some() && crate::arch::serial::com2_tx_empty() {
        let mut burst = [0u8; crate::arch::serial::TX_FIFO_BYTES];
        let n = QUEUE.lock().pop_into(&mut burst);
        crate::arch::serial::com2_fill_fifo(&burst[..n]);
    }
    drop(uart);
    !QUEUE.lock().is_empty()
}

/// How long COM2 takes to send a full transmit FIFO: when [`drain_without_waiting`] leaves
/// bytes queued, the monitor looks again this much later.
pub const FIFO_DRAIN_US: u64 =
    crate::arch::serial::TX_FIFO_BYTES as u64 * crate::arch::serial::BYTE_US;

/// Moves queued bytes to the UART only while it takes them without waiting, so the
/// core-move test's polling stays fine-grained. `try_send_raw` writes a byte only when
/// the line-status register has THRE set (bit 5: transmitter holding register empty,
/// 16550 datasheet), else it returns at once.
pub fn drain_ready() {
    let Some(mut uart) = UART.try_lock() else {
        return; // Another core is writing in place; it empties the queue up to its line.
    };
    if let Some(port) = uart.as_mut() {
        let mut queue = QUEUE.lock();
        while queue.pop_if(|byte| port.try_send_raw(byte).is_ok()) {}
    }
}

/// Writes `bytes` to the UART, waiting for it byte by byte.
fn send_all(uart: &mut Option<SerialPort>, bytes: &[u8]) {
    if let Some(port) = uart.as_mut() {
        for &byte in bytes {
            port.send_raw(byte);
        }
    }
}

/// Writes out up to `count` queued bytes, oldest first.
fn write_queued(uart: &mut Option<SerialPort>, mut count: usize) {
    let mut chunk = [0u8; CHUNK];
    while count > 0 {
        let n = QUEUE.lock().pop_into(&mut chunk[..count.min(CHUNK)]);
        if n == 0 {
            break;
        }
        send_all(uart, &chunk[..n]);
        count -= n;
    }
}

/// Takes the UART and writes out what is queued at this point: what the caller writes
/// next comes after every line queued before. Lines queued meanwhile wait (no
/// starvation when other cores keep printing); the queue holds whole lines only, so
/// this stops at a line's end.
fn take_uart() -> Uart {
    let mut uart = UART.lock();
    let queued = QUEUE.lock().len();
    write_queued(&mut uart, queued);
    uart
}

/// Whether this is core 0 and it drains the console itself (it is the monitor's own core).
/// Only asked while queueing, when every core's local APIC is in x2APIC mode.
fn on_drainer() -> bool {
    crate::monitor::has_own_core() && LocalApic::X2Apic.id() == CPUS[0].apic_id()
}

/// Whether lines wait in the queue.
pub fn has_queued() -> bool {
    !QUEUE.lock().is_empty()
}

/// Queues one complete line, the concatenation of `parts`, or writes it in place when
/// the queue has no room or nobody drains it.
fn put_line(parts: &[&[u8]]) {
    if QUEUEING.load(Ordering::SeqCst) {
        let (queued, was_empty) = {
            let mut queue = QUEUE.lock();
            let was_empty = queue.is_empty();
            (queue.push(parts), was_empty)
        };
        if queued {
            if !QUEUEING.load(Ordering::SeqCst) {
                // `stop_queueing` ran meanwhile and may have missed this line.
                drop(take_uart());
            } else if was_empty && !on_drainer() {
                crate::monitor::wake();
            }
            return;
        }
    }
    let mut uart = take_uart();
    for part in parts {
        send_all(&mut uart, part);
    }
}

/// One hypervisor line being written: kept on the stack until it is complete, then
/// queued, unless it goes to the UART in place (no queueing, or too long).
pub struct Line {
    buffer: Vec<u8, LINE_BUFFER>,
    in_place: Option<Uart>,
}

impl Line {
    fn new() -> Self {
        Self {
            buffer: Vec::new(),
            in_place: (!QUEUEING.load(Ordering::SeqCst)).then(take_uart),
        }
    }

    fn finish(self) {
        if self.in_place.is_none() {
            put_line(&[&self.buffer]);
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.in_place.is_none() {
            if self.buffer.extend_from_slice(s.as_bytes()).is_ok() {
                return Ok(());
            }
            // Too long to queue: the rest goes in place, after what is buffered.
            let mut uart = take_uart();
            send_all(&mut uart, &self.buffer);
            self.in_place = Some(uart);
        }
        if let Some(uart) = self.in_place.as_mut() {
            send_all(uart, s.as_bytes());
        }
        Ok(())
    }
}

fn with_line(f: impl FnOnce(&mut Line) -> fmt::Result) {
    let mut line = Line::new();
    // The line's own writes never fail; a formatting error leaves the line short.
    let _ = line
        .write_str(SOURCE_TAG)
        .and_then(|()| f(&mut line))
        .and_then(|()| line.write_str("\n"));
    line.finish();
}

/// Whether `bytes` more bytes of guest lines would be queued now rather than written in place:
/// a guest's console writes are refused (`Busy`) otherwise, so a guest that prints faster than
/// the serial line drains waits in its own time, not inside a hypercall on the UART, and
/// never makes other guests' lines or the hypervisor's wait behind its backlog. Always `true`
/// while lines are written in place anyway (boot, and after the end).
pub fn has_room_for(bytes: usize) -> bool {
    !QUEUEING.load(Ordering::SeqCst) || QUEUE.lock().room() >= bytes
}

/// Prints one line of a guest's console, tagged with the guest's name.
pub fn guest_line(guest: &str, line: &str) {
    put_line(&[b"[", guest.as_bytes(), b"] ", line.as_bytes(), b"\n"]);
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
pub fn marker(event: &str, fields: impl FnOnce(&mut JsonObject<'_, Line>)) {
    with_line(|line| write_marker(line, event, fields));
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            with_line(|line| write!(line, "{:<5} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

/// The console for a report from a failing core: the lock if it can be had soon (so the
/// report is not interleaved), else a private handle (the failing core may hold the
/// lock). What is queued is written out first, unless the queue's lock is held (the
/// failing core may hold that one too).
fn emergency_port() -> (Option<Uart>, SerialPort) {
    let guard = (0..1_000_000).find_map(|_| {
        let guard = UART.try_lock();
        if guard.is_none() {
            core::hint::spin_loop();
        }
        guard
    });
    let mut port = arch::serial::com2();
    if let Some(mut queue) = QUEUE.try_lock() {
        let mut chunk = [0u8; CHUNK];
        loop {
            let n = queue.pop_into(&mut chunk);
            if n == 0 {
                break;
            }
            chunk[..n].iter().for_each(|&byte| port.send_raw(byte));
        }
    }
    (guard, port)
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
