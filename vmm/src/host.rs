//! Facts about the host that change how a VM is set up.

use std::path::{Path, PathBuf};

/// Whether `/dev/kvm` is served by PVM (ring-0 guest code is emulated there,
/// so the guest kernel is better off in ring 3).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The KVM device: `/dev/kvm`, or `$VMM_KVM_DEVICE` (tests point it elsewhere).
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("VMM_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from)
}

/// The ring the guest kernel runs in for `cpl` on this host.
pub fn resolve_cpl(cpl: api::GuestCpl) -> u8 {
    match cpl {
        api::GuestCpl::Ring0 => 0,
        api::GuestCpl::Ring3 => 3,
        api::GuestCpl::Auto if is_pvm_host() => 3,
        api::GuestCpl::Auto => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_rings_are_kept_and_auto_follows_the_host() {
        assert_eq!(resolve_cpl(api::GuestCpl::Ring0), 0);
        assert_eq!(resolve_cpl(api::GuestCpl::Ring3), 3);
        assert_eq!(resolve_cpl(api::GuestCpl::Auto), if is_pvm_host() { 3 } else { 0 });
    }
}
