//! What `vmm ctl` and `vmm run --report table` print: an API answer as pretty
//! JSON, or, for a human, its fields in tables. Each table is built from the
//! answer's API type, field by field, every figure in the unit that fits it
//! ([`api::units`]); [`table`] draws them.

mod table;

use api::{
    BootTimings, GuestMemoryStatus, GuestMemoryView, HostMemoryView, InstanceInfo, InstanceStatus, MachineConfig,
    MemoryReport, ReclaimView, Metrics, VmExitCounts,
};
use serde_json::Value;
use crate::fleet::{Reach, Row, Totals};
use table::{columns, fields, long_fields, side_by_side, Field};
use guest_abi::PAGE_SIZE;
use api::units::{bytes, kib, mib, micros, pages, seconds, share, spelled, text, text_or_dash, yes_no};

/// The fields of `$value`, a `$Type`, each named as in the JSON (the field's
/// name) and shown by the unit function after it (which gets the field's
/// value, owned):
///
/// ```ignore
/// shown!(config => MachineConfig { vcpu_count: text, mem_size_mib: mib, ... })
/// ```
///
/// The struct is taken apart without `..`, so a field added to the API does
/// not compile here until it is given a place and a unit.
macro_rules! shown {
    ($value:expr => $Type:ident { $($field:ident: $unit:path),* $(,)? }) => {{
        let $Type { $($field),* } = $value;
        vec![$((stringify!($field), $unit(ToOwned::to_owned($field)))),*]
    }};
}

/// What a human is shown for an answer with no body (204).
pub const NO_CONTENT: &str = "ok\n";

/// The answer as it came, pretty-printed; nothing for an answer with no body.
pub fn json(answer: &Value) -> String {
    if answer.is_null() {
        return String::new();
    }
    let mut out = serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string());
    out.push('\n');
    out
}

/// `GET /` for a human.
pub fn instance_info(info: &InstanceInfo) -> String {
    fields(&shown!(info => InstanceInfo {
        app_name: text,
        id: text,
        state: text,
        vmm_version: text,
    }))
}

/// `GET /vm/status` for a human.
pub fn instance_status(status: &InstanceStatus) -> String {
    fields(&shown!(status => InstanceStatus {
        id: text,
        state: text,
        started: yes_no,
        exit_code: text_or_dash,
        failure_reason: text_or_dash,
        started_at_unix_ms: text_or_dash,
    }))
}

/// `GET /machine-config` for a human.
pub fn machine_config(config: &MachineConfig) -> String {
    fields(&shown!(config => MachineConfig {
        vcpu_count: text,
        mem_size_mib: mib,
        smt: yes_no,
        track_dirty_pages: yes_no,
        cpu_template: spelled,
        huge_pages: spelled,
        memmap_init: text,
        memmap_chunk_kib: kib,
        guest_cpl: text,
        memmap_on_memory: yes_no,
        reclaim: text_or_dash,
        reclaim_delay_ms: text_or_dash,
    }))
}

/// `GET /memory` for a human: first the answer in a few lines
/// ([`memory_summary`]), then the memmap strategy, the guest's view beside
/// the host's, and the boot timings.
pub fn memory_table(report: &MemoryReport) -> String {
    let mut out = memory_summary(report);
    out.push('\n');
    out += &memory_details(report);
    out
}

/// The few figures an operator asks of a report first: how much memory the
/// memmap takes (initialized by the guest, resident on the host), as a share
/// of the configured memory and of the memory the guest uses (allocated and
/// reserved pages); guest RAM
/// resident; the VMM's own PSS; KVM's share; and whether the guest's and the
/// host's figures for the memmap agree ([`memmap_agreement`]).
pub fn memory_summary(report: &MemoryReport) -> String {
    let host = &report.host;
    let guest = report.guest.as_ref().filter(|_| report.valid);
    let configured = host.guest_ram_bytes;
    // In use: what the guest allocated and what it reserved (kernel image,
    // the memmap itself, boot structures).
    let used = guest
        .map(|g| g.pages_allocated.saturating_add(g.pages_reserved).saturating_mul(PAGE_SIZE))
        .filter(|&used| used > 0);
    let of = |n: u64| {
        let mut s = format!("{} of configured", share(n, configured));
        if let Some(used) = used {
            s += &format!(", {} of {} in use", share(n, used), bytes(used));
        }
        s
    };
    let initialized = match guest {
        Some(g) => format!(
            "{}  ({})",
            bytes(g.memmap_bytes_initialized),
            of(g.memmap_bytes_initialized)
        ),
        None => "-".to_string(),
    };
    let list = [
        ("metadata initialized", initialized),
        (
            "metadata resident",
            format!(
                "{}  ({})",
                bytes(host.memmap_resident_bytes),
                of(host.memmap_resident_bytes)
            ),
        ),
        (
            "guest RAM resident",
            format!(
                "{}  ({} of {} configured)",
                bytes(host.guest_ram_resident_bytes),
                share(host.guest_ram_resident_bytes, configured),
                bytes(configured)
            ),
        ),
        ("VMM process (PSS)", bytes(host.vmm_pss_bytes)),
        (
            "KVM",
            format!(
                "{} registered, memslots ~{}",
                bytes(host.kvm_registered_bytes),
                bytes(host.kvm_memslot_bytes_estimate)
            ),
        ),
        ("guest and host agree", memmap_agreement(report)),
    ];
    format!("SUMMARY\n{}", long_fields(&list))
}

/// Whether the memmap the guest says it initialized is what the host finds
/// resident: they agree when the initialized bytes, rounded up to whole
/// pages, are the resident bytes.
pub fn memmap_agreement(report: &MemoryReport) -> String {
    let Some(guest) = report.guest.as_ref().filter(|_| report.valid) else {
        return "unknown (no valid guest report)".to_string();
    };
    let initialized = guest.memmap_bytes_initialized;
    let resident = report.host.memmap_resident_bytes;
    let pages = initialized.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
    let verdict = if pages == resident { "yes" } else { "no" };
    format!(
        "{verdict} (memmap initialized {}, resident {})",
        bytes(initialized),
        bytes(resident)
    )
}

/// The memmap strategy, the guest's view beside the host's, then the boot
/// timings.
fn memory_details(report: &MemoryReport) -> String {
    let MemoryReport {
        valid,
        invalid_reason,
        strategy,
        guest,
        host,
        timings,
        reclaim,
    } = report;
    let guest = match (valid, guest) {
        (true, Some(view)) => fields(&guest_view(view)),
        _ => format!(
            "not available: {}",
            invalid_reason.as_deref().unwrap_or("no valid report")
        ),
    };
    let mut out = format!("memmap strategy: {}\n", text_or_dash(*strategy));
    out += &side_by_side(&[
        ("GUEST (its stats block)", guest),
        ("HOST (measured by the VMM)", fields(&host_view(host))),
    ]);
    let (milestones, durations) = boot_timings(timings);
    out.push('\n');
    out += &side_by_side(&[
        ("TIMINGS (since VMM start)", fields(&milestones)),
        ("GUEST-MEASURED (from kernel entry)", fields(&durations)),
    ]);
    out.push('\n');
    let (vmm_side, guest_side) = reclaim_view(reclaim);
    out += &side_by_side(&[
        ("RECLAIM (what the VMM accepted and discarded)", fields(&vmm_side)),
        ("RECLAIM (the guest's count)", fields(&guest_side)),
    ]);
    out
}

/// Memory the guest gave back: the VMM's side, then the guest's own counts.
fn reclaim_view(view: &ReclaimView) -> (Vec<Field>, Vec<Field>) {
    let mut all = shown!(view => ReclaimView {
        mode: text_or_dash,
        events: text,
        ranges_accepted: text,
        ranges_rejected: text,
        accepted_bytes: bytes,
        discarded_bytes: bytes,
        discarded_data_bytes: bytes,
        discarded_memmap_bytes: bytes,
        offline_bytes: bytes,
        memslots_unregistered: text,
        guest_reported_bytes: bytes,
        guest_events: text_or_dash,
        chunks_deinitialized: text_or_dash,
        delay_ms: text_or_dash,
    });
    let guest = all.split_off(10);
    (all, guest)
}

/// `GET /guest/memory` and `PUT /guest/memory` for a human: the workload's
/// state, then the memory report taken when its command ended, if any.
pub fn guest_memory_status(status: &GuestMemoryStatus) -> String {
    let GuestMemoryStatus {
        target_mib,
        held_bytes,
        status,
        report,
    } = status;
    let mut out = fields(&[
        ("target_mib", mib(*target_mib)),
        ("held_bytes", bytes(*held_bytes)),
        // A unit variant's Debug form is its name, as in the JSON.
        ("status", format!("{status:?}")),
    ]);
    if let Some(report) = report {
        out.push('\n');
        out += &memory_table(report);
    }
    out
}

/// `GET /metrics` for a human: the VMM's counters beside the vCPU exits by
/// reason (`vm_exits`).
pub fn metrics(metrics: &Metrics) -> String {
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
    let counters = fields(&[
        ("api_requests", text(api_requests)),
        ("api_errors", text(api_errors)),
        ("guest_commands", text(guest_commands)),
        ("serial_bytes", bytes(*serial_bytes)),
        ("serial_bytes_dropped", bytes(*serial_bytes_dropped)),
        ("log_lines_dropped", text(log_lines_dropped)),
        ("metrics_lines_dropped", text(metrics_lines_dropped)),
        ("stdio_lines_dropped", text(stdio_lines_dropped)),
        ("guest_protocol_errors", text(guest_protocol_errors)),
    ]);
    let exits_title = format!("VM EXITS ({} in all)", vm_exits.total());
    side_by_side(&[
        ("COUNTERS", counters),
        (&exits_title, fields(&exit_counts(vm_exits))),
    ])
}

/// The header of [`ps_table`].
pub const PS_HEADER: [&str; 12] = [
    "ID", "STATE", "VCPUS", "MEMORY", "STRATEGY", "UPTIME", "MEMMAP INIT", "MEMMAP RES", "RAM RES", "KVM REG",
    "VMM PSS", "NOTE",
];

/// `vmm ps` for a human: one line per VM, then the totals.
pub fn ps_table(rows: &[Row], totals: &Totals) -> String {
    let mut lines: Vec<Vec<String>> = rows.iter().map(ps_line).collect();
    lines.push(ps_totals(totals));
    columns(&PS_HEADER, &lines)
}

/// The last line of [`ps_table`] (and of `vmm top`): the sums, under the
/// columns of [`PS_HEADER`].
pub fn ps_totals(totals: &Totals) -> Vec<String> {
    vec![
        format!("TOTAL ({} VMs)", totals.vms),
        format!("{} answered", totals.answered),
        text(totals.vcpus),
        mib(totals.mem_size_mib),
        String::new(),
        String::new(),
        bytes(totals.memmap_initialized_bytes),
        bytes(totals.memmap_resident_bytes),
        bytes(totals.guest_ram_resident_bytes),
        bytes(totals.kvm_registered_bytes),
        bytes(totals.vmm_pss_bytes),
        String::new(),
    ]
}

/// One VM of [`ps_table`] (and of `vmm top`), under the columns of
/// [`PS_HEADER`].
pub fn ps_line(row: &Row) -> Vec<String> {
    let note = match row.reach {
        Reach::Answered => String::new(),
        Reach::NoAnswer => "no answer".to_string(),
        Reach::Dead => "dead socket".to_string(),
        Reach::Failed => row.error.clone().unwrap_or_default(),
    };
    vec![
        row.id.clone(),
        text_or_dash(row.state.as_deref()),
        text_or_dash(row.vcpus),
        row.mem_size_mib.map_or_else(|| "-".to_string(), mib),
        row.strategy.map_or_else(|| "-".to_string(), spelled),
        row.uptime_s.map_or_else(|| "-".to_string(), seconds),
        bytes(row.memmap_initialized_bytes),
        bytes(row.memmap_resident_bytes),
        bytes(row.guest_ram_resident_bytes),
        bytes(row.kvm_registered_bytes),
        bytes(row.vmm_pss_bytes),
        note,
    ]
}

/// The guest's stats block: page counts with the memory they make, sizes,
/// chunk counts, cycles and flags.
fn guest_view(view: &GuestMemoryView) -> Vec<Field> {
    shown!(view => GuestMemoryView {
        pages_total: pages,
        pages_initialized: pages,
        pages_allocated: pages,
        pages_free: pages,
        pages_reserved: pages,
        memmap_bytes_reserved: bytes,
        memmap_bytes_initialized: bytes,
        chunks_total: text,
        chunks_initialized: text,
        chunk_bytes: bytes,
        grow_events: text,
        init_cycles: text,
        init_us: micros,
        alloc_failures: text,
        grow_check_on: yes_no,
        fully_initialized: yes_no,
        jump_sites_patched: yes_no,
        memmap_on_memory: yes_no,
        allocated_bytes: bytes,
        workload_bytes: bytes,
        cpus: text,
    })
}

/// What the VMM measured: sizes, and how the KVM estimate was made.
fn host_view(view: &HostMemoryView) -> Vec<Field> {
    shown!(view => HostMemoryView {
        guest_ram_bytes: bytes,
        guest_ram_resident_bytes: bytes,
        guest_ram_shared_bytes: bytes,
        memmap_resident_bytes: bytes,
        memmap_range_bytes: bytes,
        vmm_rss_bytes: bytes,
        vmm_pss_bytes: bytes,
        kvm_registered_bytes: bytes,
        kvm_memslot_bytes_estimate: bytes,
        kvm_estimate_note: text,
    })
}

/// The milestones (time since the VMM started) and, apart, the durations the
/// guest measured from its kernel entry; `-` for what has not happened.
fn boot_timings(timings: &BootTimings) -> (Vec<Field>, Vec<Field>) {
    let mut all = shown!(timings => BootTimings {
        process_start: micros,
        vm_created: micros,
        vcpu_first_entry: micros,
        guest_first_port_write: micros,
        guest_entered: micros,
        guest_memory_ready: micros,
        guest_ready: micros,
        guest_fully_initialized: micros,
        guest_init_memmap_us: micros,
        guest_init_total_us: micros,
        guest_init_full_memmap_us: micros,
    });
    // The guest-measured durations are the ones named `_us`.
    let durations = all.split_off(
        all.iter()
            .position(|(name, _)| name.ends_with("_us"))
            .unwrap_or(all.len()),
    );
    (all, durations)
}

/// vCPU exits by reason.
fn exit_counts(exits: &VmExitCounts) -> Vec<Field> {
    shown!(exits => VmExitCounts {
        io_in: text,
        io_out: text,
        mmio_read: text,
        mmio_write: text,
        hlt: text,
        shutdown: text,
        system_event: text,
        failed: text,
        other: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{GuestCpl, GuestMemoryOutcome, Strategy, VmState};

    /// `GET /memory`'s example, as a human sees it.
    const EXAMPLE_MEMORY: &str = "\
memmap strategy: ondemand
GUEST (its stats block)                        HOST (measured by the VMM)
pages_total               524288 (2 GiB)       guest_ram_bytes             2 GiB
pages_initialized         32768 (128 MiB)      guest_ram_resident_bytes    40 MiB
pages_allocated           1000 (3.9 MiB)       guest_ram_shared_bytes      96 KiB
pages_free                30000 (117.2 MiB)    memmap_resident_bytes       2 MiB
pages_reserved            1768 (6.9 MiB)       memmap_range_bytes          32 MiB
memmap_bytes_reserved     32 MiB               vmm_rss_bytes               6 MiB
memmap_bytes_initialized  2 MiB                vmm_pss_bytes               5 MiB
chunks_total              1024                 kvm_registered_bytes        128 MiB
chunks_initialized        64                   kvm_memslot_bytes_estimate  4 MiB
chunk_bytes               2 MiB                kvm_estimate_note           rmap 8 B per 4 KiB page
grow_events               3
init_cycles               123456
init_us                   41.5 µs
alloc_failures            0
grow_check_on             yes
fully_initialized         no
jump_sites_patched        no
memmap_on_memory          yes
allocated_bytes           3.9 MiB
workload_bytes            1 MiB
cpus                      2

TIMINGS (since VMM start)           GUEST-MEASURED (from kernel entry)
process_start            0.5 µs     guest_init_memmap_us       200.5 µs
vm_created               1.20 ms    guest_init_total_us        300.5 µs
vcpu_first_entry         1.50 ms    guest_init_full_memmap_us  7.30 ms
guest_first_port_write   1.60 ms
guest_entered            1.70 ms
guest_memory_ready       1.90 ms
guest_ready              2.00 ms
guest_fully_initialized  9.00 ms

RECLAIM (what the VMM accepted and discarded)    RECLAIM (the guest's count)
mode                    full                     guest_reported_bytes  1.0 GiB
events                  3                        guest_events          3
ranges_accepted         40                       chunks_deinitialized  512
ranges_rejected         0                        delay_ms              2000
accepted_bytes          1.0 GiB
discarded_bytes         1.0 GiB
discarded_data_bytes    128 MiB
discarded_memmap_bytes  16 MiB
offline_bytes           896 MiB
memslots_unregistered   9
";

    #[test]
    fn json_is_the_answer_pretty_printed() {
        let answer = serde_json::to_value(MemoryReport::example()).unwrap();
        let out = json(&answer);
        assert_eq!(out, serde_json::to_string_pretty(&answer).unwrap() + "\n");
        assert!(out.starts_with("{\n  \"valid\": true,\n"), "{out}");
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), answer);
        // Keys stay in the order the VMM sent them.
        let out = json(&serde_json::json!({"state": "Running", "id": "vm0"}));
        assert_eq!(out, "{\n  \"state\": \"Running\",\n  \"id\": \"vm0\"\n}\n");
        // A 204.
        assert_eq!(json(&Value::Null), "");
        assert_eq!(NO_CONTENT, "ok\n");
    }

    #[test]
    fn human_info_shows_every_field() {
        let info = InstanceInfo::new("vm0", "0.1.0", VmState::Running);
        assert_eq!(
            instance_info(&info),
            "\
app_name     vmm
id           vm0
state        Running
vmm_version  0.1.0
"
        );
    }

    #[test]
    fn human_status_shows_how_the_vm_ended() {
        let mut status = InstanceStatus::new("vm1", VmState::Failed);
        status.failure_reason = Some("KVM_RUN: Bad address".into());
        let out = instance_status(&status);
        assert!(out.contains("started             yes\n"), "{out}");
        assert!(out.contains("exit_code           -\n"), "{out}");
        assert!(out.contains("failure_reason      KVM_RUN: Bad address\n"), "{out}");
        assert!(out.contains("started_at_unix_ms  -\n"), "{out}");
    }

    #[test]
    fn human_config_gives_sizes_in_their_unit() {
        let config = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 512,
            memmap_init: Strategy::Deferred,
            memmap_chunk_kib: 128,
            guest_cpl: GuestCpl::Ring3,
            memmap_on_memory: true,
            ..MachineConfig::default()
        };
        assert_eq!(
            machine_config(&config),
            "\
vcpu_count         2
mem_size_mib       512 MiB
smt                no
track_dirty_pages  no
cpu_template       None
huge_pages         None
memmap_init        deferred
memmap_chunk_kib   128 KiB
guest_cpl          3
memmap_on_memory   yes
reclaim            -
reclaim_delay_ms   -
"
        );
        let out = machine_config(&MachineConfig::default());
        assert!(out.contains("mem_size_mib       2 GiB\n"), "{out}");
        assert!(out.contains("memmap_chunk_kib   2 MiB\n"), "{out}");
        assert!(out.contains("guest_cpl          auto\n"), "{out}");
    }

    /// The summary that opens `EXAMPLE_MEMORY`'s table.
    const EXAMPLE_SUMMARY: &str = "\
SUMMARY
metadata initialized  2 MiB  (0.098% of configured, 18.5% of 10.8 MiB in use)
metadata resident     2 MiB  (0.098% of configured, 18.5% of 10.8 MiB in use)
guest RAM resident    40 MiB  (2.0% of 2 GiB configured)
VMM process (PSS)     5 MiB
KVM                   128 MiB registered, memslots ~4 MiB
guest and host agree  yes (memmap initialized 2 MiB, resident 2 MiB)
";

    #[test]
    fn human_memory_puts_guest_beside_host_then_timings() {
        let report = MemoryReport::example();
        assert_eq!(memory_details(&report), EXAMPLE_MEMORY, "\n{}", memory_details(&report));
        assert_eq!(memory_summary(&report), EXAMPLE_SUMMARY, "\n{}", memory_summary(&report));
        assert_eq!(
            memory_table(&report),
            format!("{EXAMPLE_SUMMARY}\n{EXAMPLE_MEMORY}")
        );
    }

    #[test]
    fn the_summary_leads_with_an_idle_vms_metadata_in_kib() {
        let mut report = MemoryReport::example();
        let guest = report.guest.as_mut().unwrap();
        guest.memmap_bytes_initialized = 32 << 10;
        report.host.memmap_resident_bytes = 32 << 10;
        let out = memory_table(&report);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "SUMMARY");
        assert!(lines[1].starts_with("metadata initialized  32 KiB  (0.0015% of configured"), "{out}");
        assert!(lines[2].starts_with("metadata resident     32 KiB  (0.0015% of configured"), "{out}");

        // Host pages that the guest never said it initialized.
        report.host.memmap_resident_bytes = 64 << 10;
        assert!(memmap_agreement(&report).starts_with("no (memmap initialized 32 KiB, resident 64 KiB)"));
        // A part page is resident as a whole page.
        report.host.memmap_resident_bytes = 4096;
        report.guest.as_mut().unwrap().memmap_bytes_initialized = 100;
        assert!(memmap_agreement(&report).starts_with("yes"));
    }

    #[test]
    fn the_summary_of_an_invalid_report_gives_the_host_figures() {
        let mut report = MemoryReport::example();
        report.valid = false;
        report.host.vmm_pss_bytes = None;
        let out = memory_summary(&report);
        assert!(out.contains("metadata initialized  -\n"), "{out}");
        assert!(out.contains("metadata resident     2 MiB  (0.098% of configured)\n"), "{out}");
        assert!(out.contains("VMM process (PSS)     -\n"), "{out}");
        assert!(out.contains("guest and host agree  unknown (no valid guest report)\n"), "{out}");
    }

    #[test]
    fn human_memory_of_an_invalid_report_still_shows_the_host() {
        let mut report = MemoryReport::example();
        report.valid = false;
        report.invalid_reason = Some("no stats block yet".into());
        report.strategy = None;
        report.guest = None;
        report.host.vmm_pss_bytes = None;
        report.timings = BootTimings::default();
        report.timings.process_start = Some(0.0);
        let out = memory_details(&report);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "memmap strategy: -");
        assert!(
            lines[1].starts_with("GUEST (its stats block)") && lines[1].contains("HOST"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("not available: no stats block yet"),
            "{out}"
        );
        assert!(
            lines[2].ends_with("guest_ram_bytes             2 GiB"),
            "{out}"
        );
        // The host column starts at one offset on every line.
        let col = lines[1].find("HOST").unwrap();
        assert_eq!(lines[2].find("guest_ram_bytes"), Some(col), "{out}");
        assert_eq!(lines[8].find("vmm_pss_bytes"), Some(col), "{out}");
        assert!(lines[8].ends_with("vmm_pss_bytes               -"), "{out}");
        assert!(!out.contains("pages_total"), "{out}");
        assert!(out.contains("process_start            0.0 µs"), "{out}");
        assert!(out.contains("guest_ready              -\n"), "{out}");

        // A guest view handed over with `valid: false` is not shown either.
        let mut report = MemoryReport::example();
        report.valid = false;
        report.invalid_reason = None;
        let out = memory_details(&report);
        assert!(out.contains("not available: no valid report"), "{out}");
        assert!(!out.contains("pages_total"), "{out}");
    }

    #[test]
    fn an_idle_memmap_is_shown_in_kib() {
        let mut report = MemoryReport::example();
        let guest = report.guest.as_mut().unwrap();
        guest.memmap_bytes_initialized = 32 << 10;
        guest.pages_initialized = 8;
        report.host.memmap_resident_bytes = 32 << 10;
        let out = memory_table(&report);
        assert!(out.contains("memmap_bytes_initialized  32 KiB "), "{out}");
        assert!(
            out.contains("pages_initialized         8 (32 KiB) "),
            "{out}"
        );
        assert!(
            out.contains("memmap_resident_bytes       32 KiB\n"),
            "{out}"
        );
        assert!(!out.contains("0.0 MiB"), "{out}");
    }

    #[test]
    fn ps_lists_each_vm_then_the_totals() {
        let row = |id: &str, reach: Reach| Row {
            id: id.into(),
            socket: id.into(),
            reach,
            state: Some("Running".into()),
            vcpus: Some(1),
            mem_size_mib: Some(256),
            strategy: Some(Strategy::OnDemand),
            uptime_s: Some(3725),
            memmap_initialized_bytes: Some(32 << 10),
            memmap_resident_bytes: Some(32 << 10),
            guest_ram_resident_bytes: Some(200 << 10),
            kvm_registered_bytes: Some(128 << 20),
            vmm_pss_bytes: Some(1536 << 10),
            error: None,
            answers: None,
        };
        let dead = Row::without_figures("gone".into(), "gone".as_ref(), Reach::Dead);
        let rows = vec![row("a", Reach::Answered), row("b", Reach::Answered), dead];
        let out = ps_table(&rows, &Totals::of(&rows));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].starts_with("ID "), "{out}");
        assert!(lines[1].contains(" 256 MiB ") && lines[1].contains(" ondemand ") && lines[1].contains(" 1h02m "), "{out}");
        assert!(lines[1].contains(" 32 KiB "), "{out}");
        assert!(lines[3].starts_with("gone ") && lines[3].ends_with("dead socket"), "{out}");
        assert!(lines[4].starts_with("TOTAL (3 VMs)  2 answered"), "{out}");
        assert!(lines[4].contains(" 64 KiB ") && lines[4].contains(" 3 MiB"), "{out}");
    }

    #[test]
    fn human_workload_shows_its_state_then_the_report() {
        let status = GuestMemoryStatus {
            target_mib: 512,
            held_bytes: 512 << 20,
            status: GuestMemoryOutcome::Ok,
            report: Some(MemoryReport::example()),
        };
        let out = guest_memory_status(&status);
        let head = "target_mib  512 MiB\nheld_bytes  512 MiB\nstatus      Ok\n\n";
        assert_eq!(out, format!("{head}{EXAMPLE_SUMMARY}\n{EXAMPLE_MEMORY}"));

        let idle = GuestMemoryStatus {
            target_mib: 0,
            held_bytes: 0,
            status: GuestMemoryOutcome::Idle,
            report: None,
        };
        assert_eq!(
            guest_memory_status(&idle),
            "target_mib  0 B\nheld_bytes  0 B\nstatus      Idle\n"
        );
        let short = GuestMemoryStatus {
            held_bytes: 300 << 20,
            status: GuestMemoryOutcome::OutOfMemory,
            ..status
        };
        let out = guest_memory_status(&short);
        assert!(
            out.starts_with("target_mib  512 MiB\nheld_bytes  300 MiB\nstatus      OutOfMemory\n"),
            "{out}"
        );
    }

    #[test]
    fn human_metrics_puts_counters_beside_exits() {
        let m = Metrics {
            vm_exits: VmExitCounts {
                io_in: 2,
                io_out: 40,
                hlt: 1,
                ..VmExitCounts::default()
            },
            api_requests: 12,
            api_errors: 1,
            guest_commands: 3,
            serial_bytes: 1536,
            ..Metrics::default()
        };
        assert_eq!(
            metrics(&m),
            "\
COUNTERS                          VM EXITS (43 in all)
api_requests           12         io_in         2
api_errors             1          io_out        40
guest_commands         3          mmio_read     0
serial_bytes           1.5 KiB    mmio_write    0
serial_bytes_dropped   0 B        hlt           1
log_lines_dropped      0          shutdown      0
metrics_lines_dropped  0          system_event  0
stdio_lines_dropped    0          failed        0
guest_protocol_errors  0          other         0
"
        );
        let out = metrics(&Metrics::default());
        assert!(
            out.starts_with("COUNTERS                      VM EXITS (0 in all)\n"),
            "{out}"
        );
        assert!(
            out.contains("\nserial_bytes           0 B    mmio_write    0\n"),
            "{out}"
        );
    }
}
