//! Lavender's console: lines of text sent to the hypervisor with `ConsoleWrite`, which prints
//! them on COM2 tagged `[lavender] `. Carries the `log` output and the `@@tandem` markers.
//!
//! Lavender has no serial port of its own: the hypercall is the only way out, and it is slow
//! (under Bochs a line takes milliseconds of virtual time on the emulated serial port). So once
//! the heap exists ([`start_queueing`]) a line is formatted into a string and queued, and the
//! queue is sent by whichever thread or idle loop flushes it with interrupts on: interrupt
//! handlers only queue, and no core sits in a slow hypercall with interrupts masked, where it
//! would delay IPIs, core events and preemption. One flusher at a time keeps lines whole and in
//! order. Before the heap, and for exception and panic reports, lines go out directly.

use alloc::collections::VecDeque;
use alloc::string::String;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use guest_lavender::line_buffer::LineBuffer;
use vmcall_proto::hypercall::{ConsoleChunk, HypercallFailure, Status, CONSOLE_CHUNK_MAX};
use vmcall_proto::marker::{write_marker, JsonObject};
use x86_64::instructions::interrupts;

use crate::kernel::arch;
use crate::kernel::sync::IrqMutex;

/// The line being sent directly. One lock per line, so direct lines never interleave.
static LINE: IrqMutex<LineBuffer> = IrqMutex::new(LineBuffer::new());
/// Queued lines, oldest first, each ending in `'\n'`.
static QUEUE: IrqMutex<VecDeque<String>> = IrqMutex::new(VecDeque::new());
/// Bytes in `QUEUE`, for [`backlog`].
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);
static QUEUEING: AtomicBool = AtomicBool::new(false);
/// Held by the one context sending queued lines.
static FLUSHING: AtomicBool = AtomicBool::new(false);

/// Where a line being written goes.
enum Sink<'a> {
    Direct(&'a mut LineBuffer),
    Queued(&'a mut String),
}

/// `fmt::Write` into a console line.
pub struct LineWriter<'a>(Sink<'a>);

impl Write for LineWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        match &mut self.0 {
            Sink::Direct(buffer) => buffer.write(text.as_bytes(), &mut send_now),
            Sink::Queued(line) => line.push_str(text),
        }
        Ok(())
    }
}

/// Hands `chunk` to the hypervisor. `false` when it is busy (its console queue is full: the
/// serial line is slower than Lavender prints) and took nothing: the caller keeps the bytes
/// and tries again later. Any other refusal cannot be reported anywhere else; the bytes are
/// dropped.
fn send(chunk: ConsoleChunk) -> bool {
    !matches!(
        arch::hypercall::console_write(chunk),
        Err(HypercallFailure::Status(Status::Busy))
    )
}

/// [`send`] until the hypervisor takes `chunk`: for lines printed before the queue exists
/// (boot, when the hypervisor writes in place and is never busy) and reports that cannot wait.
fn send_now(chunk: ConsoleChunk) {
    while !send(chunk) {
        core::hint::spin_loop();
    }
}

fn finish_line(mut writer: LineWriter<'_>, body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    // Writing into the buffer cannot fail; a marker's formatting error leaves a short line,
    // which the test harness rejects as malformed JSON. Either way the line is ended.
    let _ = body(&mut writer);
    let _ = writer.write_str("\n");
}

/// Bytes queued and not yet taken by the hypervisor. The console drains no faster than the
/// serial line behind the hypervisor, so a producer that may outrun it (a user program's
/// writes) waits while this is high, rather than grow the queue without bound.
pub fn backlog() -> usize {
    QUEUED_BYTES.load(Ordering::Relaxed)
}

/// From now on lines are queued (the heap is ready).
pub fn start_queueing() {
    QUEUEING.store(true, Ordering::Release);
}

/// Prints one line: queues it, and sends the queue if interrupts are on here.
pub fn line(body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    if !QUEUEING.load(Ordering::Acquire) {
        finish_line(LineWriter(Sink::Direct(&mut LINE.lock())), body);
        return;
    }
    let mut text = String::new();
    finish_line(LineWriter(Sink::Queued(&mut text)), body);
    QUEUED_BYTES.fetch_add(text.len(), Ordering::Relaxed);
    QUEUE.lock().push_back(text);
    if interrupts::are_enabled() {
        flush(|| true);
    }
}

/// Sends queued lines while `keep_going` says so, unless another context is sending them
/// already (it sends these too). Call with interrupts on: sending is slow. It stops only between
/// chunks of a line and leaves the rest of that line first in the queue, so lines stay whole.
/// Returns whether it sent anything.
pub fn flush(keep_going: impl Fn() -> bool) -> bool {
    let mut sent_any = false;
    while !QUEUE.lock().is_empty() && keep_going() {
        if FLUSHING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return sent_any;
        }
        loop {
            // Popped in its own statement: the queue's lock (which masks interrupts) must not be
            // held while the line is sent.
            let next = QUEUE.lock().pop_front();
            let Some(mut text) = next else {
                break;
            };
            let mut sent = 0;
            let mut busy = false;
            for chunk in text.as_bytes().chunks(CONSOLE_CHUNK_MAX) {
                if !keep_going() {
                    break;
                }
                if !send(ConsoleChunk::new(chunk)) {
                    busy = true;
                    break;
                }
                sent += chunk.len();
                sent_any = true;
            }
            QUEUED_BYTES.fetch_sub(sent, Ordering::Relaxed);
            if sent < text.len() {
                text.drain(..sent);
                QUEUE.lock().push_front(text);
                if busy {
                    // The hypervisor's queue is full: the rest waits for a later flush.
                    FLUSHING.store(false, Ordering::Release);
                    return sent_any;
                }
                break;
            }
        }
        FLUSHING.store(false, Ordering::Release);
    }
    sent_any
}

/// Prints one line directly, without waiting for the console lock (exception and panic
/// reports: the interrupted code may hold it). If it is taken, the line goes out through a
/// private buffer.
pub fn emergency_line(body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    match LINE.try_lock() {
        Some(mut buffer) => finish_line(LineWriter(Sink::Direct(&mut buffer)), body),
        None => finish_line(LineWriter(Sink::Direct(&mut LineBuffer::new())), body),
    }
}

/// Prints one marker line: `@@tandem {"ev":event,...}`.
pub fn marker(event: &str, fields: impl FnOnce(&mut JsonObject<'_, LineWriter<'_>>)) {
    line(|writer| write_marker(writer, event, fields));
}

/// [`marker`] without waiting for the console lock (see [`emergency_line`]).
pub fn emergency_marker(event: &str, fields: impl FnOnce(&mut JsonObject<'_, LineWriter<'_>>)) {
    emergency_line(|writer| write_marker(writer, event, fields));
}

struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            line(|writer| write!(writer, "{:<5} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

/// Installs the console as the `log` backend.
pub fn init_logger(level: log::LevelFilter) {
    // Fails only if a logger is already installed, i.e. on a second call: keep the first.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
