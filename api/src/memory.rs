//! `GET /memory` ([`MemoryReport`]) and `PUT`/`GET /guest/memory`
//! ([`GuestMemoryTarget`], [`GuestMemoryStatus`]).
//!
//! A report puts side by side what the guest says about its memmap (from its
//! stats block, [`GuestMemoryView`]), what the host sees of the same memory
//! ([`HostMemoryView`]), and when each boot milestone happened
//! ([`BootTimings`]). Every key of a report is always present: a value that is
//! not known (yet) is `null`, never a missing key, so scripts can index
//! without checking.
//!
//! The guest's numbers are untrusted: the VMM checks them (magic, ABI version,
//! a consistent sequence count, counts that add up) and, if they fail,
//! answers `valid: false`, an `invalid_reason`, and `guest: null`; the host
//! view and the timings are still given.

use crate::machine::{Reclaim, Strategy};
use serde::{Deserialize, Serialize};

/// The answer to `GET /memory`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryReport {
    /// Whether `guest` holds a consistent snapshot from the guest.
    pub valid: bool,
    /// Why not, when `valid` is false (e.g. "guest has not published its
    /// stats block yet").
    pub invalid_reason: Option<String>,
    /// The memmap strategy the guest reports using.
    pub strategy: Option<Strategy>,
    /// The guest's view; `null` unless `valid`.
    pub guest: Option<GuestMemoryView>,
    /// The host's view (always measured).
    pub host: HostMemoryView,
    /// Boot milestones.
    pub timings: BootTimings,
    /// Memory the guest gave back (all zero before its first report).
    #[serde(default)]
    pub reclaim: ReclaimView,
}

/// Memory the guest gave back to the host: what the VMM accepted and did
/// (always given), and the guest's own counts (`null` unless the report is
/// valid). A range the VMM rejects makes the report invalid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReclaimView {
    /// The mode the VM runs with; `null` before it starts.
    pub mode: Option<Reclaim>,
    /// Reports the guest made.
    pub events: u64,
    /// Ranges the VMM accepted and discarded.
    pub ranges_accepted: u64,
    /// Ranges (or whole reports) the VMM rejected.
    pub ranges_rejected: u64,
    /// Bytes of the ranges the VMM accepted, as the guest reported them (a
    /// range reported again counts again, as in the guest's own count).
    pub accepted_bytes: u64,
    /// Bytes the host had resident in the accepted ranges and released,
    /// all kinds together (`mincore()` just before each discard): memory
    /// reported twice, or never touched, is not counted again. At most
    /// `accepted_bytes`.
    pub discarded_bytes: u64,
    /// Of those, free data pages.
    pub discarded_data_bytes: u64,
    /// Of those, memmap pages that described only uninitialized chunks.
    pub discarded_memmap_bytes: u64,
    /// Of those, whole runs taken offline (their memslots are deleted once
    /// all their memory is offline).
    pub offline_bytes: u64,
    /// KVM memslots deleted because the guest took their memory offline.
    pub memslots_unregistered: u64,
    /// Bytes the guest says it reported and had accepted.
    pub guest_reported_bytes: Option<u64>,
    /// Reports the guest says it made.
    pub guest_events: Option<u64>,
    /// Chunks the guest returned from initialized to uninitialized.
    pub chunks_deinitialized: Option<u64>,
    /// The guest's delay before it reports free memory, in ms.
    pub delay_ms: Option<u32>,
}

/// The guest's memmap and allocator counters, from its stats block. Pages are
/// 4 KiB; "memmap" is the array of per-page metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMemoryView {
    /// Pages of guest RAM the memory manager manages.
    pub pages_total: u64,
    /// Pages whose metadata is initialized.
    pub pages_initialized: u64,
    /// Pages allocated.
    pub pages_allocated: u64,
    /// Pages free (initialized and not allocated).
    pub pages_free: u64,
    /// Pages reserved (kernel image, memmap itself, boot structures).
    pub pages_reserved: u64,
    /// Bytes set aside for the memmap.
    pub memmap_bytes_reserved: u64,
    /// Bytes of the memmap written so far.
    pub memmap_bytes_initialized: u64,
    /// Memmap chunks in all.
    pub chunks_total: u64,
    /// Memmap chunks initialized.
    pub chunks_initialized: u64,
    /// Bytes of RAM covered by one chunk.
    pub chunk_bytes: u64,
    /// Times an allocation had to initialize more chunks.
    pub grow_events: u64,
    /// TSC cycles the guest spent initializing the memmap.
    pub init_cycles: u64,
    /// `init_cycles` in microseconds, when the TSC frequency is known.
    pub init_us: Option<f64>,
    /// Allocations that failed even after growing.
    pub alloc_failures: u64,
    /// Whether the allocator still checks for growth (uninitialized chunks
    /// remain).
    pub grow_check_on: bool,
    /// Whether the whole memmap is initialized.
    pub fully_initialized: bool,
    /// The grow check's jump sites are patched out of the allocator's code
    /// (the fast path no longer pays for on-demand initialization).
    pub jump_sites_patched: bool,
    /// Whether the memmap lives in the memory it describes.
    pub memmap_on_memory: bool,
    /// `pages_allocated` in bytes.
    pub allocated_bytes: u64,
    /// Bytes the workload (`PUT /guest/memory`) holds.
    pub workload_bytes: u64,
    /// CPUs the guest brought up.
    pub cpus: u32,
}

/// What the host sees, measured by the VMM (mincore, /proc/self/smaps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMemoryView {
    /// Guest RAM registered with KVM.
    pub guest_ram_bytes: u64,
    /// Of that, bytes resident on the host.
    pub guest_ram_resident_bytes: u64,
    /// Of the resident bytes, those still mapped from the page cache: the
    /// built-in kernel's pages that the guest has not written, mapped from
    /// the VMM's binary and shared by every VM on the host (so not this VM's
    /// own cost). `null` if `/proc/self/smaps` could not be read.
    #[serde(default)]
    pub guest_ram_shared_bytes: Option<u64>,
    /// Resident bytes of the guest's memmap ranges.
    pub memmap_resident_bytes: u64,
    /// Size of the guest's memmap ranges.
    pub memmap_range_bytes: u64,
    /// VMM resident set size, excluding guest RAM.
    pub vmm_rss_bytes: u64,
    /// VMM proportional set size, excluding guest RAM; `null` if the kernel
    /// does not provide it.
    pub vmm_pss_bytes: Option<u64>,
    /// Guest RAM registered with KVM so far (memslots are registered in
    /// 2 MiB blocks as the guest first uses them).
    pub kvm_registered_bytes: u64,
    /// Estimated kernel memory KVM spends on the registered memslots (rmap,
    /// large-page tracking); see `kvm_estimate_note`.
    pub kvm_memslot_bytes_estimate: u64,
    /// How `kvm_memslot_bytes_estimate` was computed.
    pub kvm_estimate_note: String,
}

/// Boot milestones in microseconds since the VMM process started (so
/// `process_start` is 0), `null` until reached; the `*_us` fields at the end
/// are durations the guest measured itself with its TSC.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTimings {
    /// Process start (0).
    pub process_start: Option<f64>,
    /// KVM VM created and memory registered.
    pub vm_created: Option<f64>,
    /// First `KVM_RUN` on the boot vCPU.
    pub vcpu_first_entry: Option<f64>,
    /// The guest's first port access, a read or a write (its first exit to
    /// the VMM); the name is kept for compatibility.
    pub guest_first_port_write: Option<f64>,
    /// Guest announced kernel entry.
    pub guest_entered: Option<f64>,
    /// Guest announced its boot-time memmap work done.
    pub guest_memory_ready: Option<f64>,
    /// Guest announced ready for work.
    pub guest_ready: Option<f64>,
    /// Guest's memmap seen fully initialized (may be after `guest_ready`, or
    /// never, for deferred and on-demand strategies).
    pub guest_fully_initialized: Option<f64>,
    /// Guest-measured: kernel entry to memory ready.
    pub guest_init_memmap_us: Option<f64>,
    /// Guest-measured: kernel entry to ready.
    pub guest_init_total_us: Option<f64>,
    /// Guest-measured: kernel entry to memmap fully initialized.
    pub guest_init_full_memmap_us: Option<f64>,
}

/// The body of `PUT /guest/memory`: make the guest's workload hold this much
/// memory (allocating, writing, or freeing as needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMemoryTarget {
    /// Target in MiB; 0 frees everything the workload holds.
    pub target_mib: u64,
}

/// Why a workload target was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestMemoryTargetError {
    /// Bigger than the guest.
    #[error(
        "target_mib must be at most the guest's mem_size_mib ({mem_size_mib}) (got {target_mib})"
    )]
    TooLarge {
        /// Asked for.
        target_mib: u64,
        /// Guest size.
        mem_size_mib: u64,
    },
}

impl GuestMemoryTarget {
    /// Checks the target against the guest's memory size. A target the guest
    /// cannot reach (its own use, fragmentation) is not an error here: the
    /// answer's status is then `OutOfMemory`.
    pub fn validate(&self, mem_size_mib: u64) -> Result<(), GuestMemoryTargetError> {
        if self.target_mib > mem_size_mib {
            return Err(GuestMemoryTargetError::TooLarge {
                target_mib: self.target_mib,
                mem_size_mib,
            });
        }
        Ok(())
    }

    /// The target in bytes (cannot overflow once validated).
    pub fn target_bytes(&self) -> u64 {
        self.target_mib.saturating_mul(1 << 20)
    }
}

/// How the last workload command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GuestMemoryOutcome {
    /// No target has been set.
    Idle,
    /// A command is in progress (seen by `GET` while a `PUT` runs).
    Pending,
    /// The workload holds the target.
    Ok,
    /// The guest could not allocate all of it; it holds what it could and
    /// stays usable.
    OutOfMemory,
    /// Another command is in progress; try again when it ends.
    Busy,
    /// The guest is not running or has not set up its command mailbox.
    NotReady,
    /// The guest rejected the command.
    Invalid,
    /// The guest did not answer in time.
    Timeout,
}

impl GuestMemoryOutcome {
    /// All outcomes.
    pub const ALL: [GuestMemoryOutcome; 8] = [
        GuestMemoryOutcome::Idle,
        GuestMemoryOutcome::Pending,
        GuestMemoryOutcome::Ok,
        GuestMemoryOutcome::OutOfMemory,
        GuestMemoryOutcome::Busy,
        GuestMemoryOutcome::NotReady,
        GuestMemoryOutcome::Invalid,
        GuestMemoryOutcome::Timeout,
    ];
}

/// The answer to `PUT /guest/memory` (sent once the guest is done) and to
/// `GET /guest/memory`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMemoryStatus {
    /// Last target asked for, in MiB.
    pub target_mib: u64,
    /// Bytes the workload holds now.
    pub held_bytes: u64,
    /// How the last command ended.
    pub status: GuestMemoryOutcome,
    /// A memory report taken when the command ended; `null` for `GET` and
    /// when the guest did not answer.
    pub report: Option<MemoryReport>,
}

impl GuestMemoryView {
    /// An example with round numbers, for documentation and tests.
    pub fn example() -> GuestMemoryView {
        GuestMemoryView {
            pages_total: 524_288,
            pages_initialized: 32_768,
            pages_allocated: 1_000,
            pages_free: 30_000,
            pages_reserved: 1_768,
            memmap_bytes_reserved: 32 << 20,
            memmap_bytes_initialized: 2 << 20,
            chunks_total: 1_024,
            chunks_initialized: 64,
            chunk_bytes: 2 << 20,
            grow_events: 3,
            init_cycles: 123_456,
            init_us: Some(41.5),
            alloc_failures: 0,
            grow_check_on: true,
            fully_initialized: false,
            jump_sites_patched: false,
            memmap_on_memory: true,
            allocated_bytes: 4_096_000,
            workload_bytes: 1 << 20,
            cpus: 2,
        }
    }
}

impl HostMemoryView {
    /// An example with round numbers, for documentation and tests.
    pub fn example() -> HostMemoryView {
        HostMemoryView {
            guest_ram_bytes: 2 << 30,
            guest_ram_resident_bytes: 40 << 20,
            guest_ram_shared_bytes: Some(96 << 10),
            memmap_resident_bytes: 2 << 20,
            memmap_range_bytes: 32 << 20,
            vmm_rss_bytes: 6 << 20,
            vmm_pss_bytes: Some(5 << 20),
            kvm_registered_bytes: 128 << 20,
            kvm_memslot_bytes_estimate: 4 << 20,
            kvm_estimate_note: "rmap 8 B per 4 KiB page".into(),
        }
    }
}

impl BootTimings {
    /// An example with every step set, for documentation and tests.
    pub fn example() -> BootTimings {
        BootTimings {
            process_start: Some(0.5),
            vm_created: Some(1200.5),
            vcpu_first_entry: Some(1500.5),
            guest_first_port_write: Some(1600.5),
            guest_entered: Some(1700.5),
            guest_memory_ready: Some(1900.5),
            guest_ready: Some(2000.5),
            guest_fully_initialized: Some(9000.5),
            guest_init_memmap_us: Some(200.5),
            guest_init_total_us: Some(300.5),
            guest_init_full_memmap_us: Some(7300.5),
        }
    }
}

impl MemoryReport {
    /// An example of a valid report, for documentation and tests.
    pub fn example() -> MemoryReport {
        MemoryReport {
            valid: true,
            invalid_reason: None,
            strategy: Some(crate::machine::Strategy::OnDemand),
            guest: Some(GuestMemoryView::example()),
            host: HostMemoryView::example(),
            timings: BootTimings::example(),
            reclaim: ReclaimView::example(),
        }
    }
}

impl ReclaimView {
    /// An example with round numbers, for documentation and tests.
    pub fn example() -> ReclaimView {
        ReclaimView {
            mode: Some(Reclaim::Full),
            events: 3,
            ranges_accepted: 40,
            ranges_rejected: 0,
            accepted_bytes: (1 << 30) + (16 << 20),
            discarded_bytes: (1 << 30) + (16 << 20),
            discarded_data_bytes: 128 << 20,
            discarded_memmap_bytes: 16 << 20,
            offline_bytes: 896 << 20,
            memslots_unregistered: 9,
            guest_reported_bytes: Some((1 << 30) + (16 << 20)),
            guest_events: Some(3),
            chunks_deinitialized: Some(512),
            delay_ms: Some(2000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn target_validation() {
        let t: GuestMemoryTarget = serde_json::from_str(r#"{"target_mib": 512}"#).unwrap();
        t.validate(2048).unwrap();
        assert_eq!(t.target_bytes(), 512 << 20);
        let t = GuestMemoryTarget { target_mib: 4096 };
        assert_eq!(
            t.validate(2048).unwrap_err().to_string(),
            "target_mib must be at most the guest's mem_size_mib (2048) (got 4096)"
        );
        assert_eq!(
            GuestMemoryTarget {
                target_mib: u64::MAX
            }
            .target_bytes(),
            u64::MAX
        );
    }

    #[test]
    fn target_rejects_unknown_fields_and_missing_target() {
        assert!(serde_json::from_str::<GuestMemoryTarget>(r#"{"target_mib":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<GuestMemoryTarget>("{}").is_err());
        assert!(serde_json::from_str::<GuestMemoryTarget>(r#"{"target_mib":-1}"#).is_err());
    }

    #[test]
    fn outcome_names() {
        for (o, name) in GuestMemoryOutcome::ALL.into_iter().zip([
            "Idle",
            "Pending",
            "Ok",
            "OutOfMemory",
            "Busy",
            "NotReady",
            "Invalid",
            "Timeout",
        ]) {
            assert_eq!(serde_json::to_value(o).unwrap(), json!(name));
        }
    }

    #[test]
    fn invalid_report_keeps_every_key() {
        let r = MemoryReport {
            valid: false,
            invalid_reason: Some("no stats block yet".into()),
            strategy: None,
            guest: None,
            host: HostMemoryView {
                guest_ram_bytes: 1 << 30,
                guest_ram_resident_bytes: 0,
                guest_ram_shared_bytes: None,
                memmap_resident_bytes: 0,
                memmap_range_bytes: 0,
                vmm_rss_bytes: 0,
                vmm_pss_bytes: None,
                kvm_registered_bytes: 0,
                kvm_memslot_bytes_estimate: 0,
                kvm_estimate_note: String::new(),
            },
            timings: BootTimings {
                process_start: Some(0.0),
                ..BootTimings::default()
            },
            reclaim: ReclaimView::default(),
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "valid",
            "invalid_reason",
            "strategy",
            "guest",
            "host",
            "timings",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["strategy"], json!(null));
        assert_eq!(v["timings"]["guest_ready"], json!(null));
        assert_eq!(v["timings"]["process_start"], json!(0.0));
        assert_eq!(v["host"]["vmm_pss_bytes"], json!(null));
    }
}
