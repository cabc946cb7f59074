//! Why a vCPU stopped, and the process exit code each reason maps to.
//!
//! The VMM's own exit codes are reserved ([`exit_codes`]); a guest's nonzero
//! exit code is mapped into [`exit_codes::GUEST_FIRST`]..=[`exit_codes::GUEST_LAST`],
//! so a supervisor can tell a VMM failure from a guest failure whatever code
//! the guest writes. The guest's own code is reported in full elsewhere
//! (`vmm run` prints it on stdout; `GET /vm/status` answers it as `exit_code`).

use crate::memory::RegisterError;
use std::fmt;

/// The process exit codes of `vmm run` and `vmm serve` (see docs/security.md,
/// "Exit codes").
pub mod exit_codes {
    /// The VM shut down cleanly: the guest exited with 0, reset the machine,
    /// or was stopped (Shutdown, SIGTERM).
    pub const OK: u8 = 0;
    /// The VM failed (triple fault, guest exception, KVM error, unhandled
    /// exit) or the VMM hit a host error.
    pub const FAILED: u8 = 1;
    /// Bad input: flags, kernel file, `/dev/kvm` access.
    pub const USAGE: u8 = 2;
    /// The guest did not answer or get ready within `--guest-timeout`.
    pub const GUEST_UNRESPONSIVE: u8 = 3;
    /// First code of the guest range: a guest exit code `c != 0` maps to
    /// `GUEST_FIRST + (c & 63)`.
    pub const GUEST_FIRST: u8 = 64;
    /// Last code of the guest range.
    pub const GUEST_LAST: u8 = 127;

    /// The process exit code for a guest that wrote `code`.
    pub const fn for_guest(code: u32) -> u8 {
        if code == 0 {
            OK
        } else {
            GUEST_FIRST + (code & 63) as u8
        }
    }
}

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
    /// The guest did not answer (or get ready) in time; the VMM stopped it.
    GuestUnresponsive { what: String },
}

impl StopReason {
    /// The process exit code this stop maps to ([`exit_codes`]): 0 for a
    /// clean shutdown, a reset or a requested stop, the guest range for a
    /// guest's nonzero exit code, 3 for an unresponsive guest, 1 for every
    /// other failure.
    pub fn exit_code(&self) -> i32 {
        i32::from(match self {
            StopReason::Reset | StopReason::Requested => exit_codes::OK,
            StopReason::GuestExit(c) => exit_codes::for_guest(*c),
            StopReason::GuestUnresponsive { .. } => exit_codes::GUEST_UNRESPONSIVE,
            _ => exit_codes::FAILED,
        })
    }

    /// The exit code the guest chose, as `GET /vm/status` reports it: the
    /// code it wrote (saturated to `i32::MAX`), 0 for a reset or a
    /// requested stop, none when the VM failed.
    pub fn guest_exit_code(&self) -> Option<i32> {
        match self {
            StopReason::GuestExit(c) => Some(i32::try_from(*c).unwrap_or(i32::MAX)),
            StopReason::Reset | StopReason::Requested => Some(0),
            _ => None,
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
            StopReason::GuestUnresponsive { what } => write!(f, "guest unresponsive: {what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_exit_codes_land_in_their_range_and_never_on_the_vmms_own() {
        assert_eq!(StopReason::GuestExit(0).exit_code(), 0);
        assert_eq!(StopReason::GuestExit(3).exit_code(), 67);
        assert_eq!(StopReason::GuestExit(101).exit_code(), 101);
        for c in [1, 2, 3, 63, 64, 127, 128, 134, 139, 255, 1000, u32::MAX] {
            let code = StopReason::GuestExit(c).exit_code();
            assert!((64..=127).contains(&code), "guest code {c} gave {code}");
            assert_eq!(StopReason::GuestExit(c).guest_exit_code(), Some(i32::try_from(c).unwrap_or(i32::MAX)));
        }
        assert_eq!(StopReason::Reset.exit_code(), 0);
        let failed = StopReason::RunFailed(kvm_ioctls::Error::new(libc::EFAULT));
        assert!(failed.is_failure());
        assert_eq!((failed.exit_code(), failed.guest_exit_code()), (1, None));
        let r = StopReason::GuestUnresponsive { what: "x".into() };
        assert_eq!((r.exit_code(), r.guest_exit_code()), (3, None));
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
