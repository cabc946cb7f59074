//! What the controller acts on: [`VmEvent`]s from the vCPU threads, the API
//! server and the signal handler, all on one channel. This module owns the
//! hand-off types so that none of the senders depends on the receiver.

use crate::vstate::stop::StopReason;
use guest_abi::{ApBoot, CommandStatus, Phase};

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
    /// The process received this signal (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}
