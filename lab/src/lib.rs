//! The lab: experiments that run many `vmm` processes and measure them. It
//! sits on top of the monitor (it starts `vmm run` children and talks to
//! their API sockets with `vmm_client`), and holds what only experiments
//! need: statistics, progress bars, plots.
//!
//! - [`compare`]: the four memmap strategies side by side, one VM each.
//! - [`density`]: many VMs per strategy, ramped up to a floor of host memory.
//! - [`bench`](mod@bench): boot time, the allocator's fast path, memmap init cost.
//! - [`args`]: command-line values the `vmm` binary shares with these.
//! - [`stats`]: the one definition of a median and a percentile they all use.
//! - [`host`]: what they read about the host and their children (`/proc`).

pub mod args;
pub mod bench;
pub mod compare;
pub mod density;
pub mod host;
pub mod stats;
