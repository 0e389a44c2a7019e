//! Lavender's console: lines of text sent to the hypervisor with `ConsoleWrite`, which prints
//! them on COM2 tagged `[lavender] `. Carries the `log` output and the `@@tandem` markers.
//!
//! Lavender has no serial port of its own: the hypercall is the only way out.

use core::fmt::{self, Write};

use guest_lavender::line_buffer::LineBuffer;
use spin::Mutex;
use vmcall_proto::hypercall::ConsoleChunk;
use vmcall_proto::marker::{write_marker, JsonObject};

use crate::kernel::arch;

/// The line being assembled. One lock per line, so lines of different cores never interleave.
static LINE: Mutex<LineBuffer> = Mutex::new(LineBuffer::new());

/// `fmt::Write` into a line buffer.
pub struct LineWriter<'a>(&'a mut LineBuffer);

impl Write for LineWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.0.write(text.as_bytes(), &mut send);
        Ok(())
    }
}

fn send(chunk: ConsoleChunk) {
    // A refused console write cannot be reported anywhere else; the line is lost.
    let _ = arch::hypercall::console_write(chunk);
}

fn finish_line(buffer: &mut LineBuffer, body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    let mut writer = LineWriter(buffer);
    // Writing into the buffer cannot fail; a marker's formatting error leaves a short line,
    // which the test harness rejects as malformed JSON. Either way the line is ended.
    let _ = body(&mut writer);
    let _ = writer.write_str("\n");
}

/// Prints one line.
pub fn line(body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    finish_line(&mut LINE.lock(), body);
}

/// Prints one line without waiting for the console lock (exception and panic reports: the
/// interrupted code may hold it). If it is taken, the line goes out through a private buffer.
pub fn emergency_line(body: impl FnOnce(&mut LineWriter<'_>) -> fmt::Result) {
    match LINE.try_lock() {
        Some(mut buffer) => finish_line(&mut buffer, body),
        None => finish_line(&mut LineBuffer::new(), body),
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
