//! `vmm density`: hundreds of microVMs on one host, measured (placeholder).

/// Arguments of `vmm density`.
#[derive(Debug, Clone, clap::Args)]
pub struct DensityArgs {}

/// Runs the experiment; returns the process exit code.
pub fn run(_args: DensityArgs) -> u8 {
    eprintln!("vmm density: not implemented yet");
    1
}
