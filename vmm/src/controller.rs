//! The VMM thread: the only place that changes VM state.
//!
//! How a request travels (as in Cloud Hypervisor's `api/mod.rs`):
//!
//! 1. The API thread (`api_server`) reads an HTTP request and parses it into
//!    an [`api::ApiRequest`]; malformed input is answered there and never
//!    reaches this thread.
//! 2. It sends the request with a one-shot reply channel as
//!    [`VmEvent::Api`] on the same channel the vCPU threads report guest
//!    events on, and waits for the reply without blocking anyone.
//! 3. [`Controller::run`] receives events one at a time: API requests,
//!    guest phases, finished guest commands, AP start-up requests, stopped
//!    vCPUs, and host signals.
//! 4. It answers each request exactly once: at once, or, for
//!    `PUT /guest/memory`, when the guest reports the command finished.
//! 5. When the guest stops (or is stopped) the loop ends and returns the
//!    process exit code; the caller removes the API socket.
//!
//! `vmm run` uses the same controller with a machine configured from its
//! flags, started at once, and an optional script (allocate, report, shut
//! down) that runs when the guest is ready.

use crate::builder::{build_microvm, BuildContext, BuildError};
use crate::config::VmConfig;
use crate::devices::SubmitError;
use api::ErrorChain;
use crate::events::{ApiCall, CommandDone, VmEvent};
use crate::metrics::Metrics;
use crate::report::{self, ReportContext};
use crate::script::{BenchResult, Script};
use crate::timings::Timings;
use crate::vstate::stop::StopReason;
use crate::vstate::vm::{ends_vm, Vm};
use api::{ApiError, ApiRequest, ApiResponse, GuestMemoryOutcome, GuestMemoryStatus, VmState};
use guest_abi::{Command, CommandStatus, Phase};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

enum Waiter {
    /// `PUT /guest/memory`: answer when the guest is done.
    Api(tokio::sync::oneshot::Sender<Result<ApiResponse, ApiError>>),
    /// The `vmm run` script's allocation.
    Script,
    /// The `vmm run` script's benchmark.
    Bench(u64),
    /// A graceful shutdown (SendCtrlAltDel, or the end of the script).
    Shutdown,
}

struct Pending {
    seq: u64,
    target_mib: u64,
    waiter: Waiter,
}

/// The VMM thread's state.
pub struct Controller {
    id: String,
    config: VmConfig,
    vm: Option<Vm>,
    state: VmState,
    exit_code: Option<i32>,
    failure: Option<String>,
    tx: Sender<VmEvent>,
    rx: Receiver<VmEvent>,
    timings: Arc<Timings>,
    metrics: Arc<Metrics>,
    guest_ready: bool,
    pending: Option<Pending>,
    last: GuestMemoryStatus,
    workload_bytes: u64,
    guest_commands: u64,
    script: Script,
    /// Set when the loop should end (the VM stopped, or was shut down).
    finished: Option<StopReason>,
    /// The script's report, printed by the caller.
    pub printed_report: Option<api::MemoryReport>,
    /// The script's benchmark result, printed by the caller.
    pub bench_result: Option<BenchResult>,
}

impl Controller {
    /// A controller with no VM yet.
    pub fn new(config: VmConfig, timings: Arc<Timings>) -> Controller {
        let (tx, rx) = std::sync::mpsc::channel();
        Controller {
            id: format!("vmm-{}", std::process::id()),
            config,
            vm: None,
            state: VmState::NotStarted,
            exit_code: None,
            failure: None,
            tx,
            rx,
            timings,
            metrics: Arc::default(),
            guest_ready: false,
            pending: None,
            last: GuestMemoryStatus { target_mib: 0, held_bytes: 0, status: GuestMemoryOutcome::Idle, report: None },
            workload_bytes: 0,
            guest_commands: 0,
            script: Script::default(),
            finished: None,
            printed_report: None,
            bench_result: None,
        }
    }

    /// The counters the API server also updates.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A sender for events (the API server's end).
    pub fn sender(&self) -> Sender<VmEvent> {
        self.tx.clone()
    }

    /// Sets what `vmm run` does once the guest is ready.
    pub fn set_script(&mut self, script: Script) {
        self.script = script;
    }

    /// The configuration the VM is (or will be) built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Builds and starts the VM.
    pub fn start(&mut self) -> Result<(), StartError> {
        let ctx = BuildContext { timings: self.timings.clone(), metrics: self.metrics.clone(), events: self.tx.clone() };
        let mut vm = build_microvm(self.config.clone(), &ctx)?;
        vm.start().map_err(StartError::Thread)?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    /// Runs the event loop until the VM stops; returns why (None: the loop
    /// ended without a VM, e.g. a signal before start).
    pub fn run(&mut self) -> Option<StopReason> {
        crate::signals::forward_to(self.tx.clone());
        while self.finished.is_none() {
            let Ok(ev) = self.rx.recv_timeout(Duration::from_secs(3600)) else { continue };
            self.handle(ev);
        }
        self.finished.clone()
    }

    fn handle(&mut self, ev: VmEvent) {
        match ev {
            VmEvent::Api(call) => self.handle_api(call),
            VmEvent::Phase(Phase::Ready) => {
                self.guest_ready = true;
                self.run_script();
            }
            VmEvent::Phase(_) => {}
            VmEvent::CommandDone(done) => self.command_done(done),
            VmEvent::StartAps(rec) => {
                if let Some(vm) = self.vm.as_mut() {
                    if let Err(e) = vm.start_aps(rec) {
                        eprintln!("vmm: guest AP start-up refused: {}", ErrorChain(&e));
                    }
                }
            }
            VmEvent::VcpuStopped { cpu, reason } => {
                let Some(vm) = self.vm.as_mut() else { return };
                vm.vcpu_stopped(cpu);
                if ends_vm(cpu, &reason) {
                    self.timings.mark_once(&self.timings.vm_stopped);
                    vm.stop();
                    self.stopped(reason);
                }
            }
            VmEvent::GuestProtocolError(msg) => eprintln!("vmm: guest protocol error: {msg}"),
            VmEvent::Signal(sig) => {
                eprintln!("vmm: received signal {sig}; stopping the VM");
                if let Some(vm) = self.vm.as_mut() {
                    vm.stop();
                }
                self.stopped(StopReason::Requested);
            }
        }
    }

    fn stopped(&mut self, reason: StopReason) {
        if reason.is_failure() {
            self.state = VmState::Failed;
            self.failure = Some(reason.to_string());
        } else {
            self.state = VmState::Halted;
        }
        self.exit_code = Some(reason.exit_code());
        if let Some(p) = self.pending.take() {
            if let Waiter::Api(reply) = p.waiter {
                let _ = reply.send(Err(ApiError::InvalidState {
                    action: "change the guest's memory".into(),
                    state: self.state,
                }));
            }
        }
        self.finished = Some(reason);
    }

    /// The `vmm run` script: allocate, then report and shut down.
    fn run_script(&mut self) {
        if let Some(mib) = self.script.alloc_mib.take().or_else(|| self.script.then_target_mib.take()) {
            match self.submit(Command::SetTarget, mib << 20, 0) {
                Ok(seq) => self.pending = Some(Pending { seq, target_mib: mib, waiter: Waiter::Script }),
                Err(e) => eprintln!("vmm: cannot start the workload: {e}"),
            }
            return;
        }
        if let Some(n) = self.script.bench_alloc_free.take() {
            match self.submit(Command::BenchAllocFree, n, 0) {
                Ok(seq) => self.pending = Some(Pending { seq, target_mib: 0, waiter: Waiter::Bench(n) }),
                Err(e) => eprintln!("vmm: cannot start the benchmark: {e}"),
            }
            return;
        }
        if self.script.report.is_some() {
            self.printed_report = self.report();
        }
        if self.script.report.is_some() || self.bench_result.is_some() {
            self.graceful_shutdown();
        }
    }

    fn graceful_shutdown(&mut self) {
        match self.submit(Command::Shutdown, 0, 0) {
            Ok(seq) => self.pending = Some(Pending { seq, target_mib: 0, waiter: Waiter::Shutdown }),
            Err(_) => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.stop();
                }
                self.stopped(StopReason::Requested);
            }
        }
    }

    fn submit(&mut self, cmd: Command, arg0: u64, arg1: u64) -> Result<u64, SubmitError> {
        let vm = self.vm.as_ref().ok_or(SubmitError::Stopping)?;
        let pv = vm.devices.paravirt().ok_or(SubmitError::NoMailbox)?;
        let seq = pv.submit(cmd, arg0, arg1)?;
        self.guest_commands += 1;
        Ok(seq)
    }

    fn command_done(&mut self, done: CommandDone) {
        let CommandDone { seq, status, result0, result1 } = done;
        let Some(p) = self.pending.take_if(|p| p.seq == seq) else { return };
        if let Waiter::Bench(pairs) = p.waiter {
            let ok = status == Some(CommandStatus::Ok);
            self.bench_result = Some(BenchResult {
                pairs,
                cycles: result0,
                cycles_per_pair: if pairs > 0 { result0 as f64 / pairs as f64 } else { 0.0 },
                grow_check_on: result1 & 1 != 0,
                jump_sites_patched: result1 & 2 != 0,
                ok,
            });
            self.run_script();
            return;
        }
        let held = result0;
        if status.is_some() {
            self.workload_bytes = held;
        }
        let outcome = match status {
            Some(CommandStatus::Ok) => GuestMemoryOutcome::Ok,
            Some(CommandStatus::OutOfMemory) => GuestMemoryOutcome::OutOfMemory,
            _ => GuestMemoryOutcome::Invalid,
        };
        match p.waiter {
            Waiter::Api(reply) => {
                self.last = GuestMemoryStatus {
                    target_mib: p.target_mib,
                    held_bytes: self.workload_bytes,
                    status: outcome,
                    report: self.report(),
                };
                let _ = reply.send(Ok(ApiResponse::GuestMemoryStatus(Box::new(self.last.clone()))));
                self.last.report = None;
            }
            Waiter::Script => {
                self.last = GuestMemoryStatus { target_mib: p.target_mib, held_bytes: self.workload_bytes, status: outcome, report: None };
                if outcome != GuestMemoryOutcome::Ok {
                    eprintln!("vmm: the guest's allocation of {} MiB ended with {outcome:?}", p.target_mib);
                }
                self.run_script();
            }
            Waiter::Shutdown | Waiter::Bench(_) => {}
        }
    }

    /// The memory report of the VM, if it was started.
    pub fn report(&self) -> Option<api::MemoryReport> {
        let vm = self.vm.as_ref()?;
        Some(report::memory_report(&ReportContext {
            mem: &vm.mem,
            stats_gpa: vm.devices.stats_gpa(),
            vcpus: vm.config.machine.vcpu_count,
            tsc_khz: vm.tsc_khz,
            workload_bytes: self.workload_bytes,
            registered_bytes: vm.devices.registered_bytes(),
            timings: &self.timings,
        }))
    }

    fn invalid_state(&self, action: &str) -> ApiError {
        ApiError::InvalidState { action: action.into(), state: self.state }
    }

    fn handle_api(&mut self, call: ApiCall) {
        let ApiCall { request, reply } = call;
        let answer = match request {
            ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(api::InstanceInfo {
                id: self.id.clone(),
                state: self.state,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                started: self.vm.is_some(),
                exit_code: self.exit_code,
                failure_reason: self.failure.clone(),
            })),
            ApiRequest::GetMachineConfig => Ok(ApiResponse::MachineConfig(self.config.machine.clone())),
            ApiRequest::PutMachineConfig(update) => {
                if self.vm.is_some() {
                    Err(self.invalid_state("change the machine configuration"))
                } else {
                    self.config.machine.apply(&update).map(|()| ApiResponse::NoContent).map_err(ApiError::from)
                }
            }
            ApiRequest::PutBootSource(boot) => {
                if self.vm.is_some() {
                    Err(self.invalid_state("change the boot source"))
                } else {
                    self.config.set_boot_source(&boot);
                    Ok(ApiResponse::NoContent)
                }
            }
            ApiRequest::PutActions(a) => self.action(a.action_type),
            ApiRequest::PatchVm(u) => self.pause_resume(u.state),
            ApiRequest::GetMemory => match self.report() {
                None => Err(self.invalid_state("report memory")),
                Some(r) => Ok(ApiResponse::MemoryReport(Box::new(r))),
            },
            ApiRequest::GetGuestMemory => Ok(ApiResponse::GuestMemoryStatus(Box::new(self.last.clone()))),
            ApiRequest::PutGuestMemory(target) => {
                if let Err(e) = target.validate(self.config.machine.mem_size_mib) {
                    Err(ApiError::from(e))
                } else if self.state != VmState::Running {
                    Err(self.invalid_state("change the guest's memory"))
                } else if !self.guest_ready {
                    Err(ApiError::InvalidState { action: "change the guest's memory before it is ready".into(), state: self.state })
                } else if self.pending.is_some() {
                    Err(ApiError::InvalidState { action: "start a memory change while another one runs".into(), state: self.state })
                } else {
                    match self.submit(Command::SetTarget, target.target_bytes(), 0) {
                        Ok(seq) => {
                            self.last.status = GuestMemoryOutcome::Pending;
                            self.last.target_mib = target.target_mib;
                            self.pending = Some(Pending { seq, target_mib: target.target_mib, waiter: Waiter::Api(reply) });
                            return;
                        }
                        Err(e) => Err(ApiError::GuestBusy(e.into())),
                    }
                }
            }
            ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(self.metrics_snapshot())),
        };
        let _ = reply.send(answer);
    }

    fn action(&mut self, action: api::ActionType) -> Result<ApiResponse, ApiError> {
        match action {
            api::ActionType::InstanceStart => {
                if self.vm.is_some() {
                    return Err(self.invalid_state("start the VM"));
                }
                self.start().map_err(|e| match e.is_usage() {
                    true => ApiError::StartRefused(e.into()),
                    false => ApiError::StartFailed(e.into()),
                })?;
                Ok(ApiResponse::NoContent)
            }
            api::ActionType::SendCtrlAltDel => {
                if self.state != VmState::Running || !self.guest_ready || self.pending.is_some() {
                    return Err(self.invalid_state("ask the guest to shut down"));
                }
                self.graceful_shutdown();
                Ok(ApiResponse::NoContent)
            }
            api::ActionType::Shutdown => {
                match self.vm.as_mut() {
                    Some(vm) => {
                        vm.resume();
                        vm.stop();
                        self.stopped(StopReason::Requested);
                    }
                    None => self.finished = Some(StopReason::Requested),
                }
                Ok(ApiResponse::NoContent)
            }
        }
    }

    fn pause_resume(&mut self, target: api::VmStateTarget) -> Result<ApiResponse, ApiError> {
        match (target, self.state, self.vm.as_mut()) {
            (api::VmStateTarget::Paused, VmState::Running, Some(vm)) => {
                vm.pause();
                self.state = VmState::Paused;
                Ok(ApiResponse::NoContent)
            }
            (api::VmStateTarget::Resumed, VmState::Paused, Some(vm)) => {
                vm.resume();
                self.state = VmState::Running;
                Ok(ApiResponse::NoContent)
            }
            (api::VmStateTarget::Paused, _, _) => Err(self.invalid_state("pause the VM")),
            (api::VmStateTarget::Resumed, _, _) => Err(self.invalid_state("resume the VM")),
        }
    }

    fn metrics_snapshot(&self) -> api::Metrics {
        let m = &self.metrics;
        let l = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        api::Metrics {
            vm_exits: api::VmExitCounts {
                io_in: l(&m.exits_io_in),
                io_out: l(&m.exits_io_out),
                mmio_read: l(&m.exits_mmio_read),
                mmio_write: l(&m.exits_mmio_write),
                hlt: l(&m.exits_hlt),
                shutdown: l(&m.exits_shutdown),
                system_event: l(&m.exits_system_event),
                failed: l(&m.exits_failed),
                other: l(&m.exits_other),
            },
            api_requests: l(&m.api_requests),
            api_errors: l(&m.api_errors),
            guest_commands: self.guest_commands,
            serial_bytes: l(&m.serial_bytes),
        }
    }
}

/// Why the VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot start the boot vCPU's thread")]
    Thread(#[source] std::io::Error),
}

impl StartError {
    /// Whether the configuration the user gave is at fault (exit code 2, HTTP 400).
    pub fn is_usage(&self) -> bool {
        matches!(self, StartError::Build(e) if e.is_usage())
    }
}
