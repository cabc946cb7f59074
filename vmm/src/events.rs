//! What the controller acts on: [`VmEvent`]s from the vCPU threads and the
//! API server, all on one channel ([`channel`]). This module owns the
//! hand-off types so that none of the senders depends on the receiver.
//!
//! The channel is tokio's unbounded one: the vCPU threads send from plain
//! threads (a send never blocks a vCPU), and the send wakes the controller's
//! runtime on the main thread, which awaits the receiver next to its timers,
//! the stop signals and the API server's tasks. No thread relays anything.
//! Nothing the guest does queues events without bound: the console sends one
//! event until drained, the paravirtual device rate-limits its error reports,
//! and each command or phase is one event.

use crate::vstate::stop::StopReason;
use guest_abi::{ApBoot, CommandStatus, Phase};

/// The sending end of the controller's channel (cloned for every sender).
pub type EventSender = tokio::sync::mpsc::UnboundedSender<VmEvent>;

/// The controller's end of the channel.
pub type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<VmEvent>;

/// A new event channel.
pub fn channel() -> (EventSender, EventReceiver) {
    tokio::sync::mpsc::unbounded_channel()
}

/// The answer to one API request.
pub type ApiReply = Result<api::ApiResponse, api::ApiError>;

/// A request from the API server, with where to send the answer. The
/// controller answers exactly once (dropping `reply` unanswered reads as a 500).
#[derive(Debug)]
pub struct ApiCall {
    pub request: api::ApiRequest,
    pub reply: tokio::sync::oneshot::Sender<ApiReply>,
}

impl PartialEq for ApiCall {
    /// Calls are never equal: each carries its own reply channel.
    fn eq(&self, _: &ApiCall) -> bool {
        false
    }
}

/// A finished guest command, as read back from the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandDone {
    /// The command's sequence number.
    pub seq: u64,
    /// Its status; `None` when the mailbox could not be read or the guest
    /// wrote an unknown status.
    pub status: Option<CommandStatus>,
    /// First result.
    pub result0: u64,
    /// Second result.
    pub result1: u64,
}

impl CommandDone {
    /// A command that ended without a readable answer.
    pub fn failed(seq: u64) -> CommandDone {
        CommandDone { seq, status: None, result0: 0, result1: 0 }
    }
}

/// Something the controller acts on.
#[derive(Debug, PartialEq)]
pub enum VmEvent {
    /// An API request (from the API server).
    Api(ApiCall),
    /// The guest reached a boot phase.
    Phase(Phase),
    /// A command finished.
    CommandDone(CommandDone),
    /// The guest asked for its application processors (the `ApBoot` it wrote).
    StartAps(ApBoot),
    /// vCPU `cpu` stopped.
    VcpuStopped { cpu: u8, reason: StopReason },
    /// The guest wrote something the VMM refused (bad address, bad record);
    /// `suppressed` more were counted but not sent since the last one
    /// (the device rate-limits them).
    GuestProtocolError { msg: String, suppressed: u64 },
    /// The console buffer has bytes for the host (sent once until drained).
    ConsoleOutput,
    /// The process received this signal (SIGINT, SIGTERM, SIGHUP). The
    /// controller reads its stop signals itself ([`crate::signals`]); tools
    /// that have no controller (`vmm top`, `vmm density`) get them as this
    /// event from [`crate::signals::forward_to`].
    Signal(i32),
}
