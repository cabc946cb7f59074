//! `vmm ps`: one line per VM found in the runtime directory (or in the
//! `--dir` directories), with its state, size, uptime and memory figures,
//! and the totals; or the same rows as JSON.

use crate::fleet::{self, Row, Totals};
use crate::runtime_dir;
use api::ErrorChain;
use clap::ValueEnum;
use serde::Serialize;
use std::path::PathBuf;

const PS_EXAMPLES: &str = "\
Examples:
  vmm ps                          the VMs in the runtime directory
  vmm ps --sort pss               the largest VMM processes first
  vmm ps --dir /tmp/lab --json    the VMs in /tmp/lab, as JSON
  vmm ps --prometheus             every VM's figures for Prometheus, an `id` label each

A VM that does not answer within 500 ms is listed as such; a socket nobody
listens on is listed as dead.";

/// Which VMs to list and in what order: the arguments `vmm ps` and
/// `vmm top` share.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Look for VM sockets in this directory (repeat for more) [default: the
    /// runtime directory, as for `vmm run`].
    #[arg(long, value_name = "DIR")]
    pub dir: Vec<PathBuf>,
    /// Order of the lines: by id, state or strategy A to Z, by a figure
    /// largest first.
    #[arg(long, value_enum, default_value = "id", value_name = "COLUMN")]
    pub sort: SortColumn,
}

/// Arguments of `vmm ps`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = PS_EXAMPLES)]
pub struct PsArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Print the rows and the totals as one JSON object.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print every VM's figures in Prometheus' text format, one `id` label
    /// per VM (one scrape target per host).
    #[arg(long)]
    pub prometheus: bool,
}

/// What `--sort` orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortColumn {
    /// VM id.
    Id,
    /// Life-cycle state.
    State,
    /// vCPUs.
    Vcpus,
    /// Configured memory.
    Memory,
    /// Memmap strategy.
    Strategy,
    /// Time since start.
    Uptime,
    /// Memmap initialized by the guest.
    MemmapInit,
    /// Memmap resident on the host.
    MemmapRes,
    /// Guest RAM resident.
    RamRes,
    /// Guest RAM registered with KVM.
    Kvm,
    /// VMM PSS.
    Pss,
}

/// `vmm ps --json`.
#[derive(Debug, Serialize)]
struct Listing<'a> {
    vms: &'a [Row],
    total: Totals,
}

/// Sorts `rows` by `column` (ties by id).
pub fn sort(rows: &mut [Row], column: SortColumn) {
    let figure = |r: &Row| -> Option<u64> {
        match column {
            SortColumn::Vcpus => r.vcpus.map(u64::from),
            SortColumn::Memory => r.mem_size_mib,
            SortColumn::Uptime => r.uptime_s,
            SortColumn::MemmapInit => r.memmap_initialized_bytes,
            SortColumn::MemmapRes => r.memmap_resident_bytes,
            SortColumn::RamRes => r.guest_ram_resident_bytes,
            SortColumn::Kvm => r.kvm_registered_bytes,
            SortColumn::Pss => r.vmm_pss_bytes,
            SortColumn::Id | SortColumn::State | SortColumn::Strategy => None,
        }
    };
    rows.sort_by(|a, b| {
        let by = match column {
            SortColumn::Id => std::cmp::Ordering::Equal,
            SortColumn::State => a.state.cmp(&b.state),
            SortColumn::Strategy => a.strategy.map(api::Strategy::name).cmp(&b.strategy.map(api::Strategy::name)),
            _ => figure(b).cmp(&figure(a)),
        };
        by.then_with(|| a.id.cmp(&b.id))
    });
}

/// The VMs in `dirs`, sorted.
pub fn gather(dirs: &[PathBuf], column: SortColumn) -> Result<Vec<Row>, fleet::ListSocketsError> {
    let mut socks = Vec::new();
    for dir in dirs {
        socks.extend(fleet::sockets(dir)?);
    }
    let mut rows = fleet::query_all(&socks, fleet::PER_VM_TIMEOUT);
    sort(&mut rows, column);
    Ok(rows)
}

/// The directories to look in: `--dir`, else the runtime directory.
pub fn dirs(given: &[PathBuf]) -> Vec<PathBuf> {
    if given.is_empty() {
        vec![runtime_dir::resolve(&runtime_dir::Sources::of_this_process(None))]
    } else {
        given.to_vec()
    }
}

/// Runs `vmm ps`; the exit code.
pub fn run(args: PsArgs) -> u8 {
    let rows = match gather(&dirs(&args.fleet.dir), args.fleet.sort) {
        Ok(rows) => rows,
        Err(e) => {
            crate::stdio::eprint_line(format_args!("vmm: error: {}", ErrorChain(&e)));
            return 1;
        }
    };
    let total = Totals::of(&rows);
    if args.prometheus {
        crate::stdio::print(&crate::prometheus::exposition(&rows));
    } else if args.json {
        let listing = Listing { vms: &rows, total };
        match serde_json::to_string_pretty(&listing) {
            Ok(s) => crate::stdio::print(&format!("{s}\n")),
            Err(e) => {
                crate::stdio::eprint_line(format_args!("vmm: error: {e}"));
                return 1;
            }
        }
    } else {
        crate::stdio::print(&crate::render::ps_table(&rows, &total));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Reach;

    fn row(id: &str, pss: Option<u64>) -> Row {
        Row { vmm_pss_bytes: pss, ..Row::without_figures(id.into(), id.as_ref(), Reach::Answered) }
    }

    #[test]
    fn figures_sort_largest_first_and_names_a_to_z() {
        let mut rows = vec![row("b", Some(1)), row("a", Some(1)), row("c", Some(9)), row("d", None)];
        sort(&mut rows, SortColumn::Pss);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b", "d"]);
        sort(&mut rows, SortColumn::Id);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
    }

    #[test]
    fn no_dir_means_the_runtime_directory() {
        assert_eq!(dirs(&["/x".into()]), vec![PathBuf::from("/x")]);
        assert_eq!(dirs(&[]).len(), 1);
    }
}
