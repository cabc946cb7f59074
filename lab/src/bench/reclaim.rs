//! Benchmark 4, memory reclaim: what a 2 GiB ondemand guest gives back
//! after it held 1 GiB, per reclaim mode, and what that costs.
//!
//! - **Full reclaim** (`full`, `data`, `off`, one VM each per round,
//!   interleaved): the guest holds 1 GiB (`PUT /guest/memory`, every page
//!   written), frees it, and `GET /memory` is read every 50 ms for
//!   `reclaim_delay` + 2 s. The settled figures are those of the last read;
//!   the time to settle is when the host's figures (guest RAM and memmap
//!   resident, KVM-registered bytes) last changed, counted from the end of
//!   the free. The footprint above idle is guest RAM resident plus KVM's
//!   estimated memslot metadata, each less its idle figure.
//! - **Reallocation**: the same VM then allocates 1 GiB again; the ratio is
//!   second / first allocation time (`PUT /guest/memory` wall time).
//! - **Churn**: a `full`, a `data` and an `off` VM, side by side, run
//!   alloc/free cycles around the guest's reclaim reserve
//!   (`reclaim_reserve=`, 4 MiB: targets of 2, 4 and 6 MiB in turn, then 0),
//!   one cycle on each VM in turn (the first VM rotating). Fast cycles (no pause: faster than the
//!   reclaim delay) and slow ones (a pause longer than the delay after each
//!   free, so that every free is reported). Reported: the median allocation
//!   time per VM, the ratios full / off and full / data, and the reclaim
//!   events, chunks de-initialized and memslots deleted after each half of
//!   the cycles (whether they grow with the number of cycles).
//!
//! Every figure comes from the VMM's `GET /memory` (`mincore` and the
//! registrar) and the host's wall clock around each API call.

use super::child::{cmdline, round_robin, strings, Bench, BenchError};
use crate::stats::{ratio, Sorted};
use api::{Endpoint, GuestMemoryOutcome, GuestMemoryStatus, GuestMemoryTarget, MemoryReport};
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guest memory of every VM of this benchmark, in MiB.
const MEM_MIB: u64 = 2048;
/// What the guest holds, then frees, in MiB.
const HELD_MIB: u64 = 1024;
/// The reclaim delay of the full-reclaim VMs, in ms.
const DELAY_MS: u64 = 1000;
/// The reclaim delay of the churn VMs, in ms (the slow cycles pause longer).
const CHURN_DELAY_MS: u64 = 200;
/// Churn targets, in MiB, around the default 4 MiB reserve.
const CHURN_MIB: [u64; 3] = [2, 4, 6];
/// How often `GET /memory` is read while the guest settles.
const POLL: Duration = Duration::from_millis(50);

/// A `vmm run` child with an API socket, shut down when dropped.
struct Vm {
    child: Child,
    sock: PathBuf,
    cmd: String,
    client: vmm_client::Client,
}

impl Vm {
    /// Starts `vmm ARGS --api-sock SOCK` and waits until the guest is ready.
    fn start(b: &Bench, tag: &str, mut args: Vec<String>) -> Result<Vm, BenchError> {
        let sock = std::env::temp_dir().join(format!("vmm-bench-reclaim-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        args.extend(strings(&["--api-sock", &sock.display().to_string()]));
        let cmd = cmdline(&args);
        let client = vmm_client::Client::new()
            .map_err(|source| BenchError::Api { cmd: cmd.clone(), source })?
            .with_timeout(Duration::from_secs(60));
        let child = Command::new(&b.vmm)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Spawn { cmd: cmd.clone(), source })?;
        let mut vm = Vm { child, sock, cmd, client };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(BenchError::Exit { cmd: vm.cmd.clone(), status: status.to_string(), stderr_tail: String::new() });
            }
            if let Ok(r) = vm.client.get::<MemoryReport>(&vm.sock, Endpoint::GetMemory) {
                if r.valid && r.timings.guest_ready.is_some() {
                    return Ok(vm);
                }
            }
            if Instant::now() > deadline {
                return Err(vm.guest_error("not ready within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn guest_error(&self, what: &str) -> BenchError {
        BenchError::Guest { cmd: self.cmd.clone(), what: what.into() }
    }

    /// `GET /memory`.
    fn memory(&self) -> Result<MemoryReport, BenchError> {
        self.client
            .get(&self.sock, Endpoint::GetMemory)
            .map_err(|source| BenchError::Api { cmd: self.cmd.clone(), source })
    }

    /// `PUT /guest/memory` to `mib`; returns its wall time in ms.
    fn set_memory(&self, mib: u64) -> Result<f64, BenchError> {
        let body = serde_json::to_value(GuestMemoryTarget { target_mib: mib }).ok();
        let t = Instant::now();
        let s: GuestMemoryStatus = self
            .client
            .call(&self.sock, Endpoint::PutGuestMemory, body.as_ref())
            .map_err(|source| BenchError::Api { cmd: self.cmd.clone(), source })?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if s.status != GuestMemoryOutcome::Ok || s.held_bytes != mib << 20 {
            return Err(self.guest_error(&format!("set-memory {mib}: {:?}, holding {} bytes", s.status, s.held_bytes)));
        }
        Ok(ms)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The VMM closes the connection as it exits, so the answer says
        // nothing. Kill it if it does not stop.
        let shutdown = serde_json::to_value(api::InstanceActionInfo { action_type: api::ActionType::Shutdown }).ok();
        let _ = self.client.call::<serde_json::Value>(&self.sock, Endpoint::PutActions, shutdown.as_ref());
        let stop = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < stop => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// The host's figures of one report, and the reclaim counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Footprint {
    pub guest_ram_resident_bytes: u64,
    pub memmap_resident_bytes: u64,
    pub kvm_registered_bytes: u64,
    pub kvm_memslot_bytes_estimate: u64,
    pub discarded_bytes: u64,
    pub reclaim_events: u64,
    pub chunks_deinitialized: Option<u64>,
    pub memslots_unregistered: u64,
}

impl Footprint {
    fn of(r: &MemoryReport) -> Footprint {
        Footprint {
            guest_ram_resident_bytes: r.host.guest_ram_resident_bytes,
            memmap_resident_bytes: r.host.memmap_resident_bytes,
            kvm_registered_bytes: r.host.kvm_registered_bytes,
            kvm_memslot_bytes_estimate: r.host.kvm_memslot_bytes_estimate,
            discarded_bytes: r.reclaim.discarded_bytes,
            reclaim_events: r.reclaim.events,
            chunks_deinitialized: r.reclaim.chunks_deinitialized,
            memslots_unregistered: r.reclaim.memslots_unregistered,
        }
    }

    /// The figures the settle time follows: what the host holds.
    fn host(&self) -> (u64, u64, u64) {
        (self.guest_ram_resident_bytes, self.memmap_resident_bytes, self.kvm_registered_bytes)
    }

    /// Host bytes above `idle`: guest RAM resident plus KVM's estimated
    /// metadata (negative if below).
    fn above(&self, idle: &Footprint) -> i64 {
        (self.guest_ram_resident_bytes as i64 - idle.guest_ram_resident_bytes as i64)
            + (self.kvm_memslot_bytes_estimate as i64 - idle.kvm_memslot_bytes_estimate as i64)
    }
}

/// When the samples `(ms, figures)` last changed: the time of the first
/// sample equal to the last one with every later sample equal too; `None`
/// if nothing changed at all.
fn settle_ms(samples: &[(f64, Footprint)]) -> Option<f64> {
    let last = samples.last()?.1.host();
    let i = samples.iter().rposition(|(_, f)| f.host() != last)?;
    samples.get(i + 1).map(|(t, _)| *t)
}

/// One round of one mode: idle, holding, settled after the free, again.
#[derive(Debug, Serialize)]
struct ReclaimSample {
    idle: Option<Footprint>,
    holding: Option<Footprint>,
    settled: Option<Footprint>,
    /// ms from the end of the free to the last change of the host figures.
    settle_ms: Option<f64>,
    /// Whether the guest was back to idle + 1 MiB (guest RAM + KVM metadata).
    back_within_1_mib: Option<bool>,
    first_alloc_ms: Option<f64>,
    second_alloc_ms: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ReclaimVariant {
    pub mode: &'static str,
    command: String,
    samples: Vec<ReclaimSample>,
    /// Medians over the rounds (of samples without error).
    pub median_idle: Option<Footprint>,
    pub median_settled: Option<Footprint>,
    pub median_settle_ms: Option<f64>,
    pub median_above_idle_bytes: Option<f64>,
    pub median_realloc_ratio: Option<f64>,
    pub median_first_alloc_ms: Option<f64>,
    pub median_second_alloc_ms: Option<f64>,
}

/// The churn of one VM.
#[derive(Debug, Serialize)]
pub struct ChurnVm {
    pub mode: &'static str,
    command: String,
    /// Allocation wall time per cycle, fast cycles then slow ones (ms).
    fast_alloc_ms: Vec<f64>,
    slow_alloc_ms: Vec<f64>,
    pub median_fast_alloc_ms: Option<f64>,
    pub median_slow_alloc_ms: Option<f64>,
    /// Counters after half the fast cycles, after all, after half the slow
    /// ones and after all.
    pub after: Vec<(&'static str, Footprint)>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChurnResults {
    pub cycles: usize,
    pub targets_mib: [u64; 3],
    pub delay_ms: u64,
    pub vms: Vec<ChurnVm>,
    /// Median allocation time, full / off.
    pub fast_ratio_full_to_off: Option<f64>,
    pub slow_ratio_full_to_off: Option<f64>,
    /// Median allocation time, full / data (what `full` adds to free page
    /// reporting).
    pub fast_ratio_full_to_data: Option<f64>,
    pub slow_ratio_full_to_data: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ReclaimResults {
    pub mem_mib: u64,
    pub held_mib: u64,
    pub delay_ms: u64,
    pub variants: Vec<ReclaimVariant>,
    pub churn: ChurnResults,
}

/// `vmm run` arguments of a 2 GiB ondemand guest in `mode` with `delay_ms`.
fn run_args(mode: &str, delay_ms: u64) -> Vec<String> {
    strings(&[
        "run", "--mem-mib", &MEM_MIB.to_string(), "--serial", "none", "--memmap-init", "ondemand",
        "--reclaim", mode, "--reclaim-delay-ms", &delay_ms.to_string(),
    ])
}

/// One round of the full-reclaim benchmark for the VM `args` boots.
fn reclaim_once(b: &Bench, tag: &str, args: &[String], sample: &mut ReclaimSample) -> Result<(), BenchError> {
    let vm = Vm::start(b, tag, args.to_vec())?;
    let idle = Footprint::of(&vm.memory()?);
    sample.idle = Some(idle);
    sample.first_alloc_ms = Some(vm.set_memory(HELD_MIB)?);
    sample.holding = Some(Footprint::of(&vm.memory()?));
    vm.set_memory(0)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let end = Duration::from_millis(DELAY_MS + 2000);
    while t0.elapsed() < end {
        let r = vm.memory()?;
        if !r.valid {
            return Err(vm.guest_error(&format!("invalid report: {:?}", r.invalid_reason)));
        }
        samples.push((t0.elapsed().as_secs_f64() * 1e3, Footprint::of(&r)));
        std::thread::sleep(POLL);
    }
    let settled = samples.last().map(|(_, f)| *f).unwrap_or_default();
    sample.settled = Some(settled);
    sample.settle_ms = settle_ms(&samples);
    sample.back_within_1_mib = Some(settled.above(&idle) <= 1 << 20);
    sample.second_alloc_ms = Some(vm.set_memory(HELD_MIB)?);
    Ok(())
}

/// The median footprint of `fs`, field by field.
fn median_footprint<'a>(fs: impl Iterator<Item = &'a Footprint> + Clone) -> Option<Footprint> {
    let m = |f: fn(&Footprint) -> u64| Sorted::new(fs.clone().map(|x| f(x) as f64)).median().map(|v| v as u64);
    Some(Footprint {
        guest_ram_resident_bytes: m(|f| f.guest_ram_resident_bytes)?,
        memmap_resident_bytes: m(|f| f.memmap_resident_bytes)?,
        kvm_registered_bytes: m(|f| f.kvm_registered_bytes)?,
        kvm_memslot_bytes_estimate: m(|f| f.kvm_memslot_bytes_estimate)?,
        discarded_bytes: m(|f| f.discarded_bytes)?,
        reclaim_events: m(|f| f.reclaim_events)?,
        chunks_deinitialized: Sorted::new(fs.clone().filter_map(|x| x.chunks_deinitialized).map(|v| v as f64)).median().map(|v| v as u64),
        memslots_unregistered: m(|f| f.memslots_unregistered)?,
    })
}

/// Runs `cycles` churn cycles on every VM in turn, starting one VM further
/// each cycle (so that no VM always goes first); `pause` after each free.
fn churn_cycles(vms: &[Vm], cycles: usize, pause: Duration, times: &mut [Vec<f64>]) -> Result<(), BenchError> {
    let k = vms.len().min(times.len());
    for c in 0..cycles {
        for j in 0..k {
            let i = (c + j) % k;
            times[i].push(vms[i].set_memory(CHURN_MIB[c % CHURN_MIB.len()])?);
            vms[i].set_memory(0)?;
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

/// Waits until every VM's guest has reported what it freed (its reclaim
/// events stop changing for twice the delay), then takes its counters.
fn quiet_counters(vms: &[Vm]) -> Result<Vec<Footprint>, BenchError> {
    let quiet = Duration::from_millis(2 * CHURN_DELAY_MS + 200);
    vms.iter()
        .map(|vm| {
            let mut last = Footprint::of(&vm.memory()?);
            let mut since = Instant::now();
            let deadline = Instant::now() + Duration::from_secs(10);
            while since.elapsed() < quiet && Instant::now() < deadline {
                std::thread::sleep(POLL);
                let f = Footprint::of(&vm.memory()?);
                if f != last {
                    (last, since) = (f, Instant::now());
                }
            }
            Ok(last)
        })
        .collect()
}

/// The churn benchmark: `cycles` fast then `cycles` slow cycles on a `full`
/// and an `off` VM.
fn churn(b: &Bench, cycles: usize) -> ChurnResults {
    let modes = ["full", "data", "off"];
    let mut out: Vec<ChurnVm> = modes
        .iter()
        .map(|&mode| ChurnVm {
            mode,
            command: cmdline(&run_args(mode, CHURN_DELAY_MS)),
            fast_alloc_ms: Vec::new(),
            slow_alloc_ms: Vec::new(),
            median_fast_alloc_ms: None,
            median_slow_alloc_ms: None,
            after: Vec::new(),
            error: None,
        })
        .collect();
    let run = |out: &mut Vec<ChurnVm>| -> Result<(), BenchError> {
        let vms = modes
            .iter()
            .map(|&m| Vm::start(b, &format!("churn-{m}"), run_args(m, CHURN_DELAY_MS)))
            .collect::<Result<Vec<Vm>, BenchError>>()?;
        let half = cycles.div_ceil(2);
        let pause = Duration::from_millis(CHURN_DELAY_MS + 300);
        for (name, n, slow) in [("fast, half", half, false), ("fast, all", cycles - half, false), ("slow, half", half, true), ("slow, all", cycles - half, true)] {
            eprintln!("vmm bench: reclaim churn: {name} ({n} cycles per VM)");
            let mut times = vec![Vec::new(); vms.len()];
            churn_cycles(&vms, n, if slow { pause } else { Duration::ZERO }, &mut times)?;
            // Fast cycles: read the counters at once (well within the
            // delay, so the guest does not report in between); slow ones:
            // once the guest has reported what the last free gave back.
            let counters = if slow {
                quiet_counters(&vms)?
            } else {
                vms.iter().map(|vm| Ok(Footprint::of(&vm.memory()?))).collect::<Result<Vec<_>, BenchError>>()?
            };
            for ((o, t), f) in out.iter_mut().zip(times).zip(counters) {
                if slow { o.slow_alloc_ms.extend(t) } else { o.fast_alloc_ms.extend(t) }
                o.after.push((name, f));
            }
        }
        Ok(())
    };
    if let Err(e) = run(&mut out) {
        let msg = api::ErrorChain(&e).to_string();
        eprintln!("vmm bench: reclaim churn: {msg}");
        for o in &mut out {
            o.error = Some(msg.clone());
        }
    }
    for o in &mut out {
        o.median_fast_alloc_ms = Sorted::new(o.fast_alloc_ms.iter().copied()).median();
        o.median_slow_alloc_ms = Sorted::new(o.slow_alloc_ms.iter().copied()).median();
    }
    let med = |f: fn(&ChurnVm) -> Option<f64>, m: &str| out.iter().find(|o| o.mode == m).and_then(f);
    ChurnResults {
        cycles,
        targets_mib: CHURN_MIB,
        delay_ms: CHURN_DELAY_MS,
        fast_ratio_full_to_off: ratio(med(|o| o.median_fast_alloc_ms, "full"), med(|o| o.median_fast_alloc_ms, "off")),
        slow_ratio_full_to_off: ratio(med(|o| o.median_slow_alloc_ms, "full"), med(|o| o.median_slow_alloc_ms, "off")),
        fast_ratio_full_to_data: ratio(med(|o| o.median_fast_alloc_ms, "full"), med(|o| o.median_fast_alloc_ms, "data")),
        slow_ratio_full_to_data: ratio(med(|o| o.median_slow_alloc_ms, "full"), med(|o| o.median_slow_alloc_ms, "data")),
        vms: out,
    }
}

/// Runs the reclaim benchmark: `rounds` interleaved rounds over the three
/// modes, then the churn with `cycles` fast and `cycles` slow cycles.
pub fn measure(b: &Bench, rounds: usize, cycles: usize) -> ReclaimResults {
    let mut variants: Vec<(ReclaimVariant, Vec<String>)> = ["full", "data", "off"]
        .into_iter()
        .map(|mode| {
            let args = run_args(mode, DELAY_MS);
            let v = ReclaimVariant {
                mode,
                command: cmdline(&args),
                samples: Vec::new(),
                median_idle: None,
                median_settled: None,
                median_settle_ms: None,
                median_above_idle_bytes: None,
                median_realloc_ratio: None,
                median_first_alloc_ms: None,
                median_second_alloc_ms: None,
            };
            (v, args)
        })
        .collect();
    round_robin("reclaim round", rounds, &mut variants, |(v, args)| {
        let mut s = ReclaimSample {
            idle: None,
            holding: None,
            settled: None,
            settle_ms: None,
            back_within_1_mib: None,
            first_alloc_ms: None,
            second_alloc_ms: None,
            error: None,
        };
        if let Err(e) = reclaim_once(b, v.mode, args, &mut s) {
            s.error = Some(api::ErrorChain(&e).to_string());
            eprintln!("vmm bench: reclaim {}: {}", v.mode, s.error.as_deref().unwrap_or_default());
        }
        v.samples.push(s);
    });
    let mut variants: Vec<ReclaimVariant> = variants.into_iter().map(|(v, _)| v).collect();
    for v in &mut variants {
        let ok: Vec<&ReclaimSample> = v.samples.iter().filter(|s| s.error.is_none()).collect();
        v.median_idle = median_footprint(ok.iter().filter_map(|s| s.idle.as_ref()));
        v.median_settled = median_footprint(ok.iter().filter_map(|s| s.settled.as_ref()));
        v.median_settle_ms = Sorted::new(ok.iter().filter_map(|s| s.settle_ms)).median();
        v.median_above_idle_bytes =
            Sorted::new(ok.iter().filter_map(|s| Some(s.settled?.above(&s.idle?) as f64))).median();
        v.median_first_alloc_ms = Sorted::new(ok.iter().filter_map(|s| s.first_alloc_ms)).median();
        v.median_second_alloc_ms = Sorted::new(ok.iter().filter_map(|s| s.second_alloc_ms)).median();
        v.median_realloc_ratio =
            Sorted::new(ok.iter().filter_map(|s| ratio(s.second_alloc_ms, s.first_alloc_ms))).median();
    }
    ReclaimResults { mem_mib: MEM_MIB, held_mib: HELD_MIB, delay_ms: DELAY_MS, variants, churn: churn(b, cycles) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(ram: u64, reg: u64) -> Footprint {
        Footprint { guest_ram_resident_bytes: ram, kvm_registered_bytes: reg, ..Default::default() }
    }

    #[test]
    fn the_settle_time_is_the_last_change_of_the_host_figures() {
        let s = [(0.0, fp(9, 9)), (50.0, fp(9, 9)), (100.0, fp(1, 9)), (150.0, fp(1, 2)), (200.0, fp(1, 2))];
        assert_eq!(settle_ms(&s), Some(150.0));
        // Only the guest's counters changing does not count.
        let mut later = fp(1, 2);
        later.reclaim_events = 3;
        assert_eq!(settle_ms(&[(0.0, fp(1, 2)), (50.0, later)]), None, "the host figures never changed");
        assert_eq!(settle_ms(&[]), None);
    }

    #[test]
    fn the_footprint_above_idle_is_ram_plus_kvm_metadata() {
        let idle = Footprint { guest_ram_resident_bytes: 1000, kvm_memslot_bytes_estimate: 100, ..Default::default() };
        let after = Footprint { guest_ram_resident_bytes: 1500, kvm_memslot_bytes_estimate: 50, ..Default::default() };
        assert_eq!(after.above(&idle), 450);
        assert_eq!(idle.above(&after), -450);
    }

    #[test]
    fn every_vm_is_a_2_gib_ondemand_guest_in_its_mode() {
        let a = run_args("data", 1000);
        assert_eq!(
            cmdline(&a),
            "vmm run --mem-mib 2048 --serial none --memmap-init ondemand --reclaim data --reclaim-delay-ms 1000"
        );
    }

    #[test]
    fn medians_go_field_by_field() {
        let fs = [fp(1, 30), fp(5, 10), fp(3, 20)];
        let m = median_footprint(fs.iter()).unwrap();
        assert_eq!((m.guest_ram_resident_bytes, m.kvm_registered_bytes, m.chunks_deinitialized), (3, 20, None));
        assert_eq!(median_footprint([].iter()), None);
    }
}
