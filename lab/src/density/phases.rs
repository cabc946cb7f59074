//! The phases of a phased density run (`--workload 'peak:..,hold:..,idle:..'`),
//! after the ramp: every ready VM runs them, at most `--peak-parallel` above
//! the idle size at once and each only while memory leaves room for one more
//! peak (the floor under `MemAvailable`, or `--max-memory-mib` over the
//! fleet's cgroup); the VMs that did not get their turn are stopped; then,
//! once the VMs' reclaim counters stop moving, the fleet is measured again:
//! its steady state, compared with the ramp's fresh fleet.

use super::output::{PhasesRun, StrategyRun};
use super::workload::Phased;
use super::{fleet, probe, DensityError, Msg, RoomLimit, Runner};
use super::footprint::SteadyState;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

impl Runner {
    /// After the ramp: every ready VM runs the phases of `w` (at most
    /// `--peak-parallel` at once, each only if the floor leaves room for
    /// one more peak); those that did not get to are stopped; then, once
    /// reclaim settled, the fleet is measured again and compared with the
    /// ramp's last (fresh) step.
    pub(super) fn phases_and_steady_state(&mut self, run: &mut StrategyRun, w: &Phased) -> Result<(), DensityError> {
        let Some(fresh) = run.steps.last().map(|s| s.sums) else { return Ok(()) };
        self.run_phases(run, w)?;
        if self.interrupted {
            return Ok(());
        }
        self.mark(run, "settling");
        let start = Instant::now();
        let settled = self.settle(run)?;
        if self.interrupted {
            return Ok(());
        }
        let waited = start.elapsed().as_secs_f64();
        self.mark(run, "steady");
        let step = run.steps.len() as u64;
        self.measure(run, step, 0, 0.0, probe::ReadyBy::Api, "steady")?;
        let steady = run.steps.last().map(|s| s.sums).filter(|_| step + 1 == run.steps.len() as u64);
        run.steady_state = steady.and_then(|s| SteadyState::compare(&fresh, &s, settled, waited));
        Ok(())
    }

    /// Runs the phases over the fleet (see [`Runner::phases_and_steady_state`]).
    fn run_phases(&mut self, run: &mut StrategyRun, w: &Phased) -> Result<(), DensityError> {
        let targets = self.ready_targets(run);
        let floor = self.report.settings.floor_bytes;
        let peak = w.peak_cost_bytes();
        let parallel = self.args.peak_parallel;
        // With nothing in flight and MemAvailable below the mark, wait this
        // long for reclaim to give memory back before calling it the floor.
        let grace = self.reclaim_delay() + Duration::from_secs(2);
        let mut out = PhasesRun::default();
        let start = Instant::now();
        self.mark(run, "phases");
        let (mut next, mut in_phase, mut low_since) = (0usize, 0usize, None::<Instant>);
        let mut error: Option<DensityError> = None;
        loop {
            if self.cancel.load(Ordering::SeqCst) && !self.interrupted {
                self.interrupted = true;
                out.stop_reason = "interrupted by a signal".into();
            }
            let more = next < targets.len() && out.stop_reason.is_empty() && error.is_none() && !self.interrupted;
            if !more && in_phase == 0 {
                break;
            }
            if more && in_phase < parallel {
                let room = self.memory_room(run)?;
                if room.bytes >= ((in_phase as u64 + 1) * peak) as i64 {
                    low_since = None;
                    let (_, index, _, sock) = targets[next].clone();
                    let (tx, cancel, epoch, phases) = (self.tx.clone(), self.cancel.clone(), self.epoch, w.phases.clone());
                    let spawned = std::thread::Builder::new().name("density-phases".into()).stack_size(1 << 20).spawn(move || {
                        let _ = tx.send(Msg::Phased(index, probe::run_phases(index, &sock, &phases, epoch, &cancel)));
                    });
                    next += 1;
                    match spawned {
                        Ok(_) => {
                            in_phase += 1;
                            out.started += 1;
                        }
                        Err(e) => {
                            out.stop_reason = "cannot start a phase thread".into();
                            error = Some(fleet::FleetError::Spawn("phase thread".into(), e).into());
                        }
                    }
                    continue;
                }
                if in_phase == 0 {
                    let since = *low_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= grace {
                        let why = match room.limit {
                            RoomLimit::Floor { avail } => {
                                out.floor_reached = true;
                                format!("floor reached: MemAvailable {} MiB, floor {} MiB", avail >> 20, floor >> 20)
                            }
                            RoomLimit::Budget { used, budget, by } => {
                                out.limit_reached = true;
                                format!(
                                    "memory budget reached: the fleet holds {} MiB ({by}), --max-memory-mib {}",
                                    used >> 20,
                                    budget >> 20
                                )
                            }
                        };
                        out.stop_reason = format!(
                            "{why}, and a peak needs {} MiB more; {} of {} VMs ran their phases",
                            peak >> 20,
                            out.done,
                            targets.len()
                        );
                    } else {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Phased(index, result)) => {
                    in_phase -= 1;
                    let Some(vm) = run.vms.get_mut(index as usize) else { continue };
                    match result {
                        Ok(done) => {
                            vm.phases = Some(done);
                            out.done += 1;
                        }
                        Err(probe::LaunchError::Interrupted) => vm.error = Some("interrupted in its phases".into()),
                        Err(e) => {
                            vm.error = Some(e.to_string());
                            if error.is_none() {
                                out.stop_reason = format!("VM failed: {e}");
                                error = Some(e.into());
                            }
                        }
                    }
                }
                Ok(Msg::Signal(sig)) => {
                    self.interrupted = true;
                    if out.stop_reason.is_empty() {
                        out.stop_reason = format!("interrupted by signal {sig}");
                    }
                }
                // No launch is in flight after the ramp.
                Ok(Msg::Launched(..)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Unreachable: the runner holds a sender itself.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        out.seconds = start.elapsed().as_secs_f64();
        out.stopped_before = (targets.len() - next) as u64;
        if out.floor_reached {
            run.floor_reached = true;
        }
        if out.limit_reached {
            run.limit_reached = true;
        }
        // The steady state is that of the VMs that ran their phases.
        let vms = &run.vms;
        self.fleet.shutdown_where(|p| vms.get(p.index as usize).is_none_or(|v| v.phases.is_none()));
        run.phases = Some(out);
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for reclaim to settle: at least the reclaim delay + 1 s, then
    /// until two rounds of the VMs' reports one second apart show the same
    /// reclaim counters and residency, or `--steady-timeout-s`. Returns
    /// whether it settled.
    fn settle(&mut self, run: &StrategyRun) -> Result<bool, DensityError> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(self.args.steady_timeout_s).max(self.reclaim_delay() + Duration::from_secs(1));
        let first = start + self.reclaim_delay() + Duration::from_secs(1);
        let targets = self.ready_targets(run);
        let mut previous = None;
        loop {
            let wake = if previous.is_none() { first } else { Instant::now() + Duration::from_secs(1) };
            while Instant::now() < wake.min(deadline) {
                if self.cancel.load(Ordering::SeqCst) {
                    self.interrupted = true;
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut sums = (0u64, 0u64, 0u64, 0u64, 0u64);
            for (_, result) in self.sample_all(&targets, probe::ReadyBy::Api) {
                let (s, _) = result?;
                sums.0 += s.reclaim.events;
                sums.1 += s.reclaim.discarded_bytes;
                sums.2 += s.reclaim.chunks_deinitialized;
                sums.3 += s.reclaim.memslots_unregistered;
                sums.4 += s.guest_ram_resident;
            }
            if previous == Some(sums) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            previous = Some(sums);
        }
    }
}
