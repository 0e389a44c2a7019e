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

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

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

/// The terminal output shared by the relay (COM1 bytes) and the watcher (other lines).
struct Screen {
    /// Whether the last COM1 byte shown ended a line (so a side line needs no line break).
    at_line_start: bool,
}

impl Screen {
    fn guest_output(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()?;
        if let Some(&last) = bytes.last() {
            self.at_line_start = last == b'\n';
        }
        Ok(())
    }

    fn side_line(&mut self, line: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(side_line_text(line, self.at_line_start).as_bytes())?;
        out.flush()?;
        self.at_line_start = true;
        Ok(())
    }
}

/// A line of another console shown between the guest's output: on a line of its own.
fn side_line_text(line: &str, at_line_start: bool) -> String {
    let lead = if at_line_start { "" } else { "\n" };
    format!("{lead}{line}\n")
}

/// The relay between the user's terminal and the guest's COM1; see the module docs.
pub struct Shell {
    stop: Arc<AtomicBool>,
    escaped: Arc<AtomicBool>,
    screen: Arc<Mutex<Screen>>,
    relay: Option<JoinHandle<io::Result<()>>>,
    raw: Option<RawTerminal>,
}

impl Shell {
    /// Puts the terminal in raw mode and starts relaying between it, `pty`'s master and
    /// `com1_log` (appended to). [`ESCAPE`] sets `interrupted`, as Ctrl-C does otherwise.
    pub fn start(pty: Pty, com1_log: &Path, interrupted: Arc<AtomicBool>) -> Result<Shell> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(com1_log)
            .with_context(|| format!("opening {}", com1_log.display()))?;
        let raw = RawTerminal::enter()?;
        let stop = Arc::new(AtomicBool::new(false));
        let escaped = Arc::new(AtomicBool::new(false));
        let screen = Arc::new(Mutex::new(Screen {
            at_line_start: true,
        }));
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

    /// Shows a line of another console (COM2) between the guest's output.
    pub fn show_line(&self, line: &str) {
        let mut screen = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        let _ = screen.side_line(line);
    }

    /// Whether the user pressed [`ESCAPE`].
    pub fn escaped(&self) -> bool {
        self.escaped.load(Ordering::Relaxed)
    }

    /// Stops the relay (after it has copied what COM1 still had), restores the terminal and
    /// reports a relay failure, if there was one.
    pub fn finish(mut self) -> Result<()> {
        let result = self.stop_relay();
        // A prompt is usually left without a line break after it.
        if !self
            .screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .at_line_start
        {
            println!();
        }
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
    screen: Arc<Mutex<Screen>>,
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
                        .guest_output(&buf[..n])?;
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

    #[test]
    fn side_lines_start_on_a_fresh_line() {
        assert_eq!(side_line_text("[hv] x", true), "[hv] x\n");
        assert_eq!(side_line_text("[hv] x", false), "\n[hv] x\n");
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
