//! Builds the guest kernel for `x86_64-unknown-none` and hands its path to
//! the `vmm` crate, which embeds it as the default guest (`GUEST_KERNEL_PATH`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernel_dir = manifest_dir.join("../guest-kernel").canonicalize().unwrap();
    let abi_dir = manifest_dir.join("../guest-abi").canonicalize().unwrap();
    let target_dir = PathBuf::from(env::var("OUT_DIR").unwrap()).join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    // Run from the kernel's directory so its .cargo/config.toml (linker
    // script, static relocation model) applies.
    cmd.current_dir(&kernel_dir)
        .args(["build", "--release", "--target", "x86_64-unknown-none", "--bin", "guest-kernel"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The host build's flags and wrappers are not for the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo to build the guest kernel");
    assert!(status.success(), "building the guest kernel failed (see the errors above)");

    let kernel = target_dir.join("x86_64-unknown-none/release/guest-kernel");
    println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", kernel.display());
    for path in ["src", "Cargo.toml", "Cargo.lock", "linker.ld", "build.rs", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", kernel_dir.join(path).display());
    }
    println!("cargo:rerun-if-changed={}", abi_dir.join("src").display());
}
