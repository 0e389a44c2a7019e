//! Linux's own load, as `vmctl status` shows it beside Lavender's reports: how busy each online
//! CPU was over the last second (from `/proc/stat`), the runnable tasks (`procs_running`) and
//! the CPU pressure (`/proc/pressure/cpu`, when the kernel has PSI). One sampler reads the
//! kernel's counters: the load reporter (`load_report`) hands each `/proc/stat` it reads to
//! [`StatusSampler::observe`], which turns them into a sample once a second; readers take the
//! last sample. Display only: no policy reads it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PERIOD: Duration = Duration::from_secs(1);

/// The last sample, as JSON for the status reply (`null` until the second reading).
static LAST: Mutex<Option<Value>> = Mutex::new(None);

/// A kernel file read again and again (`/proc/stat`, `/proc/loadavg`, ...), kept open: each
/// reading is one `pread` from offset 0, which makes the kernel generate the text anew. Under
/// Bochs, opening the file and reading it in growing pieces (as `fs::read_to_string` does
/// with a file that reports no size) took 5 to 9 system calls and most of a millisecond per
/// file, every few milliseconds, on a CPU Linux's other work needed.
pub struct KernelFile {
    file: File,
    text: Vec<u8>,
}

impl KernelFile {
    pub fn open(path: &str) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
            text: vec![0; 4096],
        })
    }

    /// The file's text now (its valid UTF-8 prefix, which is all of it for these files).
    pub fn read(&mut self) -> io::Result<&str> {
        loop {
            let len = self.file.read_at(&mut self.text, 0)?;
            // A reading that filled the buffer may have been cut short: read it whole again.
            if len < self.text.len() {
                let text = &self.text[..len];
                return Ok(match std::str::from_utf8(text) {
                    Ok(text) => text,
                    Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
                });
            }
            let longer = self.text.len() * 2;
            self.text.resize(longer, 0);
        }
    }
}

/// One CPU's line of `/proc/stat`: (CPU number, busy ticks, all ticks).
pub type CpuTicks = (u32, u64, u64);

/// Makes a sample for `vmctl status` from the readings the load reporter takes, once
/// [`PERIOD`] has passed since the last one.
pub struct StatusSampler {
    before: Option<(Instant, Vec<CpuTicks>)>,
}

impl StatusSampler {
    pub const fn new() -> Self {
        Self { before: None }
    }

    /// A reading of `/proc/stat` (`stat`) and of `/proc/pressure/cpu` (`psi`, if the kernel
    /// has it) taken at `now`.
    pub fn observe(&mut self, stat: &str, psi: Option<&str>, now: Instant) {
        let ticks = cpu_ticks(stat);
        let Some((at, before)) = &self.before else {
            self.before = Some((now, ticks));
            return;
        };
        if now.duration_since(*at) < PERIOD {
            return;
        }
        let sample = sample(before, &ticks, stat, psi);
        *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample);
        self.before = Some((now, ticks));
    }
}

/// The status sample between two readings of `/proc/stat`.
fn sample(before: &[CpuTicks], now: &[CpuTicks], stat: &str, psi: Option<&str>) -> Value {
    let busy = busy_permille(before, now);
    let mean = if busy.is_empty() {
        0
    } else {
        busy.iter().map(|&(_, b)| b).sum::<u64>() / busy.len() as u64
    };
    json!({
        "busy_permille": mean,
        "per_cpu": busy.iter().map(|&(cpu, b)| json!({"cpu": cpu, "busy_permille": b})).collect::<Vec<_>>(),
        "runnable": procs_running(stat),
        "psi_some_avg10": psi.and_then(psi_some_avg10),
        "source": "/proc/stat",
    })
}

/// The last sample (`null` before the sampler has two readings).
pub fn last() -> Value {
    LAST.lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or(Value::Null)
}

/// The `cpuN` lines of `/proc/stat`: user nice system idle iowait irq softirq steal ...;
/// idle and iowait are the idle ticks, the rest (up to steal) busy.
pub fn cpu_ticks(stat: &str) -> Vec<CpuTicks> {
    stat.lines()
        .filter_map(|line| {
            let mut words = line.split_ascii_whitespace();
            let cpu: u32 = words.next()?.strip_prefix("cpu")?.parse().ok()?;
            let ticks: Vec<u64> = words.take(8).map_while(|w| w.parse().ok()).collect();
            if ticks.len() < 4 {
                return None;
            }
            let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
            let all: u64 = ticks.iter().sum();
            Some((cpu, all - idle, all))
        })
        .collect()
}

/// Per CPU present in both readings with ticks in between: busy per mille.
pub fn busy_permille(before: &[CpuTicks], now: &[CpuTicks]) -> Vec<(u32, u64)> {
    now.iter()
        .filter_map(|&(cpu, busy, all)| {
            let &(_, busy0, all0) = before.iter().find(|t| t.0 == cpu)?;
            let span = all.checked_sub(all0).filter(|&s| s > 0)?;
            Some((cpu, busy.saturating_sub(busy0).min(span) * 1000 / span))
        })
        .collect()
}

/// `procs_running N` of `/proc/stat`.
pub fn procs_running(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("procs_running "))
        .and_then(|n| n.trim().parse().ok())
}

/// `avg10` of the `some` line of `/proc/pressure/cpu` (percent of time some task waited).
pub fn psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_file_reads_whole_and_anew_each_time() {
        let path = std::env::temp_dir().join(format!("kernel-file-{}", std::process::id()));
        let long: String = (0..2000).map(|i| format!("{i} ")).collect();
        std::fs::write(&path, &long).unwrap();
        let mut file = KernelFile::open(path.to_str().unwrap()).unwrap();
        assert_eq!(file.read().unwrap(), long, "longer than the first buffer");
        std::fs::write(&path, "0-2\n").unwrap();
        assert_eq!(file.read().unwrap(), "0-2\n", "read again from the start");
        std::fs::remove_file(&path).unwrap();

        let mut loadavg = KernelFile::open("/proc/loadavg").unwrap();
        let first = loadavg.read().unwrap().to_owned();
        assert!(crate::load_report::runnable(&first, 0).is_some(), "{first}");
        assert!(crate::load_report::runnable(loadavg.read().unwrap(), 0).is_some());
    }

    const STAT: &str = "cpu  10 0 10 80 0 0 0 0 0 0\n\
cpu0 5 0 5 40 0 0 0 0 0 0\n\
cpu1 5 0 5 40 0 0 0 0 0 0\n\
intr 1 2 3\nprocs_running 3\nprocs_blocked 0\n";

    #[test]
    fn per_cpu_busy_from_two_readings() {
        let before = cpu_ticks(STAT);
        assert_eq!(before, [(0, 10, 50), (1, 10, 50)]);
        // CPU 0 busy the whole time, CPU 1 idle, CPU 3 only in the second reading.
        let now = cpu_ticks("cpu0 105 0 5 40 0\ncpu1 5 0 5 140 0\ncpu3 1 1 1 1\n");
        assert_eq!(busy_permille(&before, &now), [(0, 1000), (1, 0)]);
        assert_eq!(procs_running(STAT), Some(3));
    }

    #[test]
    fn the_sampler_makes_a_sample_once_a_second() {
        let mut sampler = StatusSampler::new();
        let t0 = Instant::now();
        sampler.observe(STAT, None, t0);
        // Too soon: the reading is not a sample yet.
        sampler.observe("cpu0 105 0 5 40 0\ncpu1 5 0 5 140 0\n", None, t0);
        let psi = "some avg10=2.00 avg60=0 avg300=0 total=1\n";
        sampler.observe(
            "cpu0 105 0 5 40 0\ncpu1 5 0 5 140 0\nprocs_running 2\n",
            Some(psi),
            t0 + PERIOD,
        );
        let shown = last();
        assert_eq!(shown["busy_permille"], 500);
        assert_eq!(shown["runnable"], 2);
        assert_eq!(shown["psi_some_avg10"], 2.0);
        assert_eq!(shown["per_cpu"][0]["busy_permille"], 1000);
    }

    #[test]
    fn pressure_and_garbage() {
        let psi = "some avg10=12.50 avg60=3.00 avg300=0.10 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(psi_some_avg10(psi), Some(12.5));
        assert_eq!(psi_some_avg10("nonsense"), None);
        assert!(cpu_ticks("cpuX 1 2 3 4\ncpu0 1 2\n").is_empty());
        assert_eq!(procs_running(""), None);
        // A counter that went backwards (CPU offline and online again) gives no figure.
        assert!(busy_permille(&[(1, 50, 100)], &[(1, 10, 90)]).is_empty());
    }
}
