//! `cargo xtask`: the command-line front end. The work is done in the library (`lib.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use xtask::bench::BenchArgs;
use xtask::image::ImageArgs;
use xtask::partitions::BuildMachine;
use xtask::run::RunArgs;
use xtask::test::TestArgs;

/// Build, package, boot and test Tandem.
///
/// Tandem is a type-1 hypervisor: the image is a GRUB ISO that boots it (multiboot2) with the
/// guests as modules. Without VMX hardware the image runs under Bochs, which emulates VMX.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build every crate for its target: host crates (debug), the hypervisor and
    /// guest-lavender for x86_64-unknown-none (release), guest-linux-pv for
    /// x86_64-unknown-linux-musl (release).
    Build,

    /// Build the boot ISO: GRUB 2 loading the hypervisor with its modules: the Lavender
    /// ELF (`lavender`), the validated partition configuration (`partitions`), the Linux
    /// kernel (`linux`) and its initramfs with the PV agent as /init (`initrd`). The kernel
    /// is Debian's pinned cloud kernel (downloaded once with `apt-get download`, SHA-256
    /// checked, cached in target/tandem/cache/) unless --linux-kernel is given (its bzImage
    /// header is checked first). The configuration is checked for a 4-core, 1 GiB machine.
    /// The hypervisor and Lavender go on the ISO without debug info (GRUB reads every byte;
    /// --keep-debug-info keeps it, to measure the difference);
    /// their full ELFs, for symbolising panics (`addr2line -e`), are written beside the ISO
    /// in <ISO without .iso>.debug/ (default target/tandem/tandem.debug/hypervisor and
    /// lavender). A failed build leaves the previous ISO and ELFs in place.
    Image {
        #[command(flatten)]
        image: ImageArgs,

        /// Where to write the ISO.
        #[arg(long, value_name = "PATH", default_value_os_t = xtask::image::default_iso())]
        out: PathBuf,
    },

    /// Build the image and boot it, showing the consoles live (the hypervisor logs on COM2).
    /// On a terminal the terminal becomes the Linux shell (COM1, raw mode: Ctrl-C goes to
    /// Linux) with the COM2 lines shown between its output, and Ctrl-] stops the run; with
    /// --batch or without a terminal both consoles are printed and Ctrl-C stops the run.
    /// Ends at a fatal/panic marker (exit 1), at the --until marker (exit 0), at --timeout
    /// (exit 124) or on Ctrl-] (terminal) / Ctrl-C (--batch) (exit 130), always stopping the
    /// emulator and keeping the logs in target/tandem/runs/run-<emulator>-<UTC time>/.
    /// Rust targets missing from rust-toolchain.toml's toolchain are installed first.
    Run(RunArgs),

    /// Run every test stage: host unit tests, the loom model check, bounded fuzzing, the
    /// bare-metal build, and the end-to-end scenarios (booting the image in emulators, two
    /// at a time). Prints a summary with each stage's and scenario's wall time, ending in
    /// `N passed, N failed` over every test that ran (unit and loom tests, fuzz targets,
    /// scenarios; a stage that failed on its own counts as one failure).
    ///
    /// What rustup can give is installed first, saying why: rust-toolchain.toml's targets
    /// and, for fuzzing, the nightly toolchain and cargo-fuzz (fuzzing needs both; pass
    /// --fuzz-seconds 0 to skip it). Without rustup or network the error gives the command.
    Test(TestArgs),

    /// Measure and report timings; nothing passes or fails on them (that is what `test` is
    /// for). Prints a table per part and saves the results as JSON in
    /// target/tandem/bench/<UTC time>.json (copied to latest.json).
    ///
    /// cores: boots tests/configs/lavender-cores.toml under Bochs with the hypervisor's
    /// `core_test=SEED:CYCLES` (it grants and revokes cores 2 and 3 to Lavender while its
    /// parallel worker runs) and reports, as count / median / p90 / worst in µs: grant posted
    /// -> first thread running on the core (the hypervisor's grant paired with Lavender's
    /// first scheduler pass on that core), the hypervisor's bring-up (grant -> vCPU entered)
    /// and release (revoke -> core parked) with their stages, and Lavender's own stages.
    /// Time is the TSC under Bochs with `clock: sync=none`: virtual and deterministic for the
    /// emulator settings, which the report names. A run takes about a minute of wall time.
    ///
    /// ring: `cargo bench -p vmcall-proto --bench ring` in its interleaved A/B mode
    /// (RING_AB=TRIALS): ns per 64-byte message of our ring and of rtrb, single, batch32,
    /// round trip and framed cases, with the paired ratio. Host wall-clock time: it depends
    /// on the machine and its load.
    Bench(BenchArgs),
}

/// `cargo xtask image`: bad input first, then the toolchain, then the build.
fn image_command(image: &ImageArgs, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    if let Some(kernel) = &image.linux_kernel {
        xtask::bzimage::check_file(kernel)?;
    }
    xtask::toolchain::ensure_targets()?;
    let iso = image.build(out, BuildMachine::default())?;
    println!("==> image ready: {}", iso.display());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // The version names the commit too; clap wants it for the whole run.
    let version: &'static str = Box::leak(xtask::version().into_boxed_str());
    let cli = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&cli) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Build => xtask::toolchain::ensure_targets()
            .and_then(|()| xtask::build::all())
            .map(|_| ExitCode::SUCCESS),
        Command::Image { image, out } => image_command(&image, &out),
        Command::Run(args) => xtask::run::run(args),
        Command::Test(args) => xtask::test::run(args),
        Command::Bench(args) => {
            xtask::toolchain::ensure_targets().and_then(|()| xtask::bench::run(args))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
