//! What a port access asks of the vCPU loop.

use crate::memory::RegisterError;

/// What a port access asks of the vCPU loop.
#[derive(Debug, Clone, PartialEq)]
pub enum PortOutcome {
    /// Carry on.
    Continue,
    /// Stop this VM: the guest exited with this code.
    GuestExit(u32),
    /// Stop this VM: the guest asked for a reset.
    Reset,
    /// Stop this VM: the guest reported an exception (registers tell which).
    GuestException,
    /// Stop: the VMM asked this vCPU to stop while it waited.
    StopRequested,
    /// Stop: KVM refused to register the memory the guest onlined.
    RegistrationFailed(RegisterError),
}
