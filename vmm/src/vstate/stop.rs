//! Why a vCPU stopped, and the process exit code each reason maps to.

use crate::memory::RegisterError;
use std::fmt;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// The guest wrote this code to the exit port.
    GuestExit(u32),
    /// The guest reset the machine through the i8042 (a clean shutdown).
    Reset,
    /// The VMM asked the vCPU to stop.
    Requested,
    /// The guest reported a CPU exception from its handler.
    GuestException { vector: u64, error_code: u64, rip: u64, cr2: u64, ring: u8 },
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { rip: Option<u64> },
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`, `FAIL_ENTRY`).
    KvmFailure { what: String, rip: Option<u64> },
    /// An exit this VMM does not handle.
    UnhandledExit { what: String, rip: Option<u64> },
    /// KVM refused to register memory the guest onlined.
    Registration { error: RegisterError, rip: Option<u64> },
    /// `KVM_RUN` itself failed.
    RunFailed(kvm_ioctls::Error),
    /// The registers of a guest that reported an exception could not be read.
    ExceptionRegisters(kvm_ioctls::Error),
}

impl StopReason {
    /// The process exit code this stop maps to: the guest's own code for a
    /// guest exit (1 if it does not fit in 1..=255), 0 for a reset or a
    /// requested stop, 1 for every failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestExit(0) | StopReason::Reset | StopReason::Requested => 0,
            StopReason::GuestExit(c) if *c <= 255 => *c as i32,
            _ => 1,
        }
    }

    /// Whether the guest ended in a failure (as opposed to a shutdown).
    pub fn is_failure(&self) -> bool {
        self.exit_code() != 0
    }

    /// The same reason with the guest RIP filled in, where it names one.
    pub fn with_rip(self, rip: Option<u64>) -> StopReason {
        match self {
            StopReason::TripleFault { .. } => StopReason::TripleFault { rip },
            StopReason::KvmFailure { what, .. } => StopReason::KvmFailure { what, rip },
            StopReason::UnhandledExit { what, .. } => StopReason::UnhandledExit { what, rip },
            StopReason::Registration { error, .. } => StopReason::Registration { error, rip },
            other => other,
        }
    }
}

fn rip_text(rip: &Option<u64>) -> String {
    rip.map_or_else(|| "unknown".to_string(), |r| format!("{r:#x}"))
}

/// x86 exception mnemonics, by vector.
const EXCEPTIONS: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP",
    "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved", "reserved",
    "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestExit(c) => write!(f, "guest exited with code {c}"),
            StopReason::Reset => write!(f, "guest reset the machine (i8042)"),
            StopReason::Requested => write!(f, "stopped by the VMM"),
            StopReason::GuestException { vector, error_code, rip, cr2, ring } => {
                let name = EXCEPTIONS.get(*vector as usize).copied().unwrap_or("unknown");
                write!(f, "guest exception {name} (vector {vector}) at RIP {rip:#x} in ring {ring}, error code {error_code:#x}")?;
                if *vector == 14 {
                    write!(f, ", CR2 {cr2:#x}")?;
                }
                Ok(())
            }
            StopReason::TripleFault { rip } => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN), last RIP {}", rip_text(rip))
            }
            StopReason::KvmFailure { what, rip } => write!(f, "KVM failed to run the guest: {what}, guest RIP {}", rip_text(rip)),
            StopReason::UnhandledExit { what, rip } => write!(f, "unhandled VM exit: {what}, guest RIP {}", rip_text(rip)),
            StopReason::Registration { error, rip } => {
                write!(f, "cannot register guest memory: {error}")?;
                if let Some(source) = std::error::Error::source(error) {
                    write!(f, ": {source}")?;
                }
                write!(f, ", guest RIP {}", rip_text(rip))
            }
            StopReason::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
            StopReason::ExceptionRegisters(e) => write!(f, "cannot read the registers after a guest exception: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_pass_the_guests_through_and_map_failures_to_1() {
        assert_eq!(StopReason::GuestExit(3).exit_code(), 3);
        assert_eq!(StopReason::GuestExit(0).exit_code(), 0);
        assert_eq!(StopReason::GuestExit(1000).exit_code(), 1);
        assert_eq!(StopReason::Reset.exit_code(), 0);
        assert!(StopReason::RunFailed(kvm_ioctls::Error::new(libc::EFAULT)).is_failure());
    }

    #[test]
    fn reasons_name_the_exception_and_the_rip() {
        let r = StopReason::GuestException { vector: 14, error_code: 2, rip: 0x10_0000, cr2: 0xdead_0000, ring: 3 };
        let text = r.to_string();
        assert!(text.contains("#PF") && text.contains("0xdead0000") && text.contains("ring 3"), "{text}");
        let r = StopReason::KvmFailure { what: "x".into(), rip: None }.with_rip(Some(0x1234));
        assert!(r.to_string().contains("0x1234"));
        let r = StopReason::Registration { error: RegisterError::NotRam { gpa: 0x1000 }, rip: None };
        assert_eq!(r.to_string(), "cannot register guest memory: guest-physical address 0x1000 is not guest RAM, guest RIP unknown");
    }
}
