//! The controller: the only place that changes VM state. It runs on the
//! VMM's main thread, which also serves the API: a VMM process has that
//! thread and one thread per vCPU, nothing else.
//!
//! How a request travels (as in Cloud Hypervisor's `api/mod.rs`):
//!
//! 1. The API server (`api_server`, tasks on the main thread's runtime)
//!    reads an HTTP request and parses it into an [`api::ApiRequest`];
//!    malformed input is answered there and never reaches the controller.
//! 2. It sends the request with a one-shot reply channel as
//!    [`VmEvent::Api`] on the same channel the vCPU threads report guest
//!    events on, and its task awaits the reply (other connections go on).
//! 3. [`Controller::run`] receives events one at a time: API requests,
//!    guest phases, finished guest commands, AP start-up requests and
//!    stopped vCPUs, then host signals from its `signalfd`; between two
//!    events the runtime runs the API's tasks. The boundary is the
//!    channel: the server's tests put a fake controller behind it.
//! 4. It answers each request exactly once: at once, or, for
//!    `PUT /guest/memory`, when the guest reports the command finished.
//! 5. When the guest stops (or is stopped) the loop ends and returns the
//!    process exit code; the caller removes the API socket.
//!
//! `vmm run` uses the same controller with a machine configured from its
//! flags, started at once, and an optional script (allocate, report, shut
//! down) that runs when the guest is ready.
//!
//! The controller also owns the host files of `PUT /logger` and
//! `PUT /metrics` ([`crate::host_output`]): its own diagnostics (API requests, life-cycle
//! events, warnings) are written to the log file, and the counters of
//! `GET /metrics` to the metrics file on `FlushMetrics`, every
//! [`METRICS_FLUSH_PERIOD`] and when the VM stops. Without a log file its
//! warnings go to standard error, as they always did, without waiting for
//! it ([`crate::out::diag`]).
//!
//! Nothing the guest does can stall this thread:
//! - every wait on the guest has a deadline ([`VmConfig::guest_timeout`]):
//!   a command that times out is cancelled in the device (so later commands
//!   and a graceful shutdown work), answered 504 if the API sent it, and ends
//!   `vmm run`'s script with [`StopReason::GuestUnresponsive`]; a guest that
//!   is never ready while a script or a `SendCtrlAltDel` waits for it is
//!   stopped the same way, and so is one that answers the shutdown command
//!   (or has it answered by another vCPU) but does not exit within the
//!   same time;
//! - the guest's results are checked against the machine (`held_bytes` no
//!   larger than its RAM) before they are reported;
//! - the device rate-limits protocol errors; each logged one says how many
//!   were suppressed before it;
//! - the console is drained here without waiting for the host
//!   ([`crate::devices::serial`]), retried every [`CONSOLE_RETRY`] while a
//!   full pipe holds it up.

use crate::builder::{build_microvm, BuildContext, BuildError};
use crate::config::{check_kernel_image, VmConfig};
use crate::devices::SubmitError;
use api::ErrorChain;
use crate::api_server::ApiServer;
use crate::events::{ApiCall, CommandDone, EventReceiver, EventSender, VmEvent};
use crate::metrics::Metrics;
use crate::report::{self, ReportContext};
use crate::script::{BenchResult, Script};
use crate::timings::Timings;
use crate::vstate::stop::StopReason;
use crate::vstate::vm::{ends_vm, Vm};
use api::{ApiError, ApiRequest, ApiResponse, GuestMemoryOutcome, GuestMemoryStatus, LogLevel, VmState};
use guest_abi::{Command, CommandStatus, Phase};
use crate::host_output::{HostLog, HostOutput};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The VMM's version, as `GET /` and `GET /version` report it.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often the metrics file gets a line without being asked (as
/// Firecracker flushes its metrics every minute).
pub const METRICS_FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// How soon a console that a full host pipe held up is drained again.
pub const CONSOLE_RETRY: Duration = Duration::from_millis(20);

/// The most I/O events the runtime takes from epoll per tick; more wait for
/// the next tick.
const IO_EVENTS_PER_TICK: usize = 32;

/// Writes one line to the VMM's log (see [`Controller::log_line`]):
/// `log!(self, LogLevel::Info, "format", args...)`.
macro_rules! log {
    ($ctl:expr, $level:expr, $($arg:tt)*) => {
        $ctl.log_line($level, module_path!(), file!(), line!(), format_args!($($arg)*))
    };
}

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
    /// When the guest has had long enough.
    deadline: Instant,
}

/// The controller's state.
pub struct Controller {
    id: String,
    /// When `start` succeeded, in ms since the Unix epoch.
    started_at_unix_ms: Option<u64>,
    config: VmConfig,
    vm: Option<Vm>,
    state: VmState,
    exit_code: Option<i32>,
    failure: Option<String>,
    tx: EventSender,
    rx: EventReceiver,
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
    /// Why the VM stopped, once it has (state Halted or Failed).
    stop_reason: Option<StopReason>,
    /// End the loop as soon as the VM stops (else serve on until Shutdown).
    exit_on_stop: bool,
    /// `SendCtrlAltDel` came before the guest was ready: shut down once it is.
    shutdown_when_ready: bool,
    /// Something waits for the guest to be ready (the script, a early
    /// `SendCtrlAltDel`): stop it if it is not by then.
    ready_deadline: Option<Instant>,
    /// The guest answered the graceful shutdown: stop it if it has not
    /// exited by then.
    exit_deadline: Option<Instant>,
    /// The console has bytes a full pipe did not take: drain again then.
    console_retry: Option<Instant>,
    /// Guest protocol errors logged (the rest were suppressed by the device).
    protocol_errors_logged: u64,
    /// The log of `PUT /logger`.
    log: HostLog,
    /// `PUT /metrics` as given, and its file.
    metrics_config: Option<api::MetricsConfig>,
    metrics_out: Option<HostOutput>,
    metrics_lines_dropped: u64,
    next_metrics_flush: Option<Instant>,
    /// The script's report, printed by the caller.
    pub printed_report: Option<api::MemoryReport>,
    /// The script's benchmark result, printed by the caller.
    pub bench_result: Option<BenchResult>,
}

impl Controller {
    /// A controller with no VM yet.
    pub fn new(config: VmConfig, timings: Arc<Timings>) -> Controller {
        let (tx, rx) = crate::events::channel();
        Controller {
            id: config.id.clone(),
            started_at_unix_ms: None,
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
            stop_reason: None,
            exit_on_stop: true,
            shutdown_when_ready: false,
            ready_deadline: None,
            exit_deadline: None,
            console_retry: None,
            protocol_errors_logged: 0,
            log: HostLog::default(),
            metrics_config: None,
            metrics_out: None,
            metrics_lines_dropped: 0,
            next_metrics_flush: None,
            printed_report: None,
            bench_result: None,
        }
    }

    /// The counters the API server also updates.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A sender for events (the API server's end).
    pub fn sender(&self) -> EventSender {
        self.tx.clone()
    }

    /// Sets what `vmm run` does once the guest is ready.
    pub fn set_script(&mut self, script: Script) {
        self.script = script;
    }

    /// Whether the loop ends when the VM stops (the default), or goes on
    /// answering the API (state Halted or Failed) until a Shutdown action
    /// or a signal, as `vmm serve --keep-serving` does.
    pub fn set_exit_on_stop(&mut self, exit: bool) {
        self.exit_on_stop = exit;
    }

    /// The configuration the VM is (or will be) built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Builds and starts the VM; a script that needs the guest must see
    /// it ready within [`VmConfig::guest_timeout`].
    pub fn start(&mut self) -> Result<(), StartError> {
        let ctx = BuildContext { timings: self.timings.clone(), metrics: self.metrics.clone(), events: self.tx.clone() };
        let mut vm = build_microvm(self.config.clone(), &ctx)?;
        vm.start().map_err(StartError::Thread)?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.started_at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        let m = &self.config.machine;
        let (vcpus, mib) = (m.vcpu_count, m.mem_size_mib);
        log!(self, LogLevel::Info, "VM started: {vcpus} vCPUs, {mib} MiB");
        if self.script.needs_guest() {
            self.ready_deadline = Some(Instant::now() + self.config.guest_timeout);
        }
        Ok(())
    }

    /// Runs the event loop until the VM stops; returns why (None: the loop
    /// ended without a VM, e.g. a signal before start).
    ///
    /// The loop runs on a current-thread tokio runtime on the calling
    /// thread, the only thread a VMM process has besides its vCPUs. The
    /// API server (`api`, bound by the caller) runs as tasks on the same
    /// runtime, and the stop signals are a `signalfd` on it
    /// ([`crate::signals::StopSignals`]). When the loop ends, the server
    /// stops accepting and answers what is in flight before this returns.
    pub fn run(&mut self, api: Option<&mut ApiServer>) -> Result<Option<StopReason>, RunError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            // The runtime polls a handful of descriptors (the API socket and
            // its connections, the signalfd, its waker): 1024 epoll events a
            // tick (12 KiB, tokio's default) is heap every VM would hold.
            .max_io_events_per_tick(IO_EVENTS_PER_TICK)
            // Idle: what the last request or event freed, and the stack it
            // used, go back to the kernel.
            .on_thread_park(crate::heap::trim_idle)
            .build()
            .map_err(RunError::Runtime)?;
        runtime.block_on(self.serve(api));
        Ok(self.finished.clone())
    }

    async fn serve(&mut self, mut api: Option<&mut ApiServer>) {
        let server = api.as_mut().and_then(|s| s.serve()).map(tokio::spawn);
        let signals = match crate::signals::StopSignals::new() {
            Ok(s) => Some(s),
            Err(e) => {
                log!(self, LogLevel::Warning, "cannot read the stop signals ({e}); Ctrl-C will not stop the VM cleanly");
                None
            }
        };
        log!(self, LogLevel::Info, "{} {VERSION} running", api::APP_NAME);
        while self.finished.is_none() {
            let next = [
                self.next_metrics_flush,
                self.pending.as_ref().map(|p| p.deadline),
                self.ready_deadline,
                self.exit_deadline,
                self.console_retry,
            ]
            .into_iter()
                .flatten()
                .min();
            let wait = next.map_or(Duration::from_secs(3600), |t| t.saturating_duration_since(Instant::now()));
            let signal = async {
                match &signals {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // The controller holds a sender itself: the channel stays open.
                Some(ev) = self.rx.recv() => self.handle(ev),
                sig = signal => self.handle(VmEvent::Signal(sig)),
                () = tokio::time::sleep(wait) => {}
            }
            self.timers(Instant::now());
        }
        if let Some(api) = api {
            api.stop_serving();
        }
        if let Some(server) = server {
            // The server's drain is bounded; a panic in it was printed.
            let _ = server.await;
        }
    }

    /// Whatever is due at `now`: the metrics line, a console retry, a guest
    /// that did not answer or did not get ready in time.
    fn timers(&mut self, now: Instant) {
        if self.next_metrics_flush.is_some_and(|t| t <= now) {
            self.flush_metrics();
        }
        if self.console_retry.is_some_and(|t| t <= now) {
            self.drain_console();
        }
        if self.finished.is_none() && self.pending.as_ref().is_some_and(|p| p.deadline <= now) {
            self.command_timed_out();
        }
        if self.finished.is_none() && !self.guest_ready && self.ready_deadline.is_some_and(|t| t <= now) {
            self.ready_deadline = None;
            let secs = self.config.guest_timeout.as_secs_f64();
            self.force_stop(StopReason::GuestUnresponsive { what: format!("the guest was not ready within {secs} s") });
        }
        if self.finished.is_none() && self.stop_reason.is_none() && self.exit_deadline.is_some_and(|t| t <= now) {
            self.exit_deadline = None;
            let secs = self.config.guest_timeout.as_secs_f64();
            let what = format!("the guest answered the shutdown command but did not exit within {secs} s");
            self.force_stop(StopReason::GuestUnresponsive { what });
        }
    }

    /// Drains the console without waiting; retries soon if a full pipe held it up.
    fn drain_console(&mut self) {
        let done = self.vm.as_ref().is_none_or(|vm| vm.devices.drain_console(Duration::ZERO));
        self.console_retry = (!done).then(|| Instant::now() + CONSOLE_RETRY);
    }

    /// Stops the VM now (the guest did not cooperate in time).
    fn force_stop(&mut self, reason: StopReason) {
        log!(self, LogLevel::Error, "{reason}; stopping the VM");
        if let Some(vm) = self.vm.as_mut() {
            self.timings.mark_once(&self.timings.vm_stopped);
            vm.resume();
            vm.stop();
        }
        self.stopped(reason);
    }

    /// The pending command passed its deadline: cancel it in the device,
    /// answer whoever waits, and go on without it.
    fn command_timed_out(&mut self) {
        let Some(p) = self.pending.take() else { return };
        if let Some(pv) = self.vm.as_ref().and_then(|vm| vm.devices.paravirt()) {
            pv.cancel(p.seq);
        }
        let timeout = self.config.guest_timeout;
        let what = format!("the guest did not finish command {} within {} s", p.seq, timeout.as_secs_f64());
        match p.waiter {
            Waiter::Api(reply) => {
                log!(self, LogLevel::Warning, "{what}; answering 504");
                self.last.status = GuestMemoryOutcome::Invalid;
                let _ = reply.send(Err(ApiError::GuestTimeout(timeout)));
            }
            Waiter::Script | Waiter::Bench(_) | Waiter::Shutdown => {
                self.force_stop(StopReason::GuestUnresponsive { what });
            }
        }
    }

    /// Writes one line to the log of `PUT /logger`, if its level and module
    /// pass; with no log file, warnings and errors go to standard error.
    pub fn log_line(&mut self, level: LogLevel, module: &str, file: &str, line: u32, msg: std::fmt::Arguments<'_>) {
        self.log.line(&self.id, level, module, file, line, msg);
    }

    /// Writes one metrics line, if `PUT /metrics` set a file, and sets the
    /// next periodic flush.
    fn flush_metrics(&mut self) {
        if self.metrics_out.is_none() {
            return;
        }
        self.next_metrics_flush = Some(Instant::now() + METRICS_FLUSH_PERIOD);
        let snapshot = self.metrics_snapshot();
        let line = api::MetricsLine { utc_timestamp_ms: crate::host_output::unix_millis(SystemTime::now()), metrics: &snapshot };
        let written = match serde_json::to_string(&line) {
            Ok(text) => self.metrics_out.as_mut().is_some_and(|out| out.write_line(&text)),
            Err(_) => false,
        };
        if !written {
            self.metrics_lines_dropped += 1;
        }
    }

    fn handle(&mut self, ev: VmEvent) {
        match ev {
            VmEvent::Api(call) => self.handle_api(call),
            VmEvent::Phase(Phase::Ready) => {
                self.guest_ready = true;
                self.ready_deadline = None;
                log!(self, LogLevel::Info, "guest ready");
                // What building and booting the VM freed (the kernel image's
                // buffer, ELF parsing) and the stack it used.
                crate::heap::trim_idle();
                if std::mem::take(&mut self.shutdown_when_ready) {
                    self.graceful_shutdown();
                } else {
                    self.run_script();
                }
            }
            VmEvent::Phase(_) => {}
            VmEvent::CommandDone(done) => self.command_done(done),
            VmEvent::StartAps(rec) => {
                if let Some(vm) = self.vm.as_mut() {
                    if let Err(e) = vm.start_aps(rec) {
                        log!(self, LogLevel::Warning, "guest AP start-up refused: {}", ErrorChain(&e));
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
            VmEvent::GuestProtocolError { msg, suppressed } => {
                self.protocol_errors_logged += 1;
                match suppressed {
                    0 => log!(self, LogLevel::Warning, "guest protocol error: {msg}"),
                    n => log!(self, LogLevel::Warning, "guest protocol error: {msg} ({n} more suppressed)"),
                }
            }
            VmEvent::ConsoleOutput => self.drain_console(),
            VmEvent::Signal(_) if self.stop_reason.is_some() => self.finished = self.stop_reason.clone(),
            VmEvent::Signal(sig) => {
                log!(self, LogLevel::Warning, "received signal {sig}; stopping the VM");
                if let Some(vm) = self.vm.as_mut() {
                    vm.stop();
                }
                self.stopped(StopReason::Requested);
            }
        }
    }

    fn stopped(&mut self, reason: StopReason) {
        if self.stop_reason.is_some() {
            // Already stopped (a late vCPU report while serving on).
            return;
        }
        if reason.is_failure() {
            self.state = VmState::Failed;
            self.failure = Some(reason.to_string());
        } else {
            self.state = VmState::Halted;
        }
        self.exit_code = reason.guest_exit_code();
        let state = self.state;
        log!(self, LogLevel::Info, "VM {state}: {reason}");
        let total = self.metrics.guest_protocol_errors.load(std::sync::atomic::Ordering::Relaxed);
        if total > self.protocol_errors_logged {
            let n = total - self.protocol_errors_logged;
            log!(self, LogLevel::Warning, "{total} guest protocol errors in all; {n} were not logged (rate limit)");
        }
        self.flush_metrics();
        if let Some(p) = self.pending.take() {
            if let Waiter::Api(reply) = p.waiter {
                let _ = reply.send(Err(ApiError::InvalidState {
                    action: "change the guest's memory".into(),
                    state: self.state,
                }));
            }
        }
        if self.exit_on_stop {
            self.finished = Some(reason.clone());
        }
        self.stop_reason = Some(reason);
    }

    /// The `vmm run` script: allocate, then report and shut down.
    fn run_script(&mut self) {
        if let Some(mib) = self.script.alloc_mib.take().or_else(|| self.script.then_target_mib.take()) {
            match self.submit(Command::SetTarget, mib << 20, 0) {
                Ok(seq) => self.wait_for(seq, mib, Waiter::Script),
                Err(e) => log!(self, LogLevel::Warning, "cannot start the workload: {e}"),
            }
            return;
        }
        if let Some(n) = self.script.bench_alloc_free.take() {
            match self.submit(Command::BenchAllocFree, n, 0) {
                Ok(seq) => self.wait_for(seq, 0, Waiter::Bench(n)),
                Err(e) => log!(self, LogLevel::Warning, "cannot start the benchmark: {e}"),
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
            Ok(seq) => self.wait_for(seq, 0, Waiter::Shutdown),
            Err(_) => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.stop();
                }
                self.stopped(StopReason::Requested);
            }
        }
    }

    /// Waits for command `seq`, at most [`VmConfig::guest_timeout`].
    fn wait_for(&mut self, seq: u64, target_mib: u64, waiter: Waiter) {
        let deadline = Instant::now() + self.config.guest_timeout;
        self.pending = Some(Pending { seq, target_mib, waiter, deadline });
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
        let ram = self.config.mem_bytes();
        let sane = held <= ram;
        if !sane {
            Metrics::inc(&self.metrics.guest_protocol_errors);
            self.protocol_errors_logged += 1;
            log!(self, LogLevel::Warning, "guest protocol error: command {seq} says it holds {held} bytes, more than the {ram} bytes of RAM; result refused");
        }
        if status.is_some() && sane {
            self.workload_bytes = held;
        }
        let outcome = match status {
            _ if !sane => GuestMemoryOutcome::Invalid,
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
                    log!(self, LogLevel::Warning, "the guest's allocation of {} MiB ended with {outcome:?}", p.target_mib);
                }
                self.run_script();
            }
            // The guest (or whichever vCPU took the command) answered; a
            // guest that then does not exit is stopped at this deadline.
            Waiter::Shutdown => self.exit_deadline = Some(Instant::now() + self.config.guest_timeout),
            Waiter::Bench(_) => {}
        }
    }

    /// The memory report of the VM, if it was started.
    pub fn report(&self) -> Option<api::MemoryReport> {
        let vm = self.vm.as_ref()?;
        // Timings first, then the stats address (see `ReportContext::timings`).
        let timings = self.timings.report();
        let stats_gpa = vm.devices.stats_gpa();
        // The registration as of the reclaim counters (see `ReclaimStats::kvm`).
        let reclaim = vm.devices.reclaim_stats();
        let registered_bytes = reclaim.kvm.map_or_else(|| vm.devices.registered_bytes(), |k| k.registered_bytes);
        let memslots_unregistered = reclaim.kvm.map_or(0, |k| k.memslots_deleted);
        Some(report::memory_report(&ReportContext {
            mem: &vm.mem,
            stats_gpa,
            vcpus: vm.config.machine.vcpu_count,
            tsc_khz: vm.tsc_khz,
            workload_bytes: self.workload_bytes,
            registered_bytes,
            registered_ranges: vm.devices.paravirt().and_then(|p| p.registrar()).map(|r| r.registered_ranges()),
            reclaim_mode: vm.config.machine.effective_reclaim(),
            reclaim,
            memslots_unregistered,
            timings,
        }))
    }

    fn invalid_state(&self, action: &str) -> ApiError {
        ApiError::InvalidState { action: action.into(), state: self.state }
    }

    fn handle_api(&mut self, call: ApiCall) {
        let ApiCall { request, reply } = call;
        let endpoint = request.endpoint();
        let answer = match request {
            ApiRequest::GetInstanceInfo => {
                Ok(ApiResponse::InstanceInfo(api::InstanceInfo::new(self.id.clone(), VERSION, self.state)))
            }
            ApiRequest::GetVmStatus => Ok(ApiResponse::InstanceStatus(api::InstanceStatus {
                exit_code: self.exit_code,
                failure_reason: self.failure.clone(),
                started_at_unix_ms: self.started_at_unix_ms,
                ..api::InstanceStatus::new(self.id.clone(), self.state)
            })),
            ApiRequest::GetVersion => {
                Ok(ApiResponse::Version(api::FirecrackerVersion { firecracker_version: VERSION.into() }))
            }
            ApiRequest::GetVmConfig => Ok(ApiResponse::VmConfig(Box::new(api::FullVmConfiguration::new(
                self.config.boot_source(),
                self.config.machine.clone(),
                self.log.config().cloned(),
                self.metrics_config.clone(),
            )))),
            ApiRequest::GetMachineConfig => Ok(ApiResponse::MachineConfig(self.config.machine.clone())),
            ApiRequest::PutMachineConfig(put) => {
                if self.vm.is_some() {
                    Err(self.invalid_state("change the machine configuration"))
                } else {
                    self.config.machine.replace(put).map(|()| ApiResponse::NoContent).map_err(ApiError::from)
                }
            }
            ApiRequest::PatchMachineConfig(update) => {
                if self.vm.is_some() {
                    Err(self.invalid_state("change the machine configuration"))
                } else {
                    self.config.machine.apply(&update).map(|()| ApiResponse::NoContent).map_err(ApiError::from)
                }
            }
            ApiRequest::PutBootSource(boot) => {
                if self.vm.is_some() {
                    Err(self.invalid_state("change the boot source"))
                } else if let Some(Err(e)) = boot.kernel_image_path.as_deref().map(|p| check_kernel_image(Path::new(p))) {
                    Err(ApiError::HostPath { field: "kernel_image_path", source: e.into() })
                } else {
                    self.config.set_boot_source(&boot);
                    Ok(ApiResponse::NoContent)
                }
            }
            ApiRequest::PutLogger(logger) => self.set_logger(logger),
            ApiRequest::PutMetrics(metrics) => self.set_metrics(metrics),
            ApiRequest::PutActions(a) => self.action(a.action_type),
            ApiRequest::PatchVm(u) => self.pause_resume(u.state),
            // Before start: 200 with `valid: false`, as the spec promises.
            ApiRequest::GetMemory => Ok(ApiResponse::MemoryReport(Box::new(
                self.report().unwrap_or_else(|| report::not_started_report(self.timings.report())),
            ))),
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
                            self.wait_for(seq, target.target_mib, Waiter::Api(reply));
                            log!(self, LogLevel::Info, "API {endpoint}: sent to the guest, answered when it is done");
                            return;
                        }
                        Err(e) => Err(ApiError::GuestBusy(e.into())),
                    }
                }
            }
            ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(self.metrics_snapshot())),
        };
        match &answer {
            Ok(r) => log!(self, LogLevel::Info, "API {endpoint}: {}", r.status()),
            Err(e) => log!(self, LogLevel::Info, "API {endpoint}: {} {}", e.status(), ErrorChain(e)),
        }
        let _ = reply.send(answer);
    }

    /// `PUT /logger`: opens the log file (if one is given) and uses it from
    /// now on.
    fn set_logger(&mut self, logger: api::Logger) -> Result<ApiResponse, ApiError> {
        if self.vm.is_some() {
            return Err(self.invalid_state("configure the logger"));
        }
        let out = match logger.log_path.as_deref() {
            Some(path) => Some(
                HostOutput::open(Path::new(path))
                    .map_err(|e| ApiError::HostPath { field: "log_path", source: e.into() })?,
            ),
            None => None,
        };
        self.log.configure(logger, out);
        log!(self, LogLevel::Info, "{} {VERSION}: logger configured", api::APP_NAME);
        Ok(ApiResponse::NoContent)
    }

    /// `PUT /metrics`: opens the metrics file and flushes to it from now on.
    fn set_metrics(&mut self, metrics: api::MetricsConfig) -> Result<ApiResponse, ApiError> {
        if self.vm.is_some() {
            return Err(self.invalid_state("configure the metrics"));
        }
        let out = HostOutput::open(Path::new(&metrics.metrics_path))
            .map_err(|e| ApiError::HostPath { field: "metrics_path", source: e.into() })?;
        self.metrics_out = Some(out);
        self.metrics_config = Some(metrics);
        self.next_metrics_flush = Some(Instant::now() + METRICS_FLUSH_PERIOD);
        Ok(ApiResponse::NoContent)
    }

    fn action(&mut self, action: api::ActionType) -> Result<ApiResponse, ApiError> {
        match action {
            api::ActionType::FlushMetrics => {
                self.flush_metrics();
                Ok(ApiResponse::NoContent)
            }
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
                if self.state != VmState::Running || self.pending.is_some() {
                    return Err(self.invalid_state("ask the guest to shut down"));
                }
                if self.guest_ready {
                    self.graceful_shutdown();
                } else {
                    // As a key press waits for the guest's driver: the guest
                    // is asked as soon as it can be (and stopped if it never is).
                    self.shutdown_when_ready = true;
                    let deadline = Instant::now() + self.config.guest_timeout;
                    self.ready_deadline = Some(self.ready_deadline.map_or(deadline, |t| t.min(deadline)));
                }
                Ok(ApiResponse::NoContent)
            }
            api::ActionType::Shutdown => {
                match self.vm.as_mut() {
                    // Stopped already and serving on: exit as it stopped.
                    Some(_) if self.stop_reason.is_some() => self.finished = self.stop_reason.clone(),
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

    /// `PATCH /vm`. As in Firecracker, asking for the state the VM is
    /// already in succeeds and changes nothing.
    fn pause_resume(&mut self, target: api::VmStateTarget) -> Result<ApiResponse, ApiError> {
        match (target, self.state, self.vm.as_mut()) {
            (api::VmStateTarget::Paused, VmState::Paused, Some(_))
            | (api::VmStateTarget::Resumed, VmState::Running, Some(_)) => Ok(ApiResponse::NoContent),
            (api::VmStateTarget::Paused, VmState::Running, Some(vm)) => match vm.pause() {
                Ok(()) => {
                    self.state = VmState::Paused;
                    log!(self, LogLevel::Info, "VM paused");
                    Ok(ApiResponse::NoContent)
                }
                Err(e) => {
                    log!(self, LogLevel::Warning, "pause failed: {}", ErrorChain(&e));
                    Err(ApiError::PauseFailed(e.into()))
                }
            },
            (api::VmStateTarget::Resumed, VmState::Paused, Some(vm)) => {
                vm.resume();
                self.state = VmState::Running;
                log!(self, LogLevel::Info, "VM resumed");
                Ok(ApiResponse::NoContent)
            }
            (api::VmStateTarget::Paused, _, _) => Err(self.invalid_state("pause the VM")),
            (api::VmStateTarget::Resumed, _, _) => Err(self.invalid_state("resume the VM")),
        }
    }

    fn metrics_snapshot(&self) -> api::Metrics {
        self.metrics.snapshot(self.guest_commands, self.log.dropped(), self.metrics_lines_dropped)
    }
}

/// Why the controller's loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the controller's runtime")]
    Runtime(#[source] std::io::Error),
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

#[cfg(test)]
mod tests {
    //! The controller's decisions on the guest's deadlines, driven without
    //! KVM: a controller with no VM takes the same paths (every VM call is
    //! behind `self.vm`), and [`Controller::timers`] takes the time it
    //! acts at, so a test moves time instead of sleeping.
    use super::*;
    use crate::vstate::stop::exit_codes;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A controller whose guest runs and is ready, as after a boot.
    fn running() -> Controller {
        let config = VmConfig { guest_timeout: TIMEOUT, ..VmConfig::default() };
        let mut c = Controller::new(config, Arc::new(Timings::new()));
        (c.state, c.guest_ready) = (VmState::Running, true);
        c
    }

    /// The guest has command `seq` for `waiter`, as `wait_for` leaves it.
    fn waiting(c: &mut Controller, seq: u64, waiter: Waiter) -> Instant {
        let deadline = Instant::now() + TIMEOUT;
        c.pending = Some(Pending { seq, target_mib: 0, waiter, deadline });
        deadline
    }

    fn done(seq: u64) -> VmEvent {
        VmEvent::CommandDone(CommandDone { seq, status: Some(CommandStatus::Ok), result0: 0, result1: 0 })
    }

    fn unresponsive(c: &Controller, what: &str) {
        match &c.finished {
            Some(r @ StopReason::GuestUnresponsive { what: w }) => {
                assert!(w.contains(what), "{w}");
                assert_eq!(r.exit_code(), i32::from(exit_codes::GUEST_UNRESPONSIVE));
            }
            other => panic!("finished {other:?}, not unresponsive ({what})"),
        }
        assert_eq!(c.state, VmState::Failed);
        assert!(c.failure.as_deref().is_some_and(|f| f.contains(what)));
    }

    #[test]
    fn a_guest_that_answers_the_shutdown_but_does_not_exit_is_stopped_after_one_guest_timeout() {
        let mut c = running();
        waiting(&mut c, 7, Waiter::Shutdown);
        // A stale answer (another command's number) arms nothing.
        c.handle(done(6));
        assert!(c.pending.is_some() && c.exit_deadline.is_none());
        let before = Instant::now();
        c.handle(done(7));
        let after = Instant::now();
        assert!(c.pending.is_none(), "the shutdown command is answered");
        let deadline = c.exit_deadline.expect("the guest gets one timeout to exit");
        assert!(deadline >= before + TIMEOUT && deadline <= after + TIMEOUT, "one --guest-timeout after the answer");
        // Until then nothing happens; at the deadline it is stopped, exit code 3.
        c.timers(deadline - Duration::from_millis(1));
        assert_eq!((c.finished.as_ref(), c.state), (None, VmState::Running));
        c.timers(deadline);
        unresponsive(&c, "answered the shutdown command but did not exit within 2 s");
        assert!(c.exit_deadline.is_none(), "the deadline fires once");
    }

    #[test]
    fn a_guest_that_exits_after_answering_the_shutdown_keeps_its_own_exit() {
        let mut c = running();
        waiting(&mut c, 1, Waiter::Shutdown);
        c.handle(done(1));
        let deadline = c.exit_deadline.unwrap();
        c.stopped(StopReason::GuestExit(0));
        c.timers(deadline + TIMEOUT);
        assert_eq!(c.finished, Some(StopReason::GuestExit(0)));
        assert_eq!((c.state, c.exit_code), (VmState::Halted, Some(0)));
    }

    #[test]
    fn a_shutdown_command_never_answered_is_stopped_at_its_deadline() {
        let mut c = running();
        let deadline = waiting(&mut c, 3, Waiter::Shutdown);
        c.timers(deadline - Duration::from_millis(1));
        assert!(c.finished.is_none() && c.pending.is_some());
        c.timers(deadline);
        unresponsive(&c, "did not finish command 3 within 2 s");
        assert!(c.pending.is_none() && c.exit_deadline.is_none());
    }

    #[test]
    fn an_api_command_that_times_out_answers_504_and_the_vm_runs_on() {
        let mut c = running();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let deadline = waiting(&mut c, 4, Waiter::Api(tx));
        c.timers(deadline);
        assert!(matches!(rx.try_recv(), Ok(Err(ApiError::GuestTimeout(t))) if t == TIMEOUT));
        assert_eq!((c.finished.as_ref(), c.state, c.pending.is_none()), (None, VmState::Running, true));
        // The late answer is ignored, and a graceful shutdown can be asked again.
        c.handle(done(4));
        assert!(c.exit_deadline.is_none());
        assert!(c.action(api::ActionType::SendCtrlAltDel).is_ok());
    }

    #[test]
    fn ctrl_alt_del_before_the_guest_is_ready_waits_one_guest_timeout_for_it() {
        let mut c = running();
        c.guest_ready = false;
        let before = Instant::now();
        assert!(matches!(c.action(api::ActionType::SendCtrlAltDel), Ok(ApiResponse::NoContent)));
        assert!(c.shutdown_when_ready);
        let deadline = c.ready_deadline.expect("a deadline for the guest to get ready");
        assert!(deadline >= before + TIMEOUT);
        // A second one does not push the deadline back.
        assert!(c.action(api::ActionType::SendCtrlAltDel).is_ok());
        assert_eq!(c.ready_deadline, Some(deadline));
        c.timers(deadline - Duration::from_millis(1));
        assert!(c.finished.is_none());
        c.timers(deadline);
        unresponsive(&c, "was not ready within 2 s");
    }

    #[test]
    fn ctrl_alt_del_is_refused_while_a_command_waits_or_the_vm_is_not_running() {
        let mut c = running();
        waiting(&mut c, 2, Waiter::Script);
        assert!(matches!(c.action(api::ActionType::SendCtrlAltDel), Err(ApiError::InvalidState { .. })));
        let mut c = Controller::new(VmConfig::default(), Arc::new(Timings::new()));
        assert!(matches!(c.action(api::ActionType::SendCtrlAltDel), Err(ApiError::InvalidState { .. })));
        // Shutdown with no VM ends the loop, as requested.
        assert!(c.action(api::ActionType::Shutdown).is_ok());
        assert_eq!(c.finished, Some(StopReason::Requested));
    }

    #[test]
    fn a_guest_result_larger_than_its_ram_is_refused() {
        let mut c = running();
        waiting(&mut c, 5, Waiter::Script);
        let ram = c.config.mem_bytes();
        c.handle(VmEvent::CommandDone(CommandDone { seq: 5, status: Some(CommandStatus::Ok), result0: ram + 1, result1: 0 }));
        assert_eq!((c.last.status, c.workload_bytes), (GuestMemoryOutcome::Invalid, 0));
        assert_eq!(c.metrics.guest_protocol_errors.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
