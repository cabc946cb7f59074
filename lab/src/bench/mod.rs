//! `vmm bench`: the project's benchmarks (`make bench`), run against real
//! `vmm run` child processes and reported as medians and ratios from one run.
//!
//! Four benchmarks, each repeated and interleaved so that drift on a shared
//! host hits every variant alike:
//!
//! 1. **Boot**: exec → guest ready and exec → exit for each memmap strategy
//!    at 2 GiB (`parallel` with 2 vCPUs, the others with 1), plus the
//!    whole-process time of the tracked `--guest-cpl 3 workload=exit` command.
//!    exec → exit is the wall time around spawn + wait; exec → ready is
//!    `timings.guest_ready` of the child's `--report json` memory report (µs
//!    from the child's `main`, so it leaves out the exec itself, well under
//!    1 ms).
//! 2. **Allocator fast path**: in-guest TSC cycles per order-0 alloc+free
//!    pair (`--bench-alloc-free`), with the on-demand grow check on and off,
//!    next to `eager`, in idle 2 GiB guests and in small guests whose memory
//!    is (nearly) all allocated, so that each ratio compares like states.
//! 3. **Memmap initialization cost per struct page**: `init_cycles /
//!    pages_initialized` from the guest's own report, per strategy.
//! 4. **Reclaim**: what a 2 GiB ondemand guest that held 1 GiB and freed
//!    it gives back per reclaim mode (`full`, `data`, `off`): guest RAM and
//!    memmap resident, KVM-registered bytes, time to settle; the cost of
//!    allocating 1 GiB again against the first time; and alloc/free churn
//!    around the reclaim reserve, `full` against `off`.
//!
//! Results go to `--out DIR/bench.json` (every raw sample, the host, each
//! command line); a short table goes to stdout and progress to stderr. No
//! figure is ever asserted: benchmarks measure, tests check.
//!
//! The parts: `args` ([`BenchArgs`]), `child` (running one `vmm run` and reading
//! its stdout), `boot`, `alloc`, `memmap` and `reclaim` (one benchmark each), `results`
//! (`bench.json` and the table) and `runner` (the entry point, [`run`]).

mod alloc;
mod args;
mod boot;
mod child;
mod memmap;
mod reclaim;
mod results;
mod runner;

pub use args::{BenchArgs, Section};
pub use runner::run;
