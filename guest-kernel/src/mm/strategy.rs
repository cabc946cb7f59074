//! The four memmap initialization strategies, dispatched here and nowhere
//! else: what each does at boot, what is left for later, and which CPUs do
//! it. The kernel hands [`MemoryManager::boot`](super::MemoryManager::boot)
//! its CPUs ([`Cpus`]) and runs the [`ApJob`] it is given on each
//! application processor; it never looks at the strategy itself.
//!
//! | strategy | boot CPU, before ready | other CPUs | afterwards |
//! | --- | --- | --- | --- |
//! | `Eager` | every chunk | — | nothing |
//! | `Parallel` | share 0 of `n`, then frees every chunk into the buddy | shares 1..`n` (like Linux's padata-parallel deferred init) | nothing |
//! | `Deferred` | the first section with memory | CPU 1 initializes the rest in the background (Linux's `pgdatinit`) | the boot CPU too, between commands (all of it without a CPU 1) |
//! | `OnDemand` | the first chunk with allocatable memory | — | the allocator's slow path, as needed ([`super::grow`]) |
//!
//! `Parallel` shares are disjoint by construction: each `(cpu, ncpus)` runs
//! once and owns a contiguous slice of the chunks; they only write struct
//! pages and bits. `parallel_finish` frees everything under the zone lock.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::Strategy;

use super::grow::Grower;

/// Most CPUs that may take a parallel share.
pub const MAX_PARALLEL_CPUS: u64 = 64;

/// Work a strategy gives an application processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApJob {
    /// Initialize share `cpu` of `ncpus` (`Parallel`).
    ParallelShare {
        /// CPUs taking part, the boot CPU included.
        ncpus: u32,
    },
    /// Initialize the rest of the memmap in the background (`Deferred`, CPU 1).
    Background,
}

impl ApJob {
    /// The job as one word, for a kernel to post to CPUs (never 0).
    pub const fn to_raw(self) -> u64 {
        match self {
            ApJob::ParallelShare { ncpus } => 1 << 32 | ncpus as u64,
            ApJob::Background => 2 << 32,
        }
    }

    /// The job [`ApJob::to_raw`] encoded; `None` for anything else (0: no job).
    pub const fn from_raw(raw: u64) -> Option<ApJob> {
        match (raw >> 32, raw as u32) {
            (1, ncpus) => Some(ApJob::ParallelShare { ncpus }),
            (2, 0) => Some(ApJob::Background),
            _ => None,
        }
    }
}

/// The CPUs a strategy may use, as the kernel provides them.
pub trait Cpus {
    /// CPUs available, the boot CPU included (at least 1).
    fn count(&self) -> u32;
    /// Starts CPUs `1..cpus` on `job`; each calls
    /// [`MemoryManager::run_ap_job`](super::MemoryManager::run_ap_job) with
    /// its index and then counts itself done.
    fn start(&self, job: ApJob, cpus: u32);
    /// Waits until every CPU started by [`Cpus::start`] is done.
    fn wait(&self);
    /// Called after each chunk a background job initializes and once at its
    /// end (the kernel publishes its stats there).
    fn progress(&self) {}
}

/// What [`MemoryManager::boot`](super::MemoryManager::boot) set going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Booted {
    /// CPUs that took part in memory initialization (or still do).
    pub cpus: u32,
    /// The boot CPU should call
    /// [`MemoryManager::background_step`](super::MemoryManager::background_step)
    /// while it is idle, until it returns false (`Deferred`, helping CPU 1
    /// if there is one).
    pub background_on_boot_cpu: bool,
}

/// Why [`MemoryManager::boot_init`](super::MemoryManager::boot_init) or
/// [`MemoryManager::boot`](super::MemoryManager::boot) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmBootError {
    /// `init` has not succeeded.
    NotInitialized,
    /// `boot_init` was already called.
    AlreadyBooted,
    /// The boot CPU's parallel share or the final free failed.
    Parallel(MmParallelError),
}

impl fmt::Display for MmBootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmBootError::NotInitialized => f.write_str("memory manager not initialized"),
            MmBootError::AlreadyBooted => f.write_str("memmap boot initialization already done"),
            MmBootError::Parallel(e) => write!(f, "parallel memmap initialization: {e}"),
        }
    }
}

impl From<MmParallelError> for MmBootError {
    fn from(e: MmParallelError) -> MmBootError {
        MmBootError::Parallel(e)
    }
}

/// Why a parallel-initialization call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmParallelError {
    /// The strategy is not `Parallel`.
    WrongStrategy,
    /// `boot_init` has not run.
    NotBooted,
    /// `cpu >= ncpus`, `ncpus` is 0 or above 64, or differs from an earlier call.
    BadShare,
    /// This CPU's share was already started.
    ShareTaken,
    /// `parallel_finish` ran before every share was done.
    SharesIncomplete,
    /// `parallel_finish` already ran.
    AlreadyFinished,
}

impl fmt::Display for MmParallelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmParallelError::WrongStrategy => "memmap strategy is not parallel",
            MmParallelError::NotBooted => "boot_init has not run",
            MmParallelError::BadShare => "bad cpu or cpu count for a parallel share",
            MmParallelError::ShareTaken => "this cpu's share already ran",
            MmParallelError::SharesIncomplete => "not every share is done",
            MmParallelError::AlreadyFinished => "parallel initialization already finished",
        })
    }
}

/// Which parallel shares were taken (all zero when empty).
pub(crate) struct ParallelShares {
    ncpus: AtomicU64,
    started: AtomicU64,
}

impl ParallelShares {
    pub(crate) const fn new() -> ParallelShares {
        ParallelShares {
            ncpus: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }
}

/// What the strategies need of a manager, borrowed for one operation.
pub(crate) struct Initializer<'a> {
    pub(crate) grow: Grower<'a>,
    pub(crate) shares: &'a ParallelShares,
}

impl Initializer<'_> {
    fn strategy(&self) -> Strategy {
        self.grow.cfg.strategy
    }

    /// Does the strategy's boot-time work on this CPU alone (the table in
    /// the module docs, first column; `Parallel` does nothing here).
    pub(crate) fn boot_init(&self) -> Result<(), MmBootError> {
        let strategy = self.strategy();
        if !self.grow.open(strategy == Strategy::Parallel) {
            return Err(MmBootError::AlreadyBooted);
        }
        let g = &self.grow;
        match strategy {
            Strategy::Eager => while g.grow_one(u64::MAX, false) {},
            Strategy::Parallel => {}
            Strategy::Deferred => {
                let per_section = g.mm.chunks_per_section();
                let first = g.mm.next_chunk(0).unwrap_or(0);
                let limit = (first / per_section + 1) * per_section;
                while g.grow_one(limit, false) {}
            }
            Strategy::OnDemand => {
                g.grow_one(u64::MAX, false);
            }
        }
        Ok(())
    }

    /// [`Initializer::boot_init`], then the rest of the table's boot-time
    /// work on the other CPUs.
    pub(crate) fn boot(&self, cpus: &impl Cpus) -> Result<Booted, MmBootError> {
        self.boot_init()?;
        let available = cpus.count().max(1);
        let alone = Booted {
            cpus: 1,
            background_on_boot_cpu: false,
        };
        Ok(match self.strategy() {
            Strategy::Eager | Strategy::OnDemand => alone,
            Strategy::Parallel => {
                let ncpus = available.min(MAX_PARALLEL_CPUS as u32);
                if ncpus > 1 {
                    cpus.start(ApJob::ParallelShare { ncpus }, ncpus);
                }
                let own = self.parallel_init_share(0, u64::from(ncpus));
                if ncpus > 1 {
                    // Even after an error: no AP is left running a share.
                    cpus.wait();
                }
                own?;
                self.parallel_finish()?;
                Booted {
                    cpus: ncpus,
                    ..alone
                }
            }
            Strategy::Deferred => {
                let helper = available >= 2;
                if helper {
                    cpus.start(ApJob::Background, 2);
                }
                Booted {
                    cpus: if helper { 2 } else { 1 },
                    background_on_boot_cpu: true,
                }
            }
        })
    }

    /// Runs `job` on application processor `cpu` (see [`Cpus::start`]).
    pub(crate) fn run_ap_job(
        &self,
        job: ApJob,
        cpu: u64,
        cpus: &impl Cpus,
    ) -> Result<(), MmParallelError> {
        match job {
            ApJob::ParallelShare { ncpus } if cpu < u64::from(ncpus) => {
                self.parallel_init_share(cpu, u64::from(ncpus))
            }
            ApJob::Background if cpu == 1 => {
                while self.background_step() {
                    cpus.progress();
                }
                cpus.progress();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Initializes one more chunk at the frontier; returns whether chunks
    /// remain behind it. Nothing (false) before `boot_init`, once nothing is
    /// left, and before `parallel_finish` for `Parallel`.
    pub(crate) fn background_step(&self) -> bool {
        if !self.grow.is_open() {
            return false;
        }
        self.grow.grow_one(u64::MAX, false);
        self.grow.pending()
    }

    /// Initializes this CPU's share of the struct pages (`Parallel`, after
    /// `boot_init`): a contiguous slice, 1/`ncpus` of the chunks.
    pub(crate) fn parallel_init_share(&self, cpu: u64, ncpus: u64) -> Result<(), MmParallelError> {
        if self.strategy() != Strategy::Parallel {
            return Err(MmParallelError::WrongStrategy);
        }
        {
            let z = self.grow.zone.lock();
            if !z.frontier.booted {
                return Err(MmParallelError::NotBooted);
            }
            if !z.frontier.parallel_pending {
                return Err(MmParallelError::AlreadyFinished);
            }
        }
        if ncpus == 0 || ncpus > MAX_PARALLEL_CPUS || cpu >= ncpus {
            return Err(MmParallelError::BadShare);
        }
        let s = self.shares;
        match s
            .ncpus
            .compare_exchange(0, ncpus, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(n) if n == ncpus => {}
            Err(_) => return Err(MmParallelError::BadShare),
        }
        if s.started.fetch_or(1 << cpu, Ordering::AcqRel) & (1 << cpu) != 0 {
            return Err(MmParallelError::ShareTaken);
        }
        let mm = self.grow.mm;
        let n = mm.totals().chunks_total;
        let (lo, hi) = (n * cpu / ncpus, n * (cpu + 1) / ncpus);
        let mut c = mm.next_chunk(0);
        let mut i = 0;
        while let Some(chunk) = c {
            if i >= hi {
                break;
            }
            if i >= lo {
                // SAFETY: this share owns chunks lo..hi of the ordered list,
                // the claim bits above make every (cpu, ncpus) run at most
                // once, and the held frontier claims nothing.
                unsafe { self.grow.init_chunk(chunk) };
            }
            i += 1;
            c = mm.next_chunk(chunk + 1);
        }
        Ok(())
    }

    /// Puts every initialized page on the free lists (`Parallel`, once,
    /// after every share is done).
    pub(crate) fn parallel_finish(&self) -> Result<(), MmParallelError> {
        if self.strategy() != Strategy::Parallel {
            return Err(MmParallelError::WrongStrategy);
        }
        let mut z = self.grow.zone.lock();
        if !z.frontier.booted {
            return Err(MmParallelError::NotBooted);
        }
        if !z.frontier.parallel_pending {
            return Err(MmParallelError::AlreadyFinished);
        }
        if self.grow.state.counters().chunks_initialized != self.grow.mm.totals().chunks_total {
            return Err(MmParallelError::SharesIncomplete);
        }
        self.grow.release_all(&mut z);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PhysRange;
    use crate::mm::config::MmConfig;
    use crate::mm::grow::GrowRig;
    use crate::mm::testing::{cfg, pc_layout, workload, MIB};
    use std::sync::{Arc, Mutex};
    use std::vec::Vec;

    /// A grower rig with the strategies' own state.
    struct Rig {
        grow: GrowRig,
        shares: ParallelShares,
    }

    impl Rig {
        fn new(c: MmConfig, ram: &[PhysRange], res: &[PhysRange]) -> Rig {
            Rig {
                grow: GrowRig::new(c, ram, res),
                shares: ParallelShares::new(),
            }
        }

        fn init(&self) -> Initializer<'_> {
            Initializer {
                grow: self.grow.grower(),
                shares: &self.shares,
            }
        }

        fn workload(&self, seed: u64, steps: usize) -> (u64, u64) {
            workload(
                |o| self.grow.grower().alloc_slow(o),
                |p, o| self.grow.free(p, o),
                || self.grow.pending_pages(),
                seed,
                steps,
            )
        }
    }

    /// CPUs that run the jobs they were started on when waited for, one
    /// after another on the waiting thread (the concurrent runs are the
    /// parallel and deferred tests above and below).
    struct LazyCpus<'r> {
        rig: &'r Rig,
        count: u32,
        started: Mutex<Vec<(ApJob, u32)>>,
        queued: Mutex<Vec<(ApJob, u64)>>,
        progress: AtomicU64,
    }

    impl LazyCpus<'_> {
        fn new(rig: &Rig, count: u32) -> LazyCpus<'_> {
            LazyCpus {
                rig,
                count,
                started: Mutex::new(Vec::new()),
                queued: Mutex::new(Vec::new()),
                progress: AtomicU64::new(0),
            }
        }
    }

    impl Cpus for LazyCpus<'_> {
        fn count(&self) -> u32 {
            self.count
        }

        fn start(&self, job: ApJob, cpus: u32) {
            self.started.lock().unwrap().push((job, cpus));
            // A round trip through the raw form, as the kernel posts it.
            let job = ApJob::from_raw(job.to_raw()).unwrap();
            self.queued
                .lock()
                .unwrap()
                .extend((1..cpus).map(|cpu| (job, u64::from(cpu))));
        }

        fn wait(&self) {
            let queued = core::mem::take(&mut *self.queued.lock().unwrap());
            for (job, cpu) in queued {
                self.rig.init().run_ap_job(job, cpu, self).unwrap();
            }
        }

        fn progress(&self) {
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn eager_initializes_every_chunk_at_boot() {
        let (ram, res) = pc_layout();
        let rig = Rig::new(cfg(Strategy::Eager), &ram, &res);
        rig.init().boot_init().unwrap();
        let (c, t) = (rig.grow.state.counters(), rig.grow.mm.totals());
        assert_eq!(c.chunks_initialized, t.chunks_total);
        assert_eq!(t.chunks_total, 100);
        assert!(rig.grow.state.fully_initialized());
        assert_eq!(c.ram_pages_initialized, t.total_pages);
        assert_eq!(rig.grow.pending_pages(), 0);
        // Three full 64 MiB sections (1 MiB of memmap each) and 8 MiB of a fourth.
        let memmap = 3 * MIB + 128 * 1024;
        assert_eq!(t.memmap_bytes, memmap);
        assert_eq!(t.reserved_pages, 1 + 512 + memmap / 4096);
        let ranges: Vec<_> = rig.grow.mm.memmap_ranges().collect();
        assert_eq!(ranges, [PhysRange::from_len(3 * MIB, memmap)]);
        rig.grow.check();
        assert_eq!(rig.init().boot_init(), Err(MmBootError::AlreadyBooted));
    }

    #[test]
    fn parallel_init_on_threads_matches_eager() {
        let (ram, res) = pc_layout();
        let eager = Rig::new(cfg(Strategy::Eager), &ram, &res);
        eager.init().boot_init().unwrap();
        let c = MmConfig {
            chunk_bytes: 512 << 10,
            ..cfg(Strategy::Parallel)
        };
        let par = Arc::new(Rig::new(c, &ram, &res));
        assert_eq!(
            par.init().parallel_finish(),
            Err(MmParallelError::NotBooted)
        );
        assert_eq!(
            par.init().parallel_init_share(0, 4),
            Err(MmParallelError::NotBooted)
        );
        par.init().boot_init().unwrap();
        assert_eq!(
            par.grow.grower().alloc_slow(0),
            None,
            "nothing before parallel_finish"
        );
        assert!(!par.init().background_step());
        assert_eq!(
            par.init().parallel_finish(),
            Err(MmParallelError::SharesIncomplete)
        );
        assert_eq!(
            par.init().parallel_init_share(4, 4),
            Err(MmParallelError::BadShare)
        );
        assert_eq!(
            par.init().parallel_init_share(0, 65),
            Err(MmParallelError::BadShare)
        );
        let threads: Vec<_> = (0..4)
            .map(|cpu| {
                let rig = par.clone();
                std::thread::spawn(move || rig.init().parallel_init_share(cpu, 4))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            par.init().parallel_init_share(1, 4),
            Err(MmParallelError::ShareTaken)
        );
        assert_eq!(
            par.init().parallel_init_share(1, 2),
            Err(MmParallelError::BadShare)
        );
        par.init().parallel_finish().unwrap();
        assert_eq!(
            par.init().parallel_finish(),
            Err(MmParallelError::AlreadyFinished)
        );
        assert_eq!(
            par.init().parallel_init_share(0, 4),
            Err(MmParallelError::AlreadyFinished)
        );
        assert_eq!(eager.grow.check(), par.grow.check());
        assert_eq!(eager.grow.pages(), par.grow.pages());
        let (a, b) = (eager.grow.state.counters(), par.grow.state.counters());
        assert_eq!(a.ram_pages_initialized, b.ram_pages_initialized);
        assert!(par.grow.state.fully_initialized());
        assert_eq!(b.chunks_initialized, par.grow.mm.totals().chunks_total);
        assert_eq!(
            eager.init().parallel_init_share(0, 1),
            Err(MmParallelError::WrongStrategy)
        );
        assert_eq!(
            eager.init().parallel_finish(),
            Err(MmParallelError::WrongStrategy)
        );
    }

    #[test]
    fn deferred_background_runs_while_another_cpu_allocates() {
        let (ram, res) = pc_layout();
        for chunk in [128 << 10, 2 * MIB] {
            let c = MmConfig {
                chunk_bytes: chunk,
                ..cfg(Strategy::Deferred)
            };
            let rig = Arc::new(Rig::new(c, &ram, &res));
            rig.init().boot_init().unwrap();
            assert_eq!(
                rig.grow.state.counters().chunks_initialized,
                64 * MIB / chunk,
                "boot initializes the first section"
            );
            let bg = {
                let rig = rig.clone();
                std::thread::spawn(move || {
                    let mut steps = 0;
                    while rig.init().background_step() {
                        steps += 1;
                    }
                    steps
                })
            };
            let workers: Vec<_> = (0..2)
                .map(|i| {
                    let rig = rig.clone();
                    std::thread::spawn(move || rig.workload(99 + i, 1200))
                })
                .collect();
            let mut held = 0;
            for w in workers {
                // Two such workloads may exhaust the 200 MiB; the workload
                // checks a failure happens only when nothing is pending.
                held += w.join().unwrap().0;
            }
            // The workers may have grown everything themselves first.
            let _steps = bg.join().unwrap();
            assert!(rig.grow.state.fully_initialized());
            assert_eq!(
                rig.grow.state.counters().chunks_initialized,
                rig.grow.mm.totals().chunks_total
            );
            assert_eq!(rig.grow.pages().1, held);
            rig.grow.check();
        }
    }

    #[test]
    fn boot_gives_each_strategy_its_cpus() {
        let (ram, res) = pc_layout();
        for strategy in Strategy::ALL {
            for count in [1, 3] {
                let rig = Rig::new(cfg(strategy), &ram, &res);
                let cpus = LazyCpus::new(&rig, count);
                let booted = rig.init().boot(&cpus).unwrap();
                if booted.background_on_boot_cpu {
                    while rig.init().background_step() {}
                }
                // The background job runs now.
                cpus.wait();
                let started = cpus.started.lock().unwrap().clone();
                let progress = cpus.progress.load(Ordering::Relaxed);
                let what = format!("{strategy:?} on {count} CPUs");
                let (want_cpus, want_jobs, background) = match (strategy, count) {
                    (Strategy::Parallel, 3) => {
                        (3, vec![(ApJob::ParallelShare { ncpus: 3 }, 3)], false)
                    }
                    (Strategy::Deferred, 3) => (2, vec![(ApJob::Background, 2)], true),
                    (Strategy::Deferred, _) => (1, vec![], true),
                    _ => (1, vec![], false),
                };
                assert_eq!(
                    booted,
                    Booted {
                        cpus: want_cpus,
                        background_on_boot_cpu: background
                    },
                    "{what}"
                );
                assert_eq!(started, want_jobs, "{what}");
                let st = &rig.grow.state;
                if strategy == Strategy::OnDemand {
                    assert_eq!(st.counters().chunks_initialized, 1, "{what}");
                } else {
                    assert!(st.fully_initialized(), "{what}");
                }
                if (strategy, count) == (Strategy::Deferred, 3) {
                    assert!(progress >= 1, "{what}: the background job reports progress");
                }
                rig.grow.check();
                assert_eq!(rig.init().boot_init(), Err(MmBootError::AlreadyBooted));
            }
        }
    }

    #[test]
    fn ap_jobs_round_trip_through_their_raw_form_and_other_words_are_none() {
        for job in [
            ApJob::Background,
            ApJob::ParallelShare { ncpus: 1 },
            ApJob::ParallelShare { ncpus: 64 },
        ] {
            assert_ne!(job.to_raw(), 0);
            assert_eq!(ApJob::from_raw(job.to_raw()), Some(job));
        }
        for raw in [0, 3 << 32, 2 << 32 | 1, u64::MAX] {
            assert_eq!(ApJob::from_raw(raw), None, "{raw:#x}");
        }
        let e = MmBootError::from(MmParallelError::SharesIncomplete);
        assert_eq!(
            std::format!("{e}"),
            "parallel memmap initialization: not every share is done"
        );
    }

    #[test]
    fn a_job_for_another_cpu_does_nothing() {
        let (ram, res) = pc_layout();
        let rig = Rig::new(cfg(Strategy::Deferred), &ram, &res);
        rig.init().boot_init().unwrap();
        let before = rig.grow.state.counters();
        let cpus = LazyCpus::new(&rig, 4);
        // CPU 2 has no part in the background job, CPU 3 none in a two-CPU
        // share.
        rig.init().run_ap_job(ApJob::Background, 2, &cpus).unwrap();
        rig.init()
            .run_ap_job(ApJob::ParallelShare { ncpus: 2 }, 3, &cpus)
            .unwrap();
        assert_eq!(rig.grow.state.counters(), before);
    }
}
