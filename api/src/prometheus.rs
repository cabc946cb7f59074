//! A VM's counters ([`Metrics`], `GET /metrics`) and memory figures
//! ([`MemoryReport`], `GET /memory`) in Prometheus' text exposition format,
//! version 0.0.4 ([`CONTENT_TYPE`]): what fleet monitoring scrapes.
//!
//! One renderer, [`Exposition`], serves both a VM's own `GET /metrics`
//! answered as text ([`vm`], no labels) and the whole host's
//! `vmm ps --prometheus` (the same families, each sample with an `id` label
//! per VM, plus what only the fleet listing knows). Samples of one family
//! are written together under one `# HELP` and `# TYPE`, whatever order they
//! were added in, as the format requires.
//!
//! Names follow Prometheus' conventions: the `vmm_` prefix, the unit in the
//! name (`_bytes`, `_seconds`), `_total` on counters and only on counters.
//! Sizes the API gives in pages are turned into bytes. The guest's figures
//! are written only while its report is valid (`vmm_guest_report_valid`).
//! Pure text, no I/O.
//!
//! ```
//! use api::{prometheus, MemoryReport, Metrics};
//!
//! let text = prometheus::vm(&Metrics::default(), Some(&MemoryReport::example()));
//! assert!(text.contains("# TYPE vmm_api_requests_total counter\nvmm_api_requests_total 0\n"));
//! assert!(text.contains("\nvmm_guest_ram_bytes 2147483648\n"));
//!
//! let mut fleet = prometheus::Exposition::new();
//! for id in ["a", "b"] {
//!     fleet.memory(&[("id", id)], &MemoryReport::example());
//! }
//! assert!(fleet.text().contains("vmm_guest_ram_bytes{id=\"a\"} 2147483648\nvmm_guest_ram_bytes{id=\"b\"} 2147483648\n"));
//! ```

use crate::memory::{BootTimings, GuestMemoryView, HostMemoryView, MemoryReport, ReclaimView};
use crate::metrics::{Metrics, VmExitCounts};
use guest_abi::PAGE_SIZE;
use std::fmt::Write;

/// The `Content-Type` of an exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's type, as its `# TYPE` line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (restarts at 0 with the VMM); its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A sample's value: an exact integer or a float.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    /// Written as it is (exact above 2^53, which a float would not be).
    Int(u64),
    /// Written as Prometheus reads floats (`NaN`, `+Inf`, `-Inf` included).
    Float(f64),
}

impl From<u64> for Number {
    fn from(v: u64) -> Number {
        Number::Int(v)
    }
}

impl From<u32> for Number {
    fn from(v: u32) -> Number {
        Number::Int(v.into())
    }
}

impl From<u8> for Number {
    fn from(v: u8) -> Number {
        Number::Int(v.into())
    }
}

impl From<bool> for Number {
    /// 1 for true, 0 for false.
    fn from(v: bool) -> Number {
        Number::Int(v.into())
    }
}

impl From<f64> for Number {
    fn from(v: f64) -> Number {
        Number::Float(v)
    }
}

/// A sample's labels: name (a valid Prometheus label name) and value (any
/// text; it is escaped).
pub type Labels<'a> = &'a [(&'static str, &'a str)];

/// One family: its name, help, type, and its sample lines so far.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: String,
}

/// An exposition being built: families in the order first added, each with
/// its samples in the order added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Adds one sample of the family `name` (created with `help` and `kind`
    /// the first time). `name` must be a valid metric name.
    pub fn add(&mut self, name: &'static str, help: &'static str, kind: Kind, labels: Labels<'_>, value: impl Into<Number>) {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family { name, help, kind, samples: String::new() });
                self.families.len() - 1
            }
        };
        let out = &mut self.families[i].samples;
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (n, (label, value)) in labels.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{label}=\"{}\"", escape(value));
            }
            out.push('}');
        }
        let _ = match value.into() {
            Number::Int(v) => writeln!(out, " {v}"),
            Number::Float(v) if v.is_nan() => writeln!(out, " NaN"),
            Number::Float(v) if v.is_infinite() => writeln!(out, " {}Inf", if v > 0.0 { '+' } else { '-' }),
            Number::Float(v) => writeln!(out, " {v}"),
        };
    }

    /// The counters of `GET /metrics`, each sample with `labels`.
    pub fn counters(&mut self, labels: Labels<'_>, metrics: &Metrics) {
        // Taken apart without `..`: a counter added to the API does not
        // compile here until it has a name.
        let Metrics {
            vm_exits,
            api_requests,
            api_errors,
            guest_commands,
            serial_bytes,
            serial_bytes_dropped,
            stdio_lines_dropped,
            guest_protocol_errors,
            log_lines_dropped,
            metrics_lines_dropped,
        } = metrics;
        let VmExitCounts { io_in, io_out, mmio_read, mmio_write, hlt, shutdown, system_event, failed, other } = vm_exits;
        let exits = [
            ("io_in", io_in),
            ("io_out", io_out),
            ("mmio_read", mmio_read),
            ("mmio_write", mmio_write),
            ("hlt", hlt),
            ("shutdown", shutdown),
            ("system_event", system_event),
            ("failed", failed),
            ("other", other),
        ];
        for (reason, n) in exits {
            let labels = with(labels, ("reason", reason));
            self.add("vmm_vm_exits_total", "vCPU exits, all vCPUs together, by reason.", Kind::Counter, &labels, *n);
        }
        let counters: [(&'static str, &'static str, u64); 9] = [
            ("vmm_api_requests_total", "API requests received, failed ones included.", *api_requests),
            ("vmm_api_errors_total", "API requests answered with an error.", *api_errors),
            ("vmm_guest_commands_total", "Commands sent to the guest through its mailbox.", *guest_commands),
            ("vmm_serial_bytes_total", "Bytes the guest wrote to its serial port.", *serial_bytes),
            ("vmm_serial_bytes_dropped_total", "Console bytes dropped (buffer full or file cap reached).", *serial_bytes_dropped),
            ("vmm_stdio_lines_dropped_total", "Lines the VMM could not write to its stdout or stderr.", *stdio_lines_dropped),
            ("vmm_guest_protocol_errors_total", "Values the guest sent that broke the paravirtual protocol.", *guest_protocol_errors),
            ("vmm_log_lines_dropped_total", "Log lines not written to the logger file.", *log_lines_dropped),
            ("vmm_metrics_lines_dropped_total", "Metrics lines not written to the metrics file.", *metrics_lines_dropped),
        ];
        for (name, help, n) in counters {
            self.add(name, help, Kind::Counter, labels, n);
        }
    }

    /// The figures of `GET /memory`, each sample with `labels`: the host's
    /// always, the guest's while its report is valid, and the boot
    /// milestones reached.
    pub fn memory(&mut self, labels: Labels<'_>, report: &MemoryReport) {
        let MemoryReport { valid, invalid_reason: _, strategy: _, guest, host, timings, reclaim } = report;
        self.add("vmm_guest_report_valid", "Whether the guest's stats block is valid (1) or not (0).", Kind::Gauge, labels, *valid);
        self.host(labels, host);
        self.reclaim(labels, reclaim);
        if let (true, Some(guest)) = (valid, guest) {
            self.guest(labels, guest);
        }
        self.timings(labels, timings);
    }

    /// The host's view of the VM's memory.
    fn host(&mut self, labels: Labels<'_>, host: &HostMemoryView) {
        let HostMemoryView {
            guest_ram_bytes,
            guest_ram_resident_bytes,
            guest_ram_shared_bytes,
            memmap_resident_bytes,
            memmap_range_bytes,
            vmm_rss_bytes,
            vmm_pss_bytes,
            kvm_registered_bytes,
            kvm_memslot_bytes_estimate,
            kvm_estimate_note: _,
        } = host;
        let gauges: [(&'static str, &'static str, Option<u64>); 9] = [
            ("vmm_guest_ram_bytes", "Guest RAM mapped for the guest.", Some(*guest_ram_bytes)),
            ("vmm_guest_ram_resident_bytes", "Guest RAM resident on the host.", Some(*guest_ram_resident_bytes)),
            (
                "vmm_guest_ram_shared_bytes",
                "Resident guest RAM still mapped from the page cache, shared by every VM.",
                *guest_ram_shared_bytes,
            ),
            ("vmm_memmap_resident_bytes", "Memmap bytes resident on the host.", Some(*memmap_resident_bytes)),
            ("vmm_memmap_range_bytes", "Size of the guest's memmap ranges.", Some(*memmap_range_bytes)),
            ("vmm_process_rss_bytes", "The VMM process's resident set size, without guest RAM.", Some(*vmm_rss_bytes)),
            ("vmm_process_pss_bytes", "The VMM process's proportional set size, without guest RAM.", *vmm_pss_bytes),
            ("vmm_kvm_registered_bytes", "Guest RAM registered with KVM.", Some(*kvm_registered_bytes)),
            (
                "vmm_kvm_memslot_estimate_bytes",
                "Estimated host kernel memory KVM spends on the registered memslots.",
                Some(*kvm_memslot_bytes_estimate),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                self.add(name, help, Kind::Gauge, labels, v);
            }
        }
    }

    /// Memory the guest gave back: the VMM's counts, and the guest's while
    /// its report is valid.
    fn reclaim(&mut self, labels: Labels<'_>, r: &ReclaimView) {
        let ReclaimView {
            mode: _,
            events,
            ranges_accepted,
            ranges_rejected,
            accepted_bytes,
            discarded_bytes,
            discarded_data_bytes,
            discarded_memmap_bytes,
            offline_bytes,
            memslots_unregistered,
            guest_reported_bytes,
            guest_events: _, // events
            chunks_deinitialized,
            delay_ms: _,
        } = r;
        let counters: [(&'static str, &'static str, Option<u64>); 11] = [
            ("vmm_reclaim_events_total", "Reports of free memory the guest made.", Some(*events)),
            ("vmm_reclaim_ranges_accepted_total", "Reported ranges the VMM accepted and discarded.", Some(*ranges_accepted)),
            ("vmm_reclaim_ranges_rejected_total", "Reported ranges (or whole reports) the VMM rejected.", Some(*ranges_rejected)),
            ("vmm_reclaim_accepted_bytes_total", "Bytes of the reported ranges the VMM accepted.", Some(*accepted_bytes)),
            ("vmm_reclaim_discarded_bytes_total", "Bytes the host had resident in accepted ranges and released, all kinds.", Some(*discarded_bytes)),
            ("vmm_reclaim_discarded_data_bytes_total", "Free data pages discarded from the host.", Some(*discarded_data_bytes)),
            ("vmm_reclaim_discarded_memmap_bytes_total", "Memmap pages of uninitialized chunks discarded.", Some(*discarded_memmap_bytes)),
            ("vmm_reclaim_offline_bytes_total", "Guest memory taken offline in whole runs.", Some(*offline_bytes)),
            ("vmm_reclaim_memslots_unregistered_total", "KVM memslots deleted because their memory went offline.", Some(*memslots_unregistered)),
            ("vmm_reclaim_guest_reported_bytes_total", "Bytes the guest says it reported and had accepted.", *guest_reported_bytes),
            ("vmm_memmap_chunks_deinitialized_total", "Memmap chunks the guest returned to uninitialized.", *chunks_deinitialized),
        ];
        for (name, help, value) in counters {
            if let Some(v) = value {
                self.add(name, help, Kind::Counter, labels, v);
            }
        }
    }

    /// The guest's view, from its stats block.
    fn guest(&mut self, labels: Labels<'_>, guest: &GuestMemoryView) {
        let GuestMemoryView {
            pages_total,
            pages_initialized,
            pages_allocated: _, // allocated_bytes
            pages_free,
            pages_reserved,
            memmap_bytes_reserved,
            memmap_bytes_initialized,
            chunks_total,
            chunks_initialized,
            chunk_bytes,
            grow_events,
            init_cycles: _, // init_us
            init_us,
            alloc_failures,
            grow_check_on,
            fully_initialized,
            jump_sites_patched,
            memmap_on_memory,
            allocated_bytes,
            workload_bytes,
            cpus,
        } = guest;
        let page_bytes = |n: &u64| n.saturating_mul(PAGE_SIZE);
        let gauges: [(&'static str, &'static str, Number); 16] = [
            ("vmm_memmap_initialized_bytes", "Memmap bytes the guest initialized.", (*memmap_bytes_initialized).into()),
            ("vmm_memmap_reserved_bytes", "Memmap bytes the guest set aside.", (*memmap_bytes_reserved).into()),
            ("vmm_guest_managed_bytes", "Guest RAM its memory manager manages.", page_bytes(pages_total).into()),
            ("vmm_guest_initialized_bytes", "Guest RAM whose metadata is initialized.", page_bytes(pages_initialized).into()),
            ("vmm_guest_allocated_bytes", "Guest RAM allocated in the guest.", (*allocated_bytes).into()),
            ("vmm_guest_free_bytes", "Guest RAM free in the guest (initialized, not allocated).", page_bytes(pages_free).into()),
            ("vmm_guest_reserved_bytes", "Guest RAM reserved (kernel image, memmap, boot structures).", page_bytes(pages_reserved).into()),
            ("vmm_guest_workload_bytes", "Bytes the guest's workload holds.", (*workload_bytes).into()),
            ("vmm_memmap_chunks", "Memmap chunks in all.", (*chunks_total).into()),
            ("vmm_memmap_chunks_initialized", "Memmap chunks initialized.", (*chunks_initialized).into()),
            ("vmm_memmap_chunk_bytes", "Guest RAM one memmap chunk covers.", (*chunk_bytes).into()),
            ("vmm_memmap_fully_initialized", "Whether the whole memmap is initialized (1) or not (0).", (*fully_initialized).into()),
            ("vmm_memmap_grow_check_on", "Whether the allocator still checks for growth (1) or not (0).", (*grow_check_on).into()),
            ("vmm_memmap_jump_sites_patched", "Whether the grow check is patched out (1) or not (0).", (*jump_sites_patched).into()),
            ("vmm_memmap_on_memory", "Whether the memmap lives in the memory it describes (1) or not (0).", (*memmap_on_memory).into()),
            ("vmm_guest_cpus", "CPUs the guest brought up.", (*cpus).into()),
        ];
        for (name, help, value) in gauges {
            self.add(name, help, Kind::Gauge, labels, value);
        }
        if let Some(us) = init_us {
            self.add("vmm_memmap_init_seconds", "Time the guest spent initializing its memmap.", Kind::Gauge, labels, us / 1e6);
        }
        self.add("vmm_memmap_grow_events_total", "Times an allocation initialized more memmap chunks.", Kind::Counter, labels, *grow_events);
        self.add("vmm_guest_alloc_failures_total", "Guest allocations that failed even after growing.", Kind::Counter, labels, *alloc_failures);
    }

    /// The boot milestones reached.
    fn timings(&mut self, labels: Labels<'_>, timings: &BootTimings) {
        let BootTimings {
            process_start,
            vm_created,
            vcpu_first_entry,
            guest_first_port_write,
            guest_entered,
            guest_memory_ready,
            guest_ready,
            guest_fully_initialized,
            guest_init_memmap_us,
            guest_init_total_us,
            guest_init_full_memmap_us,
        } = timings;
        let milestones = [
            ("process_start", process_start),
            ("vm_created", vm_created),
            ("vcpu_first_entry", vcpu_first_entry),
            ("guest_first_port_write", guest_first_port_write),
            ("guest_entered", guest_entered),
            ("guest_memory_ready", guest_memory_ready),
            ("guest_ready", guest_ready),
            ("guest_fully_initialized", guest_fully_initialized),
        ];
        for (milestone, us) in milestones {
            if let Some(us) = us {
                let labels = with(labels, ("milestone", milestone));
                self.add("vmm_boot_milestone_seconds", "When a boot milestone was reached, since the VMM process started.", Kind::Gauge, &labels, us / 1e6);
            }
        }
        let phases = [("memmap", guest_init_memmap_us), ("total", guest_init_total_us), ("full_memmap", guest_init_full_memmap_us)];
        for (phase, us) in phases {
            if let Some(us) = us {
                let labels = with(labels, ("phase", phase));
                self.add("vmm_guest_init_seconds", "Guest-measured time from kernel entry to the end of a boot phase.", Kind::Gauge, &labels, us / 1e6);
            }
        }
    }

    /// The exposition's text: each family's `# HELP` and `# TYPE` lines,
    /// then its samples.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let help = f.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {} {help}", f.name);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.name());
            out.push_str(&f.samples);
        }
        out
    }
}

/// One VM's exposition, as its `GET /metrics` answers in text: its counters
/// and, once it has a memory report (it has booted), the report's figures;
/// no labels.
pub fn vm(metrics: &Metrics, report: Option<&MemoryReport>) -> String {
    let mut e = Exposition::new();
    e.counters(&[], metrics);
    if let Some(report) = report {
        e.memory(&[], report);
    }
    e.text()
}

/// `labels` and one more.
fn with<'a>(labels: Labels<'a>, more: (&'static str, &'a str)) -> Vec<(&'static str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// A label value with backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_of_a_family_stay_together_under_one_header() {
        let mut e = Exposition::new();
        e.add("a_bytes", "A.", Kind::Gauge, &[("id", "x")], 1u64);
        e.add("b_total", "B.", Kind::Counter, &[("id", "x")], 2u64);
        e.add("a_bytes", "A.", Kind::Gauge, &[("id", "y"), ("k", "v")], 3u64);
        e.add("c_seconds", "C.", Kind::Gauge, &[], 0.25);
        assert_eq!(
            e.text(),
            "# HELP a_bytes A.\n# TYPE a_bytes gauge\na_bytes{id=\"x\"} 1\na_bytes{id=\"y\",k=\"v\"} 3\n\
             # HELP b_total B.\n# TYPE b_total counter\nb_total{id=\"x\"} 2\n\
             # HELP c_seconds C.\n# TYPE c_seconds gauge\nc_seconds 0.25\n"
        );
    }

    #[test]
    fn label_values_and_odd_floats_are_written_as_prometheus_reads_them() {
        let mut e = Exposition::new();
        e.add("g", "G.", Kind::Gauge, &[("id", "we\"ird\\\nid")], f64::NAN);
        e.add("g", "G.", Kind::Gauge, &[], f64::INFINITY);
        e.add("g", "G.", Kind::Gauge, &[], f64::NEG_INFINITY);
        e.add("g", "G.", Kind::Gauge, &[], u64::MAX);
        let text = e.text();
        assert!(text.contains("g{id=\"we\\\"ird\\\\\\nid\"} NaN\ng +Inf\ng -Inf\ng 18446744073709551615\n"), "{text}");
    }

    #[test]
    fn a_vm_exposition_has_every_counter_and_the_memory_figures() {
        let metrics = Metrics {
            vm_exits: VmExitCounts { io_out: 40, hlt: 1, ..VmExitCounts::default() },
            api_requests: 12,
            serial_bytes: 1536,
            ..Metrics::default()
        };
        let report = MemoryReport::example();
        let text = vm(&metrics, Some(&report));
        assert!(text.contains("vmm_vm_exits_total{reason=\"io_out\"} 40\n"), "{text}");
        assert!(text.contains("vmm_vm_exits_total{reason=\"other\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE vmm_serial_bytes_total counter\nvmm_serial_bytes_total 1536\n"), "{text}");
        let guest = report.guest.as_ref().unwrap();
        assert!(text.contains(&format!("\nvmm_memmap_initialized_bytes {}\n", guest.memmap_bytes_initialized)), "{text}");
        assert!(text.contains(&format!("\nvmm_guest_managed_bytes {}\n", guest.pages_total * PAGE_SIZE)), "{text}");
        assert!(text.contains(&format!("\nvmm_kvm_registered_bytes {}\n", report.host.kvm_registered_bytes)), "{text}");
        assert!(text.contains("vmm_guest_report_valid 1\n"), "{text}");
        // Only counters end in _total; every family has its HELP and TYPE.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts[2].ends_with("_total"), parts[3] == "counter", "{line}");
            assert!(text.contains(&format!("# HELP {} ", parts[2])), "{line}");
        }
    }

    #[test]
    fn an_invalid_report_gives_only_the_host_figures() {
        let mut report = MemoryReport::example();
        report.valid = false;
        report.host.vmm_pss_bytes = None;
        let text = vm(&Metrics::default(), Some(&report));
        assert!(text.contains("vmm_guest_report_valid 0\n"), "{text}");
        assert!(text.contains("\nvmm_memmap_resident_bytes "), "{text}");
        assert!(!text.contains("vmm_memmap_initialized_bytes"), "{text}");
        assert!(!text.contains("vmm_process_pss_bytes"), "{text}");
        // Before boot there is no report: the counters alone.
        let text = vm(&Metrics::default(), None);
        assert!(text.contains("\nvmm_api_errors_total 0\n") && !text.contains("vmm_guest_report_valid"), "{text}");
    }
}
