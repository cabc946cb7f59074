//! `vmm run` and `vmm serve`: a controller with its VM configuration, the
//! API server when asked for, and what is printed at the end (report, boot
//! timings, why the VM stopped). The exit code follows from how it ended.
//!
//! Exit codes ([`vmm::vstate::stop::exit_codes`], docs/security.md): 0 when
//! the VM shut down cleanly, 1 when it failed (triple fault, guest
//! exception, KVM error, unhandled exit) or the VMM hit a host error, 2 for
//! bad input (flags, kernel file, `/dev/kvm` access), 3 when the guest did
//! not answer in time, and 64..=127 for a guest's nonzero exit code C
//! (64 + (C & 63)); C itself is printed on stdout. A guest cannot make the
//! VMM exit with any of the VMM's own codes.
//!
//! Everything is printed through [`vmm::out`]: a closed or stuck stdout or
//! stderr loses lines (counted), never the process.

use crate::args::{RunArgs, ServeArgs, VmPlace};
use api::ErrorChain;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm::api_server::ApiServer;
use vmm::builder::BuildError;
use vmm::config::VmConfig;
use vmm::controller::{Controller, StartError};
use vmm::loader::LoadError;
use vmm::script::{ReportFormat, Script};
use vmm::timings::Timings;
use vmm::vstate::stop::StopReason;

fn start_api(path: &Path, ctl: &Controller) -> Result<ApiServer, u8> {
    let server = vmm::api_server::bind(path, ctl.sender(), ctl.metrics()).map_err(|e| {
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        2
    })?;
    vmm::errln!("vmm: serving the control API on {}", server.path().display());
    Ok(server)
}

/// The socket to serve on: `--api-sock`, else the VM's id in the runtime
/// directory (made if missing).
fn socket_path(api_sock: Option<&Path>, place: &VmPlace) -> Result<PathBuf, u8> {
    if let Some(path) = api_sock {
        return Ok(path.to_path_buf());
    }
    let dir = place.runtime_dir();
    let path = crate::runtime_dir::socket_path(&dir, &place.id());
    // Refused before the directory is made, so a bad one leaves nothing behind.
    if path.as_os_str().len() > vmm::api_server::socket::MAX_SOCKET_PATH_BYTES {
        let e = vmm::api_server::socket::SocketError::PathTooLong(path);
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        vmm::errln!("vmm: hint: pass a shorter --runtime-dir or --id, or --api-sock PATH");
        return Err(2);
    }
    crate::runtime_dir::create(&dir).map_err(|e| {
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        vmm::errln!("vmm: hint: pass --runtime-dir DIR, --api-sock PATH or --no-api");
        2
    })?;
    Ok(path)
}

/// What to tell a user who got `e`, beyond the error itself.
fn hint(e: &StartError) -> Option<&'static str> {
    match e {
        StartError::Build(BuildError::Kernel(LoadError::File(_) | LoadError::Read { .. } | LoadError::NotElf { .. })) => {
            Some("pass an existing ELF kernel to --kernel, or omit it to boot the built-in guest")
        }
        _ => None,
    }
}

/// Sets up the seccomp filters unless `off` (`--no-seccomp`); before any
/// VMM thread starts, since each installs its filter as it starts.
fn enable_seccomp(off: bool) -> Result<(), u8> {
    if off {
        return Ok(());
    }
    vmm::seccomp::enable().map_err(|e| {
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        vmm::errln!("vmm: hint: --no-seccomp runs without the filters");
        1
    })
}

/// `vmm run`: boots the VM and runs it until the guest stops (or, with a
/// script, until the report is printed).
pub fn run(args: RunArgs, timings: Arc<Timings>) -> u8 {
    let config = args.vm_config();
    if let Err(e) = config.validate() {
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        return 2;
    }
    if let Err(code) = enable_seccomp(args.no_seccomp) {
        return code;
    }
    let mut ctl = Controller::new(config, timings.clone());
    let format = args.report_format();
    ctl.set_script(Script {
        alloc_mib: args.alloc_mib,
        report: format,
        then_target_mib: args.then_target_mib,
        bench_alloc_free: args.bench_alloc_free,
    });
    let mut server = if args.no_api {
        None
    } else {
        match socket_path(args.api_sock.as_deref(), &args.place).and_then(|p| start_api(&p, &ctl)) {
            Ok(s) => Some(s),
            Err(code) => return code,
        }
    };
    if let Err(e) = ctl.start() {
        vmm::errln!("vmm: error: {}", ErrorChain(&e));
        if let Some(h) = hint(&e) {
            vmm::errln!("vmm: hint: {h}");
        }
        return if e.is_usage() { 2 } else { 1 };
    }
    vmm::seccomp::apply(vmm::seccomp::ThreadKind::Main);
    let reason = ctl.run(server.as_mut());
    if let Some(s) = server {
        s.shutdown();
    }
    let reason = match reason {
        Ok(reason) => reason,
        Err(e) => {
            vmm::errln!("vmm: error: {}", ErrorChain(&e));
            return 1;
        }
    };
    if let Some(report) = ctl.printed_report.take() {
        let text = match format {
            Some(ReportFormat::Json) => serde_json::to_value(&report).unwrap_or_default().to_string(),
            _ => crate::render::memory_table(&report).to_string(),
        };
        vmm::outln!("{text}");
    }
    if let Some(b) = ctl.bench_result.take() {
        vmm::outln!("{}", serde_json::json!({ "bench_alloc_free": b }));
    }
    print_timings(&timings);
    exit_code(reason)
}

/// `vmm serve`: serves the API with no VM until it is configured and started.
pub fn serve(args: ServeArgs, timings: Arc<Timings>) -> u8 {
    if let Err(code) = enable_seccomp(args.no_seccomp) {
        return code;
    }
    let config = VmConfig {
        id: args.place.id().to_string(),
        serial: args.serial.clone(),
        serial_max_bytes: args.guest.serial_max_bytes,
        guest_timeout: args.guest.guest_timeout,
        ..VmConfig::default()
    };
    let mut ctl = Controller::new(config, timings);
    ctl.set_exit_on_stop(!args.keep_serving);
    let mut server = match socket_path(args.api_sock.as_deref(), &args.place).and_then(|p| start_api(&p, &ctl)) {
        Ok(s) => s,
        Err(code) => return code,
    };
    vmm::seccomp::apply(vmm::seccomp::ThreadKind::Main);
    let reason = ctl.run(Some(&mut server));
    server.shutdown();
    match reason {
        Ok(reason) => exit_code(reason),
        Err(e) => {
            vmm::errln!("vmm: error: {}", ErrorChain(&e));
            1
        }
    }
}

/// Prints why the VM stopped (and a guest's nonzero exit code on stdout)
/// and returns the process exit code for it.
fn exit_code(reason: Option<StopReason>) -> u8 {
    let Some(reason) = reason else { return 0 };
    if let StopReason::GuestExit(c @ 1..) = reason {
        vmm::outln!("vmm: guest exit code {c}");
    }
    let code = reason.exit_code().clamp(0, 255) as u8;
    if reason.is_failure() {
        vmm::errln!("vmm: error: {reason} (exit code {code})");
    } else {
        vmm::errln!("vmm: {reason}");
    }
    code
}

fn print_timings(t: &Timings) {
    let rows = [
        ("vm created", &t.vm_created),
        ("vcpu first entry", &t.vcpu_first_entry),
        ("guest first port write", &t.guest_first_port_write),
        ("guest entered", &t.guest_entered),
        ("guest memory ready", &t.guest_memory_ready),
        ("guest ready", &t.guest_ready),
        ("vm stopped", &t.vm_stopped),
    ];
    let mut line = String::from("vmm: boot timings (us from process start):");
    for (name, slot) in rows {
        if let Some(us) = t.us(slot) {
            line.push_str(&format!(" {name} {us:.0};"));
        }
    }
    line.pop();
    vmm::errln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_gets_a_hint_for_the_command_line() {
        let e = StartError::Build(BuildError::Kernel(LoadError::NotElf { name: "x".into(), why: "no ELF magic" }));
        assert!(hint(&e).unwrap().contains("--kernel"));
        assert!(hint(&StartError::Thread(std::io::Error::from(std::io::ErrorKind::Other))).is_none());
    }

    #[test]
    fn exit_codes_follow_the_stop_reason() {
        assert_eq!(exit_code(None), 0);
        assert_eq!(exit_code(Some(StopReason::GuestExit(7))), 71);
        assert_eq!(exit_code(Some(StopReason::GuestExit(2))), 66, "never the VMM's own 2");
        assert_eq!(exit_code(Some(StopReason::GuestExit(134))), 70, "never what looks like SIGABRT");
        assert_eq!(exit_code(Some(StopReason::TripleFault { rip: None })), 1);
    }
}
