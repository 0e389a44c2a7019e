//! Doorbells between the agent and Lavender, both ways, through the hypervisor's `DOORBELL`
//! hypercall (the doorbell rule of `vmcall_proto::ring`: a sleeper raises its ring's
//! `consumer_waiting` flag and looks once more; a producer that finds the flag up rings).
//!
//! * **Into Linux** without a module of ours: the hypervisor shows Linux a virtual PCI device
//!   (`vmcall_proto::doorbell`) that Linux's stock `uio_pci_generic` drives. PID 1 loads that
//!   driver from the pinned kernel's own modules and binds the device by its IDs
//!   ([`load_driver`]). In each process that waits for Lavender (PID 1 for the control
//!   connection, the delegation server for the process connections) one thread
//!   ([`listen`]) unmasks the device's interrupt and blocks in `read()` on `/dev/uioN`; each
//!   return rings the process's [`BELL`], on which the waiting threads sleep. A ring that comes
//!   while the interrupt is masked is latched by the device and raised at the unmask, so none
//!   is lost between two `read()`s. The hypervisor rings the same device after it puts a core
//!   event on Linux's control ring, for PID 1's hotplug actor ([`also_wake`]).
//! * **Into Lavender**: `DOORBELL` with the region's base and the holder token ([`Ringer`]),
//!   after a push that finds Lavender's flag up.
//!
//! Without the device (a kernel of the user's, whose modules Tandem does not have) the waiters
//! fall back to polling with a back-off, as before doorbells existed.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use vmcall_proto::doorbell::{COMMAND_HIGH_BYTE, DEVICE_ID, VENDOR_ID};
use vmcall_proto::hypercall::{vmcall, Hypercall};

/// Where the initramfs keeps the kernel modules (xtask's `initramfs::MODULES`), and the ones
/// the doorbell needs, in load order.
const MODULES_DIR: &str = "/lib/modules/tandem";
const MODULES: [&str; 2] = ["uio.ko", "uio_pci_generic.ko"];
const NEW_ID: &str = "/sys/bus/pci/drivers/uio_pci_generic/new_id";
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The longest a waiter sleeps on [`BELL`]: a safety net, since no ring is lost (the device
/// latches one it cannot raise, and the hypervisor raises it again when Linux reprograms the
/// interrupt's route); it bounds how late a waiter notices the listener gone.
pub const FALLBACK: Duration = Duration::from_millis(200);
/// How long the bound device's `/dev/uioN` may take to appear.
const BIND_WAIT: Duration = Duration::from_secs(2);

/// Something threads sleep on until the doorbell rings (or their timeout).
pub struct Bell {
    generation: Mutex<u64>,
    rang: Condvar,
}

impl Bell {
    const fn new() -> Self {
        Self {
            generation: Mutex::new(0),
            rang: Condvar::new(),
        }
    }

    /// Read before the last look at the ring; pass it to [`Bell::wait`].
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until a ring after generation `seen`, or `timeout`. Whether the whole
    /// `timeout` passed without a ring.
    pub fn wait(&self, seen: u64, timeout: Duration) -> bool {
        let generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        self.rang
            .wait_timeout_while(generation, timeout, |now| *now == seen)
            .is_ok_and(|(_, result)| result.timed_out())
    }

    fn ring(&self) {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.rang.notify_all();
    }
}

/// This process's bell, rung by its [`listen`] thread.
pub static BELL: Bell = Bell::new();
/// Whether a [`listen`] thread runs in this process (else nobody rings [`BELL`]).
static LISTENING: AtomicBool = AtomicBool::new(false);
/// A thread that waits in `park` rather than on [`BELL`], unparked at each ring as well.
static ALSO_WAKE: OnceLock<Thread> = OnceLock::new();

/// Has this process's listener unpark `thread` at every ring too (one thread per process:
/// PID 1's hotplug actor, which the hypervisor's control events come to by the doorbell and
/// which `vmctl move-core` also unparks).
pub fn also_wake(thread: Thread) {
    let _ = ALSO_WAKE.set(thread);
}
/// The device's interrupts as this process's listener last read them (`/dev/uioN`'s count,
/// which counts every interrupt since the driver bound the device).
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

/// The doorbell device's interrupts so far, as this process's listener last heard of them.
pub fn interrupts() -> u32 {
    INTERRUPTS.load(Ordering::Relaxed)
}

/// Whether [`load_driver`] bound the device (inherited by the forked server).
static BOUND: AtomicBool = AtomicBool::new(false);

/// Whether this process hears Lavender's doorbell.
pub fn listening() -> bool {
    LISTENING.load(Ordering::Relaxed)
}

/// Loads `uio_pci_generic` from the initramfs and binds the doorbell device to it. PID 1, once,
/// before [`listen`].
pub fn load_driver() -> Result<(), String> {
    for module in MODULES {
        let path = Path::new(MODULES_DIR).join(module);
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading {}: {}", path.display(), e.desc())),
        }
    }
    // The driver matches no device by itself; this adds the doorbell's IDs (and binds it).
    match fs::write(NEW_ID, format!("{VENDOR_ID:04x} {DEVICE_ID:04x}")) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
        Err(e) => return Err(format!("{NEW_ID}: {e}")),
    }
    BOUND.store(true, Ordering::Relaxed);
    Ok(())
}

/// The doorbell device's sysfs directory and its `/dev/uioN`, once bound.
fn find_device() -> Result<(PathBuf, PathBuf), String> {
    let deadline = std::time::Instant::now() + BIND_WAIT;
    loop {
        let found = fs::read_dir(PCI_DEVICES)
            .map_err(|e| format!("{PCI_DEVICES}: {e}"))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|dir| {
                let id = |name| fs::read_to_string(dir.join(name)).unwrap_or_default();
                id("vendor").trim() == format!("{VENDOR_ID:#06x}")
                    && id("device").trim() == format!("{DEVICE_ID:#06x}")
            });
        let Some(dir) = found else {
            return Err(
                "no doorbell device on the PCI bus (is `pci=noacpi` on the kernel \
                        command line?)"
                    .into(),
            );
        };
        let uio = fs::read_dir(dir.join("uio"))
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|entry| entry.ok())
            .map(|entry| Path::new("/dev").join(entry.file_name()));
        match uio {
            Some(node) if node.exists() => return Ok((dir, node)),
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return Err(format!("{} is not bound to uio_pci_generic", dir.display())),
        }
    }
}

/// Starts this process's listener thread: it unmasks the device and blocks in `read()` until
/// Lavender rings, then rings [`BELL`], for good. Nothing to do (and no error: it was
/// reported) when [`load_driver`] failed.
pub fn listen() -> Result<(), String> {
    if !BOUND.load(Ordering::Relaxed) {
        return Ok(());
    }
    let (dir, node) = find_device()?;
    let mut uio = File::open(&node).map_err(|e| format!("{}: {e}", node.display()))?;
    let config_path = dir.join("config");
    let config = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&config_path)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    std::thread::Builder::new()
        .name("doorbell".into())
        .spawn(move || {
            // Whoever sleeps on the bell (PID 1's control connection, the delegation server's
            // service threads) waits on this thread: it must not wait behind a CPU load.
            if let Err(e) = crate::system::run_ahead_of_ordinary_tasks() {
                crate::report::emit(&crate::report::error("doorbell_priority", &e, |_| {}));
            }
            let mut count = [0u8; 4];
            loop {
                // Clear Interrupt Disable: the command register's high byte holds no other
                // bit the device implements. A ring latched meanwhile is raised now.
                if config.write_all_at(&[0], COMMAND_HIGH_BYTE).is_err()
                    || uio.read_exact(&mut count).is_err()
                {
                    // The device went away: the waiters' timeouts carry on for it.
                    LISTENING.store(false, Ordering::Relaxed);
                    return;
                }
                INTERRUPTS.store(u32::from_ne_bytes(count), Ordering::Relaxed);
                BELL.ring();
                if let Some(thread) = ALSO_WAKE.get() {
                    thread.unpark();
                }
            }
        })
        .map_err(|e| format!("cannot start the doorbell thread: {e}"))?;
    LISTENING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Rings Lavender's doorbell for the region both share.
pub struct Ringer {
    /// The region's guest-physical base in Linux (its `tandem.shared=` word).
    base: u64,
    token: u64,
}

/// Lavender's doorbell, set once by PID 1 before the delegation server forks (it inherits it).
static LAVENDER: OnceLock<Ringer> = OnceLock::new();

/// Sets up [`wake_lavender`] for the region at `base`, with the holder token `token`.
pub fn set_lavender(base: u64, token: u64) {
    let _ = LAVENDER.set(Ringer { base, token });
}

/// After a push to Lavender: rings its doorbell if `needed` (the producer's `wake_needed`).
/// Whether it rang.
pub fn wake_lavender(needed: bool) -> bool {
    let Some(ringer) = LAVENDER.get().filter(|_| needed) else {
        return false;
    };
    // SAFETY: the token was read from the hypervisor's control region (the agent runs as a
    // Tandem guest, where VMCALL is defined); `DOORBELL` only sends Lavender an interrupt and
    // touches no memory.
    unsafe { vmcall(Hypercall::Doorbell, [ringer.base, 0, 0, 0, 0], ringer.token) }.is_ok()
}
