//! `PUT`, `PATCH` and `GET /machine-config`: vCPUs, memory size, the fields
//! Firecracker's `MachineConfiguration` has, and this VMM's own extensions
//! (how the guest initializes its memmap, its privilege level).
//!
//! As in Firecracker, `PUT` replaces the whole configuration: its body is a
//! [`MachineConfigPut`], where `vcpu_count` and `mem_size_mib` are required
//! and every omitted optional field takes its default
//! ([`MachineConfigPut::into_config`]). `PATCH` changes only the fields
//! given: its body is a [`MachineConfigUpdate`], merged into the current
//! config by [`MachineConfig::apply`]. Either way the result is validated as
//! a whole and nothing changes if it is invalid. `GET` answers the full
//! [`MachineConfig`].
//!
//! Firecracker fields this VMM cannot honour are accepted with their
//! default value and refused with a clear message otherwise: `smt: true`,
//! `track_dirty_pages: true`, a `cpu_template` other than `"None"`.
//! `huge_pages: "2M"` asks the host for transparent huge pages
//! (`MADV_HUGEPAGE`) rather than a hugetlbfs pool.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Most guest memory a VM may have, in MiB: 63 GiB (the guest kernel maps
/// 64 GiB of physical addresses, less the 1 GiB hole below 4 GiB). The VMM
/// checks at compile time that its own limit is the same.
pub const MAX_MEM_SIZE_MIB: u64 = 64512;
/// Least guest memory a VM may have, in MiB: the smallest the guest kernel
/// boots in (measured: `vmm run --no-api --mem-mib 5 --cmdline workload=exit`
/// exits 0 with 1 to 32 vCPUs, every memmap strategy, memmap on memory and
/// ring 0; with 4 MiB the guest exits 102 and with 2 MiB it faults). A
/// smaller machine is refused at `PUT /machine-config` instead of failing
/// after `InstanceStart`.
pub const MIN_MEM_SIZE_MIB: u64 = 5;
/// Smallest memmap chunk, in KiB (matches the guest's `MIN_CHUNK_SIZE`).
pub const MIN_CHUNK_KIB: u64 = 128;
/// Largest memmap chunk, in KiB (128 MiB: one memory section).
pub const MAX_CHUNK_KIB: u64 = 128 << 10;

/// Default vCPU count.
pub const DEFAULT_VCPU_COUNT: u8 = 1;
/// Default guest memory, in MiB.
pub const DEFAULT_MEM_SIZE_MIB: u64 = 2048;
/// Default memmap chunk, in KiB (matches the guest's `DEFAULT_CHUNK_SIZE`).
pub const DEFAULT_CHUNK_KIB: u64 = 2048;

/// How the guest initializes its memmap (the page metadata array); passed to
/// the guest as `memmap_init=` on its command line. JSON: `"eager"`,
/// `"parallel"`, `"deferred"`, `"ondemand"`. It is the guest contract's own
/// type, so the API and the guest cannot disagree on the set or the names.
pub use guest_abi::Strategy;

/// How much freed guest memory goes back to the host; passed to the guest
/// as `reclaim=`. JSON: `"off"`, `"data"`, `"full"`. The guest contract's
/// own type, like [`Strategy`].
pub use guest_abi::Reclaim;

/// Longest reclaim delay (`reclaim_delay_ms`): ten minutes.
pub const MAX_RECLAIM_DELAY_MS: u32 = 600_000;

/// The privilege level the guest kernel runs its code at after entry.
///
/// JSON: always written as a string, `"auto"`, `"0"` or `"3"`, so the field
/// has a single type; on input the integers `0` and `3` are accepted too,
/// since that is what people type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuestCpl {
    /// Let the guest choose.
    #[default]
    Auto,
    /// Ring 0.
    Ring0,
    /// Ring 3.
    Ring3,
}

impl GuestCpl {
    /// All values.
    pub const ALL: [GuestCpl; 3] = [GuestCpl::Auto, GuestCpl::Ring0, GuestCpl::Ring3];

    /// The JSON (and command-line, `cpl=`) spelling.
    pub const fn name(self) -> &'static str {
        match self {
            GuestCpl::Auto => "auto",
            GuestCpl::Ring0 => "0",
            GuestCpl::Ring3 => "3",
        }
    }

    /// Parses a name as written by [`GuestCpl::name`].
    pub fn from_name(name: &str) -> Option<GuestCpl> {
        GuestCpl::ALL.into_iter().find(|c| c.name() == name)
    }

    /// What the level means, in one line (for help texts).
    pub const fn summary(self) -> &'static str {
        match self {
            GuestCpl::Auto => "Ring 3 on a PVM host (where ring 0 is emulated), ring 0 elsewhere",
            GuestCpl::Ring0 => "Ring 0, the classic kernel",
            GuestCpl::Ring3 => "Ring 3, deprivileged (as Xen PV and PVM guests run)",
        }
    }
}

impl fmt::Display for GuestCpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for GuestCpl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for GuestCpl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GuestCpl, D::Error> {
        struct CplVisitor;
        impl de::Visitor<'_> for CplVisitor {
            type Value = GuestCpl;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""auto", "0", "3", 0 or 3"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GuestCpl, E> {
                GuestCpl::from_name(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GuestCpl, E> {
                match v {
                    0 => Ok(GuestCpl::Ring0),
                    3 => Ok(GuestCpl::Ring3),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GuestCpl, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_any(CplVisitor)
    }
}

/// How the host backs guest memory. JSON: `"None"` or `"2M"`, Firecracker's
/// `huge_pages` enum (anything else, such as this VMM's old `true`, is an
/// error that names the two values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum HugePages {
    /// 4 KiB host pages (so residency counts exactly what the guest touched).
    #[default]
    None,
    /// 2 MiB host pages: transparent huge pages, asked for with
    /// `MADV_HUGEPAGE` (Firecracker uses a hugetlbfs pool instead).
    #[serde(rename = "2M")]
    Size2M,
}

impl HugePages {
    /// All values.
    pub const ALL: [HugePages; 2] = [HugePages::None, HugePages::Size2M];

    /// Whether huge pages are asked for.
    pub const fn is_enabled(self) -> bool {
        matches!(self, HugePages::Size2M)
    }

    /// The JSON spelling.
    pub const fn name(self) -> &'static str {
        match self {
            HugePages::None => "None",
            HugePages::Size2M => "2M",
        }
    }

    /// `Size2M` when `enabled`, else `None` (for the `--huge-pages` flag).
    pub const fn from_enabled(enabled: bool) -> HugePages {
        if enabled {
            HugePages::Size2M
        } else {
            HugePages::None
        }
    }
}

impl<'de> Deserialize<'de> for HugePages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HugePages, D::Error> {
        struct HugePagesVisitor;
        impl de::Visitor<'_> for HugePagesVisitor {
            type Value = HugePages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"huge_pages "None" or "2M""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HugePages, E> {
                HugePages::ALL
                    .into_iter()
                    .find(|h| h.name() == v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(HugePagesVisitor)
    }
}

/// Firecracker's CPU templates (`cpu_template`). This VMM passes the CPUID
/// KVM supports and has no templates: only `"None"` is accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel Cascade Lake.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// ARM Neoverse V1.
    V1N1,
    /// No template: the host's CPUID as KVM supports it.
    #[default]
    None,
}

impl CpuTemplate {
    /// All values, in Firecracker's order.
    pub const ALL: [CpuTemplate; 7] = [
        CpuTemplate::C3,
        CpuTemplate::T2,
        CpuTemplate::T2S,
        CpuTemplate::T2CL,
        CpuTemplate::T2A,
        CpuTemplate::V1N1,
        CpuTemplate::None,
    ];
}

/// The full machine configuration, as `GET /machine-config` answers it.
/// The first six fields are Firecracker's `MachineConfiguration`; the rest
/// are this VMM's extensions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=32.
    pub vcpu_count: u8,
    /// Guest memory in MiB: more than 0 (a multiple of 2 with `huge_pages`).
    pub mem_size_mib: u64,
    /// Simultaneous multithreading; always `false` here.
    pub smt: bool,
    /// Dirty page tracking (for snapshots); always `false` here.
    pub track_dirty_pages: bool,
    /// CPU template; always `"None"` here.
    pub cpu_template: CpuTemplate,
    /// How the host backs guest memory.
    pub huge_pages: HugePages,
    /// How the guest initializes its memmap.
    pub memmap_init: Strategy,
    /// Memmap initialization unit in KiB: a power of two in 128..=131072.
    pub memmap_chunk_kib: u64,
    /// Privilege level of the guest kernel.
    pub guest_cpl: GuestCpl,
    /// Place the memmap in the memory it describes (like Linux's
    /// `memmap_on_memory`) rather than in one block at the start.
    pub memmap_on_memory: bool,
    /// What freed guest memory goes back to the host; `null` takes the
    /// strategy's default ([`MachineConfig::effective_reclaim`]: `full` for
    /// `ondemand`, `off` for the others). `full` needs `ondemand`.
    #[serde(default)]
    pub reclaim: Option<Reclaim>,
    /// How long memory stays free before the guest reports it, in ms
    /// (0..=600000); `null` takes the guest's default (2000, as Linux's
    /// `page_reporting`).
    #[serde(default)]
    pub reclaim_delay_ms: Option<u32>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            cpu_template: CpuTemplate::None,
            huge_pages: HugePages::None,
            memmap_init: Strategy::OnDemand,
            memmap_chunk_kib: DEFAULT_CHUNK_KIB,
            guest_cpl: GuestCpl::Auto,
            memmap_on_memory: false,
            reclaim: None,
            reclaim_delay_ms: None,
        }
    }
}

/// The body of `PUT /machine-config`: a whole configuration. `vcpu_count`
/// and `mem_size_mib` are required (as in Firecracker); every other field
/// left out (or `null`) takes its default, whatever was set before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPut {
    /// See [`MachineConfig::vcpu_count`].
    pub vcpu_count: u8,
    /// See [`MachineConfig::mem_size_mib`].
    pub mem_size_mib: u64,
    /// See [`MachineConfig::smt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::cpu_template`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// See [`MachineConfig::huge_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// See [`MachineConfig::memmap_init`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_init: Option<Strategy>,
    /// See [`MachineConfig::memmap_chunk_kib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_chunk_kib: Option<u64>,
    /// See [`MachineConfig::guest_cpl`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpl: Option<GuestCpl>,
    /// See [`MachineConfig::memmap_on_memory`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_on_memory: Option<bool>,
    /// See [`MachineConfig::reclaim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<Reclaim>,
    /// See [`MachineConfig::reclaim_delay_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_delay_ms: Option<u32>,
}

impl MachineConfigPut {
    /// The configuration this body describes: the defaults, with the fields
    /// given replaced (no validation).
    pub fn into_config(self) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            ..MachineConfig::default().merged(&MachineConfigUpdate {
                vcpu_count: None,
                mem_size_mib: None,
                smt: self.smt,
                track_dirty_pages: self.track_dirty_pages,
                cpu_template: self.cpu_template,
                huge_pages: self.huge_pages,
                memmap_init: self.memmap_init,
                memmap_chunk_kib: self.memmap_chunk_kib,
                guest_cpl: self.guest_cpl,
                memmap_on_memory: self.memmap_on_memory,
                reclaim: self.reclaim,
                reclaim_delay_ms: self.reclaim_delay_ms,
            })
        }
    }
}

/// The body of `PATCH /machine-config`: the fields to change; absent (or
/// `null`) fields keep their current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// See [`MachineConfig::vcpu_count`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// See [`MachineConfig::mem_size_mib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfig::smt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::cpu_template`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// See [`MachineConfig::huge_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// See [`MachineConfig::memmap_init`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_init: Option<Strategy>,
    /// See [`MachineConfig::memmap_chunk_kib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_chunk_kib: Option<u64>,
    /// See [`MachineConfig::guest_cpl`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpl: Option<GuestCpl>,
    /// See [`MachineConfig::memmap_on_memory`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memmap_on_memory: Option<bool>,
    /// See [`MachineConfig::reclaim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<Reclaim>,
    /// See [`MachineConfig::reclaim_delay_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_delay_ms: Option<u32>,
}

/// Why a machine configuration was refused. Each message names the field, the
/// rule and the value given, and says what to send instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineConfigError {
    /// `vcpu_count` out of range.
    #[error("vCPU count (vcpu_count) must be between 1 and {MAX_VCPUS} (got {0})")]
    VcpuCount(u8),
    /// `mem_size_mib` below what the guest boots in.
    #[error("memory size (mem_size_mib) must be at least {MIN_MEM_SIZE_MIB} MiB, the least the guest boots in (got {0}); the default is {DEFAULT_MEM_SIZE_MIB}")]
    MemSizeTooSmall(u64),
    /// `mem_size_mib` is odd while 2 MiB huge pages are asked for.
    #[error("memory size (mem_size_mib) must be a multiple of 2 MiB with huge_pages \"2M\" (got {0}); use {below} or {above}, or huge_pages \"None\"", below = .0 - 1, above = .0 + 1)]
    MemSizeNotHugePageMultiple(u64),
    /// `mem_size_mib` too large.
    #[error("memory size (mem_size_mib) must be at most {MAX_MEM_SIZE_MIB} MiB, what this VMM can map for a guest (got {0})")]
    MemSizeTooLarge(u64),
    /// `memmap_chunk_kib` is not a power of two.
    #[error("memmap chunk (memmap_chunk_kib) must be a power of two (got {got}); use {below} or {above}", got = .0, below = prev_power_of_two(*.0), above = .0.next_power_of_two())]
    ChunkNotPowerOfTwo(u64),
    /// `memmap_chunk_kib` out of range.
    #[error("memmap chunk (memmap_chunk_kib) must be between {MIN_CHUNK_KIB} and {MAX_CHUNK_KIB} KiB (got {0})")]
    ChunkOutOfRange(u64),
    /// `smt: true`.
    #[error("smt: true is not supported by this VMM: its vCPUs are presented as single-threaded cores; send smt: false or leave it out")]
    SmtUnsupported,
    /// `track_dirty_pages: true`.
    #[error("track_dirty_pages: true is not supported by this VMM: it has no snapshots and logs no dirty pages; send false or leave it out")]
    DirtyPagesUnsupported,
    /// `reclaim: "full"` with a strategy other than `ondemand`.
    #[error("reclaim \"full\" needs memmap_init \"ondemand\" (got \"{0}\"): {0} initializes the whole memmap by design, so only free data pages can go back; send reclaim \"data\" or \"off\", or leave it out")]
    ReclaimFullNeedsOnDemand(Strategy),
    /// `reclaim_delay_ms` too large.
    #[error("reclaim delay (reclaim_delay_ms) must be at most {MAX_RECLAIM_DELAY_MS} ms (got {0}); leave it out for the guest's default of 2000")]
    ReclaimDelayTooLong(u32),
    /// A CPU template other than `None`.
    #[error("cpu_template {0:?} is not supported by this VMM: it passes the CPUID KVM supports and has no templates; send \"None\" or leave it out")]
    CpuTemplateUnsupported(CpuTemplate),
}

/// The largest power of two not above `v` (`v` > 0).
fn prev_power_of_two(v: u64) -> u64 {
    1 << (63 - v.max(1).leading_zeros())
}

impl MachineConfig {
    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), MachineConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(MachineConfigError::VcpuCount(self.vcpu_count));
        }
        match self.mem_size_mib {
            m if m < MIN_MEM_SIZE_MIB => return Err(MachineConfigError::MemSizeTooSmall(m)),
            m if m > MAX_MEM_SIZE_MIB => return Err(MachineConfigError::MemSizeTooLarge(m)),
            m if m % 2 != 0 && self.huge_pages.is_enabled() => {
                return Err(MachineConfigError::MemSizeNotHugePageMultiple(m))
            }
            _ => {}
        }
        if self.smt {
            return Err(MachineConfigError::SmtUnsupported);
        }
        if self.track_dirty_pages {
            return Err(MachineConfigError::DirtyPagesUnsupported);
        }
        if self.cpu_template != CpuTemplate::None {
            return Err(MachineConfigError::CpuTemplateUnsupported(self.cpu_template));
        }
        let chunk = self.memmap_chunk_kib;
        if !(MIN_CHUNK_KIB..=MAX_CHUNK_KIB).contains(&chunk) {
            return Err(MachineConfigError::ChunkOutOfRange(chunk));
        }
        if !chunk.is_power_of_two() {
            return Err(MachineConfigError::ChunkNotPowerOfTwo(chunk));
        }
        if self.reclaim == Some(Reclaim::Full) && self.memmap_init != Strategy::OnDemand {
            return Err(MachineConfigError::ReclaimFullNeedsOnDemand(self.memmap_init));
        }
        if let Some(d) = self.reclaim_delay_ms.filter(|d| *d > MAX_RECLAIM_DELAY_MS) {
            return Err(MachineConfigError::ReclaimDelayTooLong(d));
        }
        Ok(())
    }

    /// The reclaim mode the VM runs with: the one set, else the strategy's
    /// default (`full` for `ondemand`, whose memmap can shrink again; `off`
    /// for the strategies that initialize all of it by design).
    pub fn effective_reclaim(&self) -> Reclaim {
        self.reclaim.unwrap_or(match self.memmap_init {
            Strategy::OnDemand => Reclaim::Full,
            _ => Reclaim::Off,
        })
    }

    /// Returns this config with the fields given in `update` replaced (no
    /// validation).
    pub fn merged(&self, update: &MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            cpu_template: update.cpu_template.unwrap_or(self.cpu_template),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
            memmap_init: update.memmap_init.unwrap_or(self.memmap_init),
            memmap_chunk_kib: update.memmap_chunk_kib.unwrap_or(self.memmap_chunk_kib),
            guest_cpl: update.guest_cpl.unwrap_or(self.guest_cpl),
            memmap_on_memory: update.memmap_on_memory.unwrap_or(self.memmap_on_memory),
            reclaim: update.reclaim.or(self.reclaim),
            reclaim_delay_ms: update.reclaim_delay_ms.or(self.reclaim_delay_ms),
        }
    }

    /// `PATCH`: applies a partial update. On success the merged config
    /// replaces this one; on error this one is unchanged.
    pub fn apply(&mut self, update: &MachineConfigUpdate) -> Result<(), MachineConfigError> {
        let merged = self.merged(update);
        merged.validate()?;
        *self = merged;
        Ok(())
    }

    /// `PUT`: replaces this config with the one `put` describes (defaults
    /// for what it leaves out). On error this one is unchanged.
    pub fn replace(&mut self, put: MachineConfigPut) -> Result<(), MachineConfigError> {
        let config = put.into_config();
        config.validate()?;
        *self = config;
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_size_bytes(&self) -> u64 {
        self.mem_size_mib << 20
    }

    /// Memmap chunk in bytes.
    pub fn memmap_chunk_bytes(&self) -> u64 {
        self.memmap_chunk_kib << 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> MachineConfigUpdate {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = MachineConfig::default();
        c.validate().unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "vcpu_count": 1, "mem_size_mib": 2048, "smt": false,
                "track_dirty_pages": false, "cpu_template": "None", "huge_pages": "None",
                "memmap_init": "ondemand", "memmap_chunk_kib": 2048, "guest_cpl": "auto",
                "memmap_on_memory": false, "reclaim": null, "reclaim_delay_ms": null
            })
        );
    }

    #[test]
    fn partial_update_changes_only_given_fields() {
        let mut c = MachineConfig::default();
        c.apply(&update(r#"{"vcpu_count": 4, "memmap_init": "deferred"}"#))
            .unwrap();
        assert_eq!(c.vcpu_count, 4);
        assert_eq!(c.memmap_init, Strategy::Deferred);
        assert_eq!(c.mem_size_mib, DEFAULT_MEM_SIZE_MIB);
        // A later update keeps the earlier one's fields.
        c.apply(&update(r#"{"mem_size_mib": 512, "huge_pages": null}"#))
            .unwrap();
        assert_eq!(
            (c.vcpu_count, c.mem_size_mib, c.huge_pages),
            (4, 512, HugePages::None)
        );
        // An empty update is a no-op.
        let before = c.clone();
        c.apply(&update("{}")).unwrap();
        assert_eq!(c, before);
    }

    #[test]
    fn reclaim_defaults_follow_the_strategy_and_full_needs_ondemand() {
        let mut c = MachineConfig::default();
        assert_eq!(c.effective_reclaim(), Reclaim::Full);
        c.apply(&update(r#"{"memmap_init": "eager"}"#)).unwrap();
        assert_eq!(c.effective_reclaim(), Reclaim::Off, "the default follows the strategy");
        let err = c.apply(&update(r#"{"reclaim": "full"}"#)).unwrap_err();
        assert_eq!(err, MachineConfigError::ReclaimFullNeedsOnDemand(Strategy::Eager));
        assert!(err.to_string().starts_with("reclaim \"full\" needs memmap_init \"ondemand\" (got \"eager\")"), "{err}");
        c.apply(&update(r#"{"reclaim": "data", "reclaim_delay_ms": 500}"#)).unwrap();
        assert_eq!((c.effective_reclaim(), c.reclaim_delay_ms), (Reclaim::Data, Some(500)));
        for s in ["parallel", "deferred"] {
            let e = c.merged(&update(&format!(r#"{{"memmap_init": "{s}", "reclaim": "full"}}"#))).validate();
            assert!(matches!(e, Err(MachineConfigError::ReclaimFullNeedsOnDemand(_))), "{s}");
        }
        let e = c.merged(&update(r#"{"reclaim_delay_ms": 600001}"#)).validate().unwrap_err();
        assert!(e.to_string().starts_with("reclaim delay (reclaim_delay_ms) must be at most 600000 ms"), "{e}");
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"reclaim": "all"}"#).is_err());
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"reclaim_delay_ms": -1}"#).is_err());
    }

    #[test]
    fn invalid_update_leaves_config_unchanged() {
        let mut c = MachineConfig::default();
        let err = c
            .apply(&update(r#"{"vcpu_count": 2, "mem_size_mib": 0}"#))
            .unwrap_err();
        assert_eq!(err, MachineConfigError::MemSizeTooSmall(0));
        assert_eq!(c, MachineConfig::default());
    }

    #[test]
    fn validation_messages_say_what_to_do() {
        let msg = |u: &str| {
            MachineConfig::default()
                .merged(&update(u))
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            msg(r#"{"mem_size_mib": 7, "huge_pages": "2M"}"#),
            "memory size (mem_size_mib) must be a multiple of 2 MiB with huge_pages \"2M\" (got 7); use 6 or 8, or huge_pages \"None\""
        );
        assert_eq!(
            msg(r#"{"smt": true}"#),
            "smt: true is not supported by this VMM: its vCPUs are presented as single-threaded cores; send smt: false or leave it out"
        );
        assert!(msg(r#"{"track_dirty_pages": true}"#).starts_with("track_dirty_pages: true is not supported"));
        assert_eq!(
            msg(r#"{"cpu_template": "T2"}"#),
            "cpu_template T2 is not supported by this VMM: it passes the CPUID KVM supports and has no templates; send \"None\" or leave it out"
        );
        assert_eq!(
            msg(r#"{"mem_size_mib": 0}"#),
            "memory size (mem_size_mib) must be at least 5 MiB, the least the guest boots in (got 0); the default is 2048"
        );
        assert!(msg(r#"{"mem_size_mib": 4}"#).starts_with("memory size (mem_size_mib) must be at least 5 MiB"));
        assert_eq!(MachineConfig::default().merged(&update(r#"{"mem_size_mib": 5}"#)).validate(), Ok(()));
        assert_eq!(
            msg(r#"{"vcpu_count": 0}"#),
            "vCPU count (vcpu_count) must be between 1 and 32 (got 0)"
        );
        assert_eq!(
            msg(r#"{"vcpu_count": 33}"#),
            "vCPU count (vcpu_count) must be between 1 and 32 (got 33)"
        );
        assert_eq!(
            msg(r#"{"memmap_chunk_kib": 1000}"#),
            "memmap chunk (memmap_chunk_kib) must be a power of two (got 1000); use 512 or 1024"
        );
        assert_eq!(
            msg(r#"{"memmap_chunk_kib": 64}"#),
            "memmap chunk (memmap_chunk_kib) must be between 128 and 131072 KiB (got 64)"
        );
        assert_eq!(
            msg(r#"{"memmap_chunk_kib": 262144}"#),
            "memmap chunk (memmap_chunk_kib) must be between 128 and 131072 KiB (got 262144)"
        );
        assert_eq!(
            msg(r#"{"mem_size_mib": 2097152}"#),
            "memory size (mem_size_mib) must be at most 64512 MiB, what this VMM can map for a guest (got 2097152)"
        );
    }

    #[test]
    fn bounds_are_accepted() {
        for u in [
            r#"{"vcpu_count": 32, "mem_size_mib": 6, "memmap_chunk_kib": 128}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 64512, "memmap_chunk_kib": 131072}"#,
        ] {
            MachineConfig::default()
                .merged(&update(u))
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<MachineConfigUpdate>(r#"{"vcpus": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpus`"), "{err}");
        assert!(serde_json::from_str::<MachineConfig>(r#"{"x": 1}"#).is_err());
    }

    #[test]
    fn vcpu_count_out_of_u8_is_a_parse_error() {
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"vcpu_count": 300}"#).is_err());
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"vcpu_count": -1}"#).is_err());
    }

    #[test]
    fn strategy_names() {
        for s in Strategy::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), s);
            assert_eq!(Strategy::from_name(s.name()), Some(s));
        }
        assert!(serde_json::from_str::<Strategy>(r#""OnDemand""#).is_err());
    }

    #[test]
    fn guest_cpl_is_written_as_string_and_read_from_string_or_integer() {
        for c in GuestCpl::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
            assert_eq!(serde_json::from_str::<GuestCpl>(&json).unwrap(), c);
        }
        assert_eq!(
            serde_json::from_str::<GuestCpl>("0").unwrap(),
            GuestCpl::Ring0
        );
        assert_eq!(
            serde_json::from_str::<GuestCpl>("3").unwrap(),
            GuestCpl::Ring3
        );
        for bad in ["1", "-1", "\"ring0\"", "\"\"", "true", "null", "3.0"] {
            assert!(serde_json::from_str::<GuestCpl>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn put_replaces_with_defaults_and_requires_vcpus_and_memory() {
        let mut c = MachineConfig::default();
        c.apply(&update(r#"{"memmap_init": "eager", "guest_cpl": "0"}"#)).unwrap();
        let put: MachineConfigPut = serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 257}"#).unwrap();
        c.replace(put).unwrap();
        assert_eq!(c, MachineConfig { vcpu_count: 2, mem_size_mib: 257, ..MachineConfig::default() });
        for missing in [r#"{"vcpu_count": 2}"#, r#"{"mem_size_mib": 128}"#, "{}"] {
            let err = serde_json::from_str::<MachineConfigPut>(missing).unwrap_err();
            assert!(err.to_string().contains("missing field"), "{missing}: {err}");
        }
        // Firecracker's full body, as its clients send it.
        let put: MachineConfigPut = serde_json::from_str(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false,
                "cpu_template": "None", "huge_pages": "2M"}"#,
        )
        .unwrap();
        let before = c.clone();
        c.replace(put).unwrap();
        assert_eq!((c.mem_size_mib, c.huge_pages), (128, HugePages::Size2M));
        // An invalid PUT changes nothing.
        let mut d = before.clone();
        let bad: MachineConfigPut = serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#).unwrap();
        assert_eq!(d.replace(bad), Err(MachineConfigError::SmtUnsupported));
        assert_eq!(d, before);
    }

    #[test]
    fn odd_memory_sizes_are_valid_without_huge_pages() {
        for m in [5, 7, 257, 64511] {
            let c = MachineConfig { mem_size_mib: m, ..MachineConfig::default() };
            c.validate().unwrap();
        }
    }

    #[test]
    fn huge_pages_and_cpu_template_are_firecrackers_strings() {
        assert_eq!(serde_json::to_value(HugePages::Size2M).unwrap(), "2M");
        assert_eq!(serde_json::to_value(HugePages::None).unwrap(), "None");
        assert_eq!(serde_json::from_str::<HugePages>(r#""2M""#).unwrap(), HugePages::Size2M);
        for bad in ["true", "false", r#""1G""#, r#""none""#, "2"] {
            let e = serde_json::from_str::<HugePages>(bad).unwrap_err();
            assert!(e.to_string().contains(r#"expected huge_pages "None" or "2M""#), "{bad}: {e}");
        }
        assert!(HugePages::from_enabled(true).is_enabled() && !HugePages::from_enabled(false).is_enabled());
        for t in CpuTemplate::ALL {
            let v = serde_json::to_value(t).unwrap();
            assert_eq!(serde_json::from_value::<CpuTemplate>(v).unwrap(), t);
        }
        assert!(serde_json::from_str::<CpuTemplate>(r#""T3""#).is_err());
    }

    #[test]
    fn byte_helpers() {
        let c = MachineConfig::default();
        assert_eq!(c.mem_size_bytes(), 2048 << 20);
        assert_eq!(c.memmap_chunk_bytes(), 2 << 20);
    }
}
