//! The flags of `vmm bench` and the benchmarks `--only` selects.

use std::path::PathBuf;

/// Arguments of `vmm bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Directory for bench.json (created if missing).
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    pub out: PathBuf,
    /// Boots per strategy (and of the tracked workload=exit command).
    #[arg(long, default_value_t = 25, value_name = "N")]
    pub boot_runs: usize,
    /// Repetitions of each allocator and memmap measurement.
    #[arg(long, default_value_t = 9, value_name = "N")]
    pub reps: usize,
    /// Order-0 alloc+free pairs per allocator measurement (10 million: long
    /// enough that how long the guest took to boot no longer shows).
    #[arg(long, default_value_t = 10_000_000, value_name = "PAIRS")]
    pub pairs: u64,
    /// Guest memory for the boot and memmap benchmarks, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem_mib: u64,
    /// Guest memory of the "all memory allocated" allocator runs, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub small_mem_mib: u64,
    /// Rounds of the reclaim benchmark (one VM per reclaim mode each).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub reclaim_rounds: usize,
    /// Alloc/free cycles of the reclaim churn, fast and again slow (per VM).
    #[arg(long, default_value_t = 40, value_name = "N")]
    pub churn_cycles: usize,
    /// Which benchmarks to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "boot,alloc,memmap,reclaim", value_name = "LIST")]
    pub only: Vec<Section>,
    /// The vmm binary to benchmark [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<PathBuf>,
}

/// The benchmarks `--only` can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// exec → ready / exit per strategy.
    Boot,
    /// Cycles per order-0 alloc+free pair.
    Alloc,
    /// Cycles per struct page initialized.
    Memmap,
    /// What a guest gives back after it freed 1 GiB, per reclaim mode;
    /// reallocation and alloc/free churn.
    Reclaim,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: BenchArgs,
    }

    #[test]
    fn defaults_and_sections_parse() {
        let a = T::try_parse_from(["bench"]).unwrap().a;
        assert_eq!((a.boot_runs, a.reps, a.pairs, a.mem_mib, a.small_mem_mib), (25, 9, 10_000_000, 2048, 256));
        assert_eq!(a.only, vec![Section::Boot, Section::Alloc, Section::Memmap, Section::Reclaim]);
        assert_eq!((a.reclaim_rounds, a.churn_cycles), (3, 40));
        assert_eq!(a.out, PathBuf::from("bench-results"));
        let a = T::try_parse_from(["bench", "--only", "reclaim", "--reclaim-rounds", "1"]).unwrap().a;
        assert_eq!((a.only, a.reclaim_rounds), (vec![Section::Reclaim], 1));
        let a = T::try_parse_from(["bench", "--only", "memmap,boot", "--vmm", "/x/vmm"]).unwrap().a;
        assert_eq!((a.only, a.vmm), (vec![Section::Memmap, Section::Boot], Some(PathBuf::from("/x/vmm"))));
        assert!(T::try_parse_from(["bench", "--only", "disk"]).is_err());
    }
}
