//! The interactive console of `cargo xtask run`: the user's terminal wired to the Linux
//! guest's COM1.
//!
//! The emulator gets the slave side of a pseudo-terminal as COM1 (Bochs `mode=term`, QEMU
//! `-chardev serial`); a relay thread copies the master side to the user's terminal and to
//! the run dir's `com1.log` (so the marker watcher and the run dir see what they see in
//! file mode), and copies what the user types to the master side. The user's terminal is in
//! raw mode meanwhile (every key, Ctrl-C included, goes to the guest) and is restored when
//! the [`Shell`] ends, on errors, and by a panic hook (the workspace builds with
//! `panic = "abort"`, so destructors do not run on a panic). [`ESCAPE`] (Ctrl-]) stops the
//! run.
//!
//! The terminal is for a person: unless asked to show them, markers (`@@tandem` lines, for
//! programs) are left out of it, on both consoles, except notable ones (a guest stopped, a
//! fatal error); the logs keep everything. The hypervisor's lines never cut a Linux line in
//! two: they wait for its end (see [`Screen`]).

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmcall_proto::marker::MARKER_PREFIX;

/// The key that stops an interactive run (Ctrl-], as in telnet), and how to name it.
pub const ESCAPE: u8 = 0x1d;
pub const ESCAPE_NAME: &str = "Ctrl-]";

/// How long the relay sleeps in `poll` before looking at its stop flag and the slave's
/// terminal settings again.
const POLL_MS: libc::c_int = 50;

/// Input typed but not yet taken by the guest beyond which the relay stops reading the
/// terminal (the guest's UART takes a byte at a time; a big paste waits in the terminal).
const MAX_PENDING: usize = 64 * 1024;

/// Whether `cargo xtask run` can take the terminal: stdin and stdout are both terminals.
pub fn terminal_attached() -> bool {
    // SAFETY: isatty() only inspects the descriptor number; any value is allowed.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 && libc::isatty(libc::STDOUT_FILENO) == 1 }
}

/// A pseudo-terminal pair: the emulator opens [`Pty::slave_path`], xtask keeps the master.
pub struct Pty {
    master: OwnedFd,
    /// Held open for the whole run: the master reads EIO while no process has the slave
    /// open (before the emulator opens it, after it exits), and the relay uses it to keep
    /// the line raw.
    slave: OwnedFd,
    slave_path: PathBuf,
}

impl Pty {
    /// Opens a new pair, the slave raw (no echo, no line editing, no signals, no CR/LF
    /// translation) and the master non-blocking; neither is inherited by child processes.
    pub fn open() -> Result<Pty> {
        let (mut master, mut slave): (libc::c_int, libc::c_int) = (-1, -1);
        // SAFETY: openpty() writes one descriptor into each out-pointer, which point to live
        // locals; the name, termios and winsize pointers may be null (no name buffer whose
        // size openpty cannot know; default settings, changed below).
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("openpty");
        }
        // SAFETY: openpty succeeded, so both are fresh descriptors that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut name = [0u8; 256];
        // SAFETY: the buffer is writable for its whole length, which is passed along.
        let rc = unsafe {
            libc::ttyname_r(
                slave.as_raw_fd(),
                name.as_mut_ptr().cast::<libc::c_char>(),
                name.len(),
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc)).context("ttyname_r of the pty slave");
        }
        let slave_path = CStr::from_bytes_until_nul(&name)
            .context("pty name")?
            .to_str()
            .context("pty name")?
            .into();
        for fd in [&master, &slave] {
            set_fd_flag(
                fd.as_raw_fd(),
                libc::F_GETFD,
                libc::F_SETFD,
                libc::FD_CLOEXEC,
            )?;
        }
        set_fd_flag(
            master.as_raw_fd(),
            libc::F_GETFL,
            libc::F_SETFL,
            libc::O_NONBLOCK,
        )?;
        let settings = get_termios(slave.as_raw_fd())?;
        set_termios(slave.as_raw_fd(), &make_raw(settings))?;
        Ok(Pty {
            master,
            slave,
            slave_path,
        })
    }

    /// The device the emulator opens as COM1 (`/dev/pts/N`).
    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }
}

fn set_fd_flag(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int) -> Result<()> {
    // SAFETY: F_GETFD/F_GETFL take no argument and only read the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, get) };
    // SAFETY: F_SETFD/F_SETFL take an int argument and change only the descriptor's flags.
    if flags < 0 || unsafe { libc::fcntl(fd, set, flags | flag) } < 0 {
        return Err(io::Error::last_os_error()).context("fcntl on the pty");
    }
    Ok(())
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain old data (integers and arrays), so all-zero is a valid value;
    // tcgetattr() fills it in and reads nothing from it.
    let mut settings: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `settings` is a live, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut settings) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(settings)
}

fn set_termios(fd: RawFd, settings: &libc::termios) -> io::Result<()> {
    // SAFETY: `settings` is a valid termios that tcsetattr() only reads.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, settings) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `settings` made raw, as `cfmakeraw(3)` does: bytes pass unchanged in both directions,
/// one at a time, with no echo and no signal keys.
fn make_raw(mut settings: libc::termios) -> libc::termios {
    settings.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    settings.c_oflag &= !libc::OPOST;
    settings.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    settings.c_cflag &= !(libc::CSIZE | libc::PARENB);
    settings.c_cflag |= libc::CS8;
    settings.c_cc[libc::VMIN] = 1;
    settings.c_cc[libc::VTIME] = 0;
    settings
}

/// Whether a line passes every byte through unchanged (what [`make_raw`] sets up).
///
/// Bochs's `mode=term` reconfigures its tty when it opens it: raw, but with `ISIG` (so the
/// guest never sees Ctrl-C, Ctrl-Z or Ctrl-\) and `ONLCR` (so the guest's `\r\n` arrives as
/// `\r\r\n`). The relay checks the slave with this and makes it raw again.
fn is_raw(settings: &libc::termios) -> bool {
    settings.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN) == 0
        && settings.c_oflag & libc::OPOST == 0
        && settings.c_iflag & (libc::BRKINT | libc::INLCR | libc::IGNCR | libc::ICRNL | libc::IXON)
            == 0
}

/// The user's terminal settings while a [`Shell`] runs: raw input, but output processing
/// kept (so xtask's own `\n` still starts a new line; the guest's `\r\n` is unaffected).
fn user_terminal_raw(settings: libc::termios) -> libc::termios {
    let mut raw = make_raw(settings);
    raw.c_oflag |= libc::OPOST | libc::ONLCR;
    raw
}

/// The user's terminal settings from before raw mode, for the panic hook.
static SAVED_TERMINAL: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_saved_terminal() {
    let saved = SAVED_TERMINAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(settings) = saved {
        let _ = set_termios(libc::STDIN_FILENO, &settings);
    }
}

/// The user's terminal in raw mode; dropping it (or a panic) restores the settings.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Before the message, so that it is readable; the process aborts after.
                restore_saved_terminal();
                previous(info);
            }));
        });
        let settings = get_termios(libc::STDIN_FILENO).context("reading the terminal settings")?;
        *SAVED_TERMINAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(settings);
        set_termios(libc::STDIN_FILENO, &user_terminal_raw(settings))
            .context("putting the terminal in raw mode")?;
        Ok(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved_terminal();
    }
}

/// The bytes before the first [`ESCAPE`] in what the user typed, and whether there was one.
fn split_at_escape(typed: &[u8]) -> (&[u8], bool) {
    match typed.iter().position(|&b| b == ESCAPE) {
        Some(at) => (&typed[..at], true),
        None => (typed, false),
    }
}

/// How long a line of another console (COM2) waits for COM1 to finish its current line
/// (a prompt never does), and how long COM1's first bytes of a line may wait to be told
/// apart from a marker.
const HOLD: Duration = Duration::from_secs(1);

/// The longest unfinished COM1 line (in bytes) that is redrawn under held lines; a longer
/// one may wrap over several rows, of which only the last could be cleared.
const REDRAW_MAX: usize = 160;

/// The cursor-position query (Device Status Report 6) Busybox's shell sends with every
/// prompt. It is not repeated when a prompt is redrawn: the terminal answers every copy,
/// and the shell would read the extra answers as input.
const CURSOR_QUERY: &[u8] = b"\x1b[6n";

/// Hides COM1's marker lines (those that start with `@@tandem `) from the screen, except
/// the notable ones ([`crate::marker::shown_when_quiet`]). The bytes at the start of a line
/// are held while they may still become the marker prefix (at most [`HOLD`]).
#[derive(Default)]
struct Com1Markers {
    /// Whether COM1 is inside a line (its next byte does not start one).
    mid_line: bool,
    /// Bytes at the start of the line that are a prefix of the marker prefix, and since when.
    candidate: Vec<u8>,
    candidate_since: Option<Instant>,
    /// The marker line being hidden (prefix included), while it lasts.
    marker: Option<Vec<u8>>,
}

/// A marker line longer than this is dropped from the screen without being judged.
const MAX_MARKER_LINE: usize = 64 * 1024;

impl Com1Markers {
    /// Appends to `out` what of `bytes` the screen shows.
    fn pass(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
        let prefix = MARKER_PREFIX.as_bytes();
        for &byte in bytes {
            if let Some(line) = &mut self.marker {
                if line.len() < MAX_MARKER_LINE {
                    line.push(byte);
                }
                if byte == b'\n' {
                    let line = self.marker.take().unwrap_or_default();
                    // A line cut at the limit lacks its `\n`: dropped, not judged.
                    let whole = line.last() == Some(&b'\n');
                    if whole && crate::marker::shown_when_quiet(&String::from_utf8_lossy(&line)) {
                        out.extend_from_slice(&line);
                    }
                    self.mid_line = false;
                }
                continue;
            }
            if self.mid_line {
                out.push(byte);
                self.mid_line = byte != b'\n';
                continue;
            }
            self.candidate.push(byte);
            if prefix.starts_with(&self.candidate) {
                self.candidate_since.get_or_insert(now);
                if self.candidate.len() == prefix.len() {
                    self.marker = Some(std::mem::take(&mut self.candidate));
                    self.candidate_since = None;
                }
                continue;
            }
            out.append(&mut self.candidate);
            self.candidate_since = None;
            self.mid_line = byte != b'\n';
        }
    }

    /// Appends to `out` the start of a line held longer than [`HOLD`]: it was no marker.
    fn release_stale(&mut self, now: Instant, out: &mut Vec<u8>) {
        if self
            .candidate_since
            .is_some_and(|since| now.duration_since(since) >= HOLD)
        {
            out.append(&mut self.candidate);
            self.candidate_since = None;
            self.mid_line = true;
        }
    }
}

/// The terminal output shared by the relay (COM1 bytes) and the watcher (COM2 lines).
///
/// COM2's lines are written whole, between COM1's lines: while COM1 is in the middle of a
/// line they are held, and written as soon as it ends the line. A line that stays
/// unfinished (a shell prompt, a command being typed) holds them at most [`HOLD`]; then the
/// unfinished line is cleared, the held lines are written, and it is drawn again below them
/// (a line too long for that is left as it is and the held lines start on the next row).
struct Screen<W: Write> {
    out: W,
    /// Show every marker (`--show-markers`); otherwise only notable ones.
    show_markers: bool,
    com1_markers: Com1Markers,
    /// What COM1 showed since its last line break (`None`: too long to redraw).
    partial: Option<Vec<u8>>,
    /// COM2 lines waiting for COM1 to finish its line, and since when.
    held: Vec<String>,
    held_since: Option<Instant>,
}

impl<W: Write> Screen<W> {
    fn new(out: W, show_markers: bool) -> Self {
        Screen {
            out,
            show_markers,
            com1_markers: Com1Markers::default(),
            partial: Some(Vec::new()),
            held: Vec::new(),
            held_since: None,
        }
    }

    /// Whether the last COM1 byte shown ended a line.
    fn at_line_start(&self) -> bool {
        self.partial.as_ref().is_some_and(Vec::is_empty)
    }

    /// Shows bytes COM1 printed.
    fn guest_output(&mut self, bytes: &[u8], now: Instant) -> io::Result<()> {
        let mut shown = Vec::with_capacity(bytes.len());
        if self.show_markers {
            shown.extend_from_slice(bytes);
        } else {
            self.com1_markers.pass(bytes, now, &mut shown);
        }
        self.show_com1(&shown)?;
        if self.at_line_start() {
            self.write_held()?;
        }
        self.out.flush()
    }

    /// Shows a COM2 line (if markers are shown or it is no quiet marker), whole.
    fn side_line(&mut self, line: &str, now: Instant) -> io::Result<()> {
        if !self.show_markers && !crate::marker::shown_when_quiet(line) {
            return Ok(());
        }
        self.held.push(line.to_string());
        self.held_since.get_or_insert(now);
        if self.at_line_start() {
            self.write_held()?;
        }
        self.out.flush()
    }

    /// Called every few tens of milliseconds: releases what waited [`HOLD`].
    fn tick(&mut self, now: Instant) -> io::Result<()> {
        let mut released = Vec::new();
        self.com1_markers.release_stale(now, &mut released);
        if !released.is_empty() {
            self.show_com1(&released)?;
        }
        let due = self
            .held_since
            .is_some_and(|since| now.duration_since(since) >= HOLD);
        if due && !self.held.is_empty() {
            match self.partial.take() {
                Some(partial) => {
                    // Clear the unfinished row, write the lines, draw the row again.
                    self.out.write_all(b"\r\x1b[K")?;
                    self.write_held()?;
                    self.partial = Some(Vec::new());
                    self.show_com1(&without(&partial, CURSOR_QUERY))?;
                }
                None => {
                    self.out.write_all(b"\n")?;
                    self.write_held()?;
                    self.partial = None;
                }
            }
        }
        self.out.flush()
    }

    /// At the end of the run: the held lines, after the unfinished line.
    fn finish(&mut self) -> io::Result<()> {
        if !self.at_line_start() {
            self.out.write_all(b"\n")?;
            self.partial = Some(Vec::new());
        }
        self.write_held()?;
        self.out.flush()
    }

    fn write_held(&mut self) -> io::Result<()> {
        for line in self.held.drain(..) {
            self.out.write_all(line.as_bytes())?;
            self.out.write_all(b"\n")?;
        }
        self.held_since = None;
        Ok(())
    }

    fn show_com1(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        let tail = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                self.partial = Some(Vec::new());
                &bytes[end + 1..]
            }
            None => bytes,
        };
        if let Some(partial) = &mut self.partial {
            partial.extend_from_slice(tail);
            if partial.len() > REDRAW_MAX {
                self.partial = None;
            }
        }
        Ok(())
    }
}

/// `bytes` without any occurrence of `sequence`.
fn without(bytes: &[u8], sequence: &[u8]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(sequence) {
            rest = &rest[sequence.len()..];
        } else {
            kept.push(rest[0]);
            rest = &rest[1..];
        }
    }
    kept
}

/// The relay between the user's terminal and the guest's COM1; see the module docs.
pub struct Shell {
    stop: Arc<AtomicBool>,
    escaped: Arc<AtomicBool>,
    screen: Arc<Mutex<Screen<io::Stdout>>>,
    relay: Option<JoinHandle<io::Result<()>>>,
    raw: Option<RawTerminal>,
}

impl Shell {
    /// Puts the terminal in raw mode and starts relaying between it, `pty`'s master and
    /// `com1_log` (appended to). [`ESCAPE`] sets `interrupted`, as Ctrl-C does otherwise.
    /// Without `show_markers` the terminal shows only notable markers (see [`Screen`]);
    /// `com1_log` gets everything.
    pub fn start(
        pty: Pty,
        com1_log: &Path,
        interrupted: Arc<AtomicBool>,
        show_markers: bool,
    ) -> Result<Shell> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(com1_log)
            .with_context(|| format!("opening {}", com1_log.display()))?;
        let raw = RawTerminal::enter()?;
        let stop = Arc::new(AtomicBool::new(false));
        let escaped = Arc::new(AtomicBool::new(false));
        let screen = Arc::new(Mutex::new(Screen::new(io::stdout(), show_markers)));
        let relay = Relay {
            master: File::from(pty.master),
            slave: pty.slave,
            log,
            screen: screen.clone(),
            stop: stop.clone(),
            escaped: escaped.clone(),
            interrupted,
        };
        let relay = std::thread::Builder::new()
            .name("com1-relay".into())
            .spawn(move || relay.run())
            .context("starting the COM1 relay")?;
        Ok(Shell {
            stop,
            escaped,
            screen,
            relay: Some(relay),
            raw: Some(raw),
        })
    }

    /// Shows a line of another console (COM2) between the guest's lines, unless it is a
    /// marker that is not shown (see [`Shell::start`]).
    pub fn show_line(&self, line: &str) {
        let mut screen = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        let _ = screen.side_line(line, Instant::now());
    }

    /// Whether the user pressed [`ESCAPE`].
    pub fn escaped(&self) -> bool {
        self.escaped.load(Ordering::Relaxed)
    }

    /// Stops the relay (after it has copied what COM1 still had), restores the terminal and
    /// reports a relay failure, if there was one.
    pub fn finish(mut self) -> Result<()> {
        let result = self.stop_relay();
        // A prompt is usually left without a line break after it; lines may still be held.
        let _ = self
            .screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
        self.raw = None;
        result
    }

    fn stop_relay(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(relay) = self.relay.take() else {
            return Ok(());
        };
        match relay.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("relaying COM1"),
            Err(_) => bail!("the COM1 relay thread panicked"),
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.stop_relay();
        // `raw` is dropped after this, restoring the terminal.
    }
}

struct Relay {
    master: File,
    slave: OwnedFd,
    log: File,
    screen: Arc<Mutex<Screen<io::Stdout>>>,
    stop: Arc<AtomicBool>,
    escaped: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
}

impl Relay {
    fn run(mut self) -> io::Result<()> {
        let result = self.relay();
        if result.is_err() {
            // Without the relay the user can neither see nor stop the guest: end the run.
            self.interrupted.store(true, Ordering::Relaxed);
        }
        result
    }

    fn relay(&mut self) -> io::Result<()> {
        let mut to_guest: Vec<u8> = Vec::new();
        let mut reading_stdin = true;
        let mut buf = [0u8; 4096];
        while !self.stop.load(Ordering::Relaxed) {
            self.keep_slave_raw()?;
            let stdin_wanted = reading_stdin && to_guest.len() < MAX_PENDING;
            let mut master_events = libc::POLLIN;
            if !to_guest.is_empty() {
                master_events |= libc::POLLOUT;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.master.as_raw_fd(),
                    events: master_events,
                    revents: 0,
                },
                libc::pollfd {
                    // A negative descriptor is skipped by poll().
                    fd: if stdin_wanted { libc::STDIN_FILENO } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfd and its length is passed along.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.drain_guest_output(&mut buf)?;
            }
            self.screen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .tick(Instant::now())?;
            if fds[0].revents & libc::POLLOUT != 0 && !to_guest.is_empty() {
                match self.master.write(&to_guest) {
                    Ok(n) => {
                        to_guest.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                // SAFETY: `buf` is writable for its whole length, which is passed along.
                let n = unsafe {
                    libc::read(
                        libc::STDIN_FILENO,
                        buf.as_mut_ptr().cast::<libc::c_void>(),
                        buf.len(),
                    )
                };
                match n {
                    n if n < 0 => {
                        let e = io::Error::last_os_error();
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                        ) {
                            return Err(e);
                        }
                    }
                    // The terminal is gone: nothing more to read; the run goes on.
                    0 => reading_stdin = false,
                    n => {
                        let (typed, escape) = split_at_escape(&buf[..n as usize]);
                        to_guest.extend_from_slice(typed);
                        if escape {
                            reading_stdin = false;
                            self.escaped.store(true, Ordering::Relaxed);
                            self.interrupted.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        // What the guest printed last, e.g. just before the emulator exited.
        self.drain_guest_output(&mut buf)
    }

    /// Copies everything the master has to the terminal and to com1.log.
    fn drain_guest_output(&mut self, buf: &mut [u8]) -> io::Result<()> {
        loop {
            match self.master.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    self.log.write_all(&buf[..n])?;
                    self.screen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .guest_output(&buf[..n], Instant::now())?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: no process has the slave open; ours always is, but be lenient.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Undoes an emulator's changes to the line discipline (see [`is_raw`]).
    fn keep_slave_raw(&self) -> io::Result<()> {
        let settings = get_termios(self.slave.as_raw_fd())?;
        if !is_raw(&settings) {
            set_termios(self.slave.as_raw_fd(), &make_raw(settings))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cooked() -> libc::termios {
        // SAFETY: termios is plain old data; all-zero is a valid value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_iflag = libc::ICRNL | libc::IXON | libc::BRKINT;
        t.c_oflag = libc::OPOST | libc::ONLCR;
        t.c_lflag = libc::ISIG | libc::ICANON | libc::ECHO | libc::IEXTEN;
        t.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        t
    }

    #[test]
    fn raw_settings_pass_bytes_through() {
        let raw = make_raw(cooked());
        assert!(is_raw(&raw));
        assert_eq!(raw.c_cflag & libc::CSIZE, libc::CS8);
        assert_eq!(raw.c_cflag & libc::PARENB, 0);
        assert_ne!(raw.c_cflag & libc::CREAD, 0, "other flags are kept");
        assert_eq!((raw.c_cc[libc::VMIN], raw.c_cc[libc::VTIME]), (1, 0));
        assert!(!is_raw(&cooked()));
    }

    #[test]
    fn bochs_term_settings_are_not_raw() {
        // What Bochs 2.7's serial `mode=term` sets on its tty (serial.cc).
        let mut bochs = make_raw(cooked());
        bochs.c_oflag |= libc::OPOST | libc::ONLCR;
        bochs.c_iflag |= libc::BRKINT;
        bochs.c_lflag |= libc::ISIG;
        assert!(!is_raw(&bochs));
        assert!(is_raw(&make_raw(bochs)));
    }

    #[test]
    fn user_terminal_keeps_output_processing() {
        let t = user_terminal_raw(cooked());
        assert_eq!(t.c_lflag & (libc::ISIG | libc::ICANON | libc::ECHO), 0);
        assert_eq!(
            t.c_oflag & (libc::OPOST | libc::ONLCR),
            libc::OPOST | libc::ONLCR
        );
    }

    #[test]
    fn escape_cuts_the_input() {
        assert_eq!(split_at_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_at_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_escape(b"\x1d"), (&b""[..], true));
        assert_eq!(
            split_at_escape(b"\x03"),
            (&b"\x03"[..], false),
            "Ctrl-C passes"
        );
    }

    fn shown(screen: &mut Screen<Vec<u8>>) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut screen.out)).into_owned()
    }

    #[test]
    fn com2_lines_wait_for_the_end_of_a_com1_line() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        screen.side_line("[hv] first", t0).unwrap();
        assert_eq!(
            shown(&mut screen),
            "[hv] first\n",
            "at a line start: at once"
        );
        screen.guest_output(b"[   67.", t0).unwrap();
        screen.side_line("[hv] INFO  between", t0).unwrap();
        screen.tick(t0 + HOLD / 2).unwrap();
        assert_eq!(
            shown(&mut screen),
            "[   67.",
            "held while the line is unfinished"
        );
        screen
            .guest_output(b"705590] smpboot\r\n[   68", t0)
            .unwrap();
        assert_eq!(
            shown(&mut screen),
            "705590] smpboot\r\n[   68",
            "the chunk ends mid-line: still held"
        );
        screen.guest_output(b".1] x\r\n", t0).unwrap();
        assert_eq!(shown(&mut screen), ".1] x\r\n[hv] INFO  between\n");
    }

    #[test]
    fn a_pending_prompt_is_redrawn_under_held_lines() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        screen.guest_output(b"\r\n~ # \x1b[6nech", t0).unwrap();
        screen.side_line("[hv] WARN  late", t0).unwrap();
        screen.tick(t0 + HOLD / 2).unwrap();
        assert_eq!(shown(&mut screen), "\r\n~ # \x1b[6nech");
        screen.tick(t0 + HOLD).unwrap();
        assert_eq!(
            shown(&mut screen),
            "\r\x1b[K[hv] WARN  late\n~ # ech",
            "row cleared, line written, prompt and typing redrawn without the query"
        );
        screen.guest_output(b"o hi\r\nhi\r\n", t0).unwrap();
        screen.finish().unwrap();
        assert_eq!(shown(&mut screen), "o hi\r\nhi\r\n");
    }

    #[test]
    fn a_long_pending_line_is_not_redrawn() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        let long = "x".repeat(REDRAW_MAX + 1);
        screen.guest_output(long.as_bytes(), t0).unwrap();
        screen.side_line("[hv] late", t0).unwrap();
        shown(&mut screen);
        screen.tick(t0 + HOLD).unwrap();
        assert_eq!(shown(&mut screen), "\n[hv] late\n");
        screen.guest_output(b"y\r\n", t0).unwrap();
        screen.side_line("[hv] next", t0).unwrap();
        assert_eq!(shown(&mut screen), "y\r\n[hv] next\n");
    }

    #[test]
    fn quiet_screen_hides_markers_of_both_consoles() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        screen
            .side_line(r#"[hv] @@tandem {"ev":"load_report","runnable":1}"#, t0)
            .unwrap();
        screen
            .side_line(r#"[hv] @@tandem {"ev":"guest_stopped","guest":"x"}"#, t0)
            .unwrap();
        // COM1 in pieces: a marker line split anywhere is still recognised.
        for chunk in [
            &b"[ 25.1] Run /init\r\n@@tan"[..],
            b"dem {\"ev\":\"agent_ready\"}\r",
            b"\n@@tandem {\"ev\":\"agent_error\"}\r\n@",
            b"home\r\n~ # ",
        ] {
            screen.guest_output(chunk, t0).unwrap();
        }
        assert_eq!(
            shown(&mut screen),
            "[hv] @@tandem {\"ev\":\"guest_stopped\",\"guest\":\"x\"}\n\
             [ 25.1] Run /init\r\n@@tandem {\"ev\":\"agent_error\"}\r\n@home\r\n~ # "
        );
    }

    #[test]
    fn a_line_start_that_might_be_a_marker_waits_at_most_the_hold() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        screen.guest_output(b"@@t", t0).unwrap();
        screen.tick(t0 + HOLD / 2).unwrap();
        assert_eq!(shown(&mut screen), "");
        screen.tick(t0 + HOLD).unwrap();
        assert_eq!(shown(&mut screen), "@@t");
        screen
            .guest_output(b"andem {\"ev\":\"x\"}\r\n", t0)
            .unwrap();
        assert_eq!(
            shown(&mut screen),
            "andem {\"ev\":\"x\"}\r\n",
            "no longer at a line start"
        );
    }

    #[test]
    fn an_overlong_com1_marker_line_is_dropped_whole() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), false);
        let mut line = br#"@@tandem {"ev":"agent_error","x":""#.to_vec();
        line.resize(MAX_MARKER_LINE + 10, b'a');
        line.extend_from_slice(b"\"}\r\nnext\r\n");
        screen.guest_output(&line, t0).unwrap();
        assert_eq!(shown(&mut screen), "next\r\n");
    }

    #[test]
    fn show_markers_shows_everything() {
        let t0 = Instant::now();
        let mut screen = Screen::new(Vec::new(), true);
        screen
            .guest_output(b"@@tandem {\"ev\":\"a\"}\r\n", t0)
            .unwrap();
        screen
            .side_line(r#"[hv] @@tandem {"ev":"load_report"}"#, t0)
            .unwrap();
        assert_eq!(
            shown(&mut screen),
            "@@tandem {\"ev\":\"a\"}\r\n[hv] @@tandem {\"ev\":\"load_report\"}\n"
        );
    }

    #[test]
    fn without_drops_every_copy() {
        assert_eq!(without(b"a\x1b[6nb\x1b[6n", CURSOR_QUERY), b"ab");
        assert_eq!(without(b"\x1b[6", CURSOR_QUERY), b"\x1b[6");
    }

    #[test]
    fn pty_relays_both_ways() {
        let pty = Pty::open().unwrap();
        assert!(
            pty.slave_path().starts_with("/dev/pts"),
            "{:?}",
            pty.slave_path()
        );
        let mut guest = OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.slave_path())
            .unwrap();
        let mut master = File::from(pty.master.try_clone().unwrap());
        guest.write_all(b"hello\r\n").unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 7 && std::time::Instant::now() < deadline {
            let mut buf = [0u8; 64];
            match master.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"hello\r\n", "raw slave: no CR/LF translation");
        master.write_all(b"\x03x\r").unwrap();
        let mut buf = [0u8; 3];
        guest.read_exact(&mut buf).unwrap();
        assert_eq!(
            &buf, b"\x03x\r",
            "raw slave: Ctrl-C and CR arrive as they are"
        );
    }
}
