//! What `vmm run` asks the controller to do once the guest is ready (the
//! "script": allocate, benchmark, report, shut down), and what it hands back.

/// How `vmm run` reports, once the guest is ready and its workload ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Json,
    Table,
}

/// What `vmm run` does once the guest is ready.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Make the guest hold this much memory first.
    pub alloc_mib: Option<u64>,
    /// Print the memory report, then shut the guest down.
    pub report: Option<ReportFormat>,
    /// Then make the guest hold this much instead (e.g. fill memory, so the
    /// allocator initializes everything, then free it).
    pub then_target_mib: Option<u64>,
    /// Benchmark: this many order-0 alloc+free pairs in the guest (after
    /// the allocation, before the report).
    pub bench_alloc_free: Option<u64>,
}

impl Script {
    /// Whether the script waits for the guest (to be ready, then to answer).
    pub fn needs_guest(&self) -> bool {
        self.alloc_mib.is_some() || self.report.is_some() || self.bench_alloc_free.is_some()
    }
}

/// Result of the guest's allocator benchmark.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BenchResult {
    pub pairs: u64,
    pub cycles: u64,
    pub cycles_per_pair: f64,
    pub grow_check_on: bool,
    /// The grow check's jump sites were patched out of the code.
    pub jump_sites_patched: bool,
    pub ok: bool,
}
