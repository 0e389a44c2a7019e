//! The Linux PV agent (placeholder until the Linux-guest issue lands).
fn main() {
    eprintln!("tandem-agent: not implemented yet");
    std::process::exit(1);
}
