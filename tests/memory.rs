//! Memory-manager integration tests: each memmap strategy boots a real guest,
//! and the guest's own figures are checked against the host's `mincore()`
//! measurement and against what the strategy promises.

mod common;

use common::vmm;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 2 * MIB;
/// Bytes of memmap per chunk of memory (2 MiB / 4 KiB * 64).
const CHUNK_MEMMAP: u64 = 32 << 10;

/// Boots with `--report json` and the extra flags; returns the report.
fn report(args: &[&str]) -> Value {
    let mut a = vec!["run", "--serial", "none", "--report", "json"];
    a.extend_from_slice(args);
    let o = vmm(&a);
    o.assert_code(0);
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {o}"))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {v}"))
}

#[test]
fn eager_and_parallel_initialize_every_struct_page_before_ready() {
    for (strategy, vcpus) in [("eager", "1"), ("parallel", "2")] {
        let r = report(&["--memmap-init", strategy, "--vcpus", vcpus]);
        assert_eq!(r["valid"], true, "{r}");
        assert_eq!(r["strategy"], strategy);
        assert_eq!(u(&r, "/guest/pages_initialized"), u(&r, "/guest/pages_total"), "{strategy}: {r}");
        assert_eq!(r["guest"]["fully_initialized"], true);
        assert_eq!(r["guest"]["grow_check_on"], false);
        let reserved = u(&r, "/guest/memmap_bytes_reserved");
        let initialized = u(&r, "/guest/memmap_bytes_initialized");
        assert!(reserved > 31 * MIB && initialized + 64 * 1024 >= reserved, "{strategy}: {r}");
        // The host backs the whole memmap: ~32 MiB for a 2 GiB guest.
        let resident = u(&r, "/host/memmap_resident_bytes");
        assert!(resident > 31 * MIB, "{strategy}: {r}");
        assert_eq!(u(&r, "/guest/cpus"), vcpus.parse::<u64>().unwrap(), "{strategy}: {r}");
    }
}

#[test]
fn ondemand_idles_with_one_chunk_of_memmap() {
    let r = report(&["--memmap-init", "ondemand"]);
    assert_eq!(r["valid"], true, "{r}");
    assert_eq!(u(&r, "/guest/chunks_initialized"), 1, "{r}");
    assert_eq!(u(&r, "/guest/memmap_bytes_initialized"), CHUNK_MEMMAP, "{r}");
    assert!(u(&r, "/host/memmap_resident_bytes") <= MIB / 2, "{r}");
    assert_eq!(r["guest"]["grow_check_on"], true);
}

#[test]
fn ondemand_initializes_x_over_64_plus_one_chunk_and_the_host_agrees() {
    for alloc in [64u64, 256] {
        let r = report(&["--memmap-init", "ondemand", "--alloc-mib", &alloc.to_string()]);
        assert_eq!(r["valid"], true, "{r}");
        assert_eq!(u(&r, "/guest/allocated_bytes"), alloc * MIB);
        let initialized = u(&r, "/guest/memmap_bytes_initialized");
        assert!(initialized <= alloc * MIB / 64 + CHUNK_MEMMAP, "{alloc} MiB: {initialized} bytes initialized");
        // The host-measured resident memmap agrees with the guest's count to
        // within one host page per chunk.
        let resident = u(&r, "/host/memmap_resident_bytes");
        let chunks = u(&r, "/guest/chunks_initialized");
        assert!(resident.abs_diff(initialized) <= chunks * 4096, "{resident} vs {initialized}, {chunks} chunks");
        // Every allocated page was written: the host backs it.
        assert!(u(&r, "/host/guest_ram_resident_bytes") >= alloc * MIB, "{r}");
    }
}

#[test]
fn deferred_initializes_one_section_before_ready_and_the_rest_in_the_background() {
    // One vCPU: the background work runs between commands. The report is
    // taken right at ready, so less than everything is initialized.
    let r = report(&["--memmap-init", "deferred"]);
    assert_eq!(r["valid"], true, "{r}");
    let total = u(&r, "/guest/pages_total");
    let init = u(&r, "/guest/pages_initialized");
    assert!(init >= (128 * MIB / 4096) / 2 && init < total, "{init} of {total}");
    // After a large allocation everything up to it is initialized, and the
    // background work finishes while the guest idles between commands.
    let r = report(&["--memmap-init", "deferred", "--vcpus", "2", "--alloc-mib", "64"]);
    assert_eq!(r["valid"], true, "{r}");
    assert_eq!(u(&r, "/guest/cpus"), 2, "{r}");
}

#[test]
fn memmap_on_memory_and_small_chunks_work() {
    let r = report(&["--memmap-init", "ondemand", "--memmap-on-memory", "--alloc-mib", "32"]);
    assert_eq!(r["valid"], true, "{r}");
    assert_eq!(r["guest"]["memmap_on_memory"], true);
    assert!(r["guest"]["memmap_bytes_reserved"].as_u64().unwrap() > 31 * MIB);
    let r = report(&["--memmap-init", "ondemand", "--memmap-chunk-kib", "128", "--alloc-mib", "16"]);
    assert_eq!(u(&r, "/guest/chunk_bytes"), 128 << 10);
    assert!(u(&r, "/guest/memmap_bytes_initialized") <= 16 * MIB / 64 + (2 << 10), "{r}");
}

#[test]
fn the_same_workload_allocates_the_same_under_every_strategy() {
    for (s, vcpus) in [("eager", "1"), ("parallel", "2"), ("deferred", "1"), ("ondemand", "1")] {
        let r = report(&["--mem-mib", "512", "--memmap-init", s, "--vcpus", vcpus, "--alloc-mib", "100"]);
        assert_eq!(u(&r, "/guest/allocated_bytes"), 100 * MIB, "{s}: {r}");
        assert_eq!(u(&r, "/guest/workload_bytes"), 100 * MIB, "{s}: {r}");
        assert_eq!(u(&r, "/guest/alloc_failures"), 0, "{s}: {r}");
    }
}

#[test]
fn an_allocation_beyond_guest_ram_reports_out_of_memory() {
    let o = vmm(&["run", "--serial", "none", "--mem-mib", "128", "--alloc-mib", "128", "--report", "json"]);
    o.assert_code(0);
    assert!(o.stderr.contains("OutOfMemory"), "{o}");
    let r: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(r["valid"], true, "{r}");
    assert!(u(&r, "/guest/alloc_failures") >= 1, "{r}");
    // What could be allocated stays allocated (most of the guest).
    assert!(u(&r, "/guest/allocated_bytes") > 100 * MIB, "{r}");
}

#[test]
fn a_corrupt_stats_block_is_reported_invalid_not_trusted() {
    let r = report(&["--mem-mib", "256", "--cmdline", "workload=corrupt-stats"]);
    assert_eq!(r["valid"], false, "{r}");
    assert!(r["invalid_reason"].as_str().unwrap().contains("guest report invalid"), "{r}");
    assert!(r["guest"].is_null());
    // The host view is still measured.
    assert_eq!(u(&r, "/host/guest_ram_bytes"), 256 * MIB);

    let r = report(&["--mem-mib", "256", "--cmdline", "workload=corrupt-stats-addr"]);
    assert_eq!(r["valid"], false, "{r}");
    assert!(r["invalid_reason"].as_str().unwrap().contains("outside guest RAM"), "{r}");
}

#[test]
fn kvm_registers_guest_ram_block_by_block_as_the_guest_uses_it() {
    const BLOCK: u64 = guest_abi::MEMORY_BLOCK_SIZE;
    assert_eq!(BLOCK, CHUNK, "the guest onlines memory chunk by chunk");
    let r = report(&["--memmap-init", "ondemand"]);
    let idle = u(&r, "/host/kvm_registered_bytes");
    // The boot data, the kernel image (about 4.6 MiB with its .bss), the
    // first chunk and its memmap: a few MiB of the 2 GiB, in whole blocks.
    assert!(idle.is_multiple_of(BLOCK) && (4 * MIB..=16 * MIB).contains(&idle), "an idle guest registers what it uses: {r}");
    assert_eq!(u(&r, "/host/guest_ram_bytes"), 2048 * MIB);
    let r = report(&["--memmap-init", "ondemand", "--alloc-mib", "256"]);
    let reg = u(&r, "/host/kvm_registered_bytes");
    // Runs grow with what is registered (a quarter of it, up to 128 MiB),
    // so a growing guest registers at most about a third more than it uses.
    assert!((256 * MIB..=256 * MIB + 256 * MIB / 3 + 2 * idle).contains(&reg), "256 MiB allocated: {reg} registered (idle: {idle})");
    for args in [&["--memmap-init", "eager"][..], &["--memmap-init", "ondemand", "--register-all-memory"]] {
        let r = report(args);
        assert_eq!(u(&r, "/host/kvm_registered_bytes"), 2048 * MIB, "{args:?}: {r}");
    }
}

#[test]
fn using_ram_the_guest_never_onlined_stops_the_vm_with_a_clear_error() {
    let o = vmm(&["run", "--serial", "none", "--cmdline", "workload=touch-offline"]);
    o.assert_code(1);
    assert!(o.stderr.contains("before onlining its block"), "{o}");
    assert!(o.stderr.contains("RAM at 0x7ffff000"), "names the address (the last page of 2 GiB): {o}");
}

#[test]
fn the_report_has_the_documented_keys_and_timings() {
    let r = report(&["--mem-mib", "256"]);
    for key in [
        "/strategy",
        "/guest/memmap_bytes_reserved",
        "/guest/memmap_bytes_initialized",
        "/guest/allocated_bytes",
        "/host/memmap_resident_bytes",
        "/host/guest_ram_resident_bytes",
        "/timings/guest_ready",
    ] {
        assert!(r.pointer(key).is_some(), "{key} missing: {r}");
    }
    let t = &r["timings"];
    let created = t["vm_created"].as_f64().unwrap();
    let ready = t["guest_ready"].as_f64().unwrap();
    assert!(0.0 < created && created < ready, "{t}");
}

#[test]
fn a_table_report_is_readable() {
    let o = vmm(&["run", "--serial", "none", "--mem-mib", "256", "--alloc-mib", "8"]);
    o.assert_code(0);
    assert!(o.stdout.contains("memmap_resident_bytes"), "{o}");
    assert!(o.stdout.contains("MiB"), "{o}");
    let _ = CHUNK;
}

#[test]
fn the_allocator_works_after_its_jump_sites_are_patched() {
    // Fill a small guest so every chunk is initialized, free it all, then run
    // alloc/free pairs: the grow check's jump sites are NOPs by then, and the
    // report says so.
    let mut a = vec!["run", "--serial", "none", "--report", "json", "--mem-mib", "256", "--memmap-init", "ondemand"];
    a.extend_from_slice(&["--alloc-mib", "250", "--then-target-mib", "0", "--bench-alloc-free", "100000"]);
    let o = vmm(&a);
    o.assert_code(0);
    let lines: Vec<Value> = o.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {o}"))).collect();
    let report = lines.iter().find(|v| v.get("guest").is_some()).unwrap_or_else(|| panic!("no report: {o}"));
    let bench = &lines.iter().find_map(|v| v.get("bench_alloc_free")).unwrap_or_else(|| panic!("no bench: {o}"));
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["guest"]["fully_initialized"], true, "{report}");
    assert_eq!(report["guest"]["grow_check_on"], false, "{report}");
    assert_eq!(report["guest"]["jump_sites_patched"], true, "{report}");
    assert_eq!(u(report, "/guest/pages_allocated"), 0, "the workload freed everything: {report}");
    assert_eq!((bench["ok"].as_bool(), bench["jump_sites_patched"].as_bool()), (Some(true), Some(true)), "{bench}");
    assert_eq!(u(bench, "/pairs"), 100_000);
}

/// Runs `vmm ctl --api-sock SOCK ARGS`; returns its JSON answer.
fn ctl(sock: &std::path::Path, args: &[&str]) -> Value {
    let mut a = vec!["ctl", "--api-sock", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    let o = vmm(&a);
    o.assert_code(0);
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {o}"))
}

/// Polls `GET /memory` until `done` holds for the report (liveness deadline
/// 20 s); returns that report.
fn memory_until(sock: &std::path::Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let r = ctl(sock, &["memory"]);
        if done(&r) {
            return r;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{what} did not happen within 20 s: {r}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn freed_memory_goes_back_to_the_host_as_far_as_the_reclaim_mode_says() {
    const HELD: u64 = 256 * MIB;
    // `full` twice: with the default reserve (4 MiB kept initialized), and
    // with none, which must come back to the idle registration exactly.
    for (mode, reserve) in [("full", None), ("full", Some("0")), ("data", None), ("off", None)] {
        let mut args = vec!["run", "--mem-mib", "512", "--serial", "none", "--reclaim", mode, "--reclaim-delay-ms", "300"];
        let cmdline = reserve.map(|r| format!("reclaim_reserve={r}"));
        if let Some(c) = &cmdline {
            args.extend(["--cmdline", c.as_str()]);
        }
        let name = format!("reclaim-{mode}-{}", reserve.unwrap_or("default"));
        let vm = common::Served::start(&name, "api.sock", &args);
        let sock = vm.sock.as_path();
        let idle = memory_until(sock, "guest ready", |r| r["timings"]["guest_ready"].is_number() && r["valid"] == true);
        assert_eq!(idle["reclaim"]["mode"], mode, "{idle}");

        // Hold 256 MiB (every page written), then free it all.
        assert_eq!(u(&ctl(sock, &["set-memory", "256"]), "/held_bytes"), HELD);
        let peak = ctl(sock, &["memory"]);
        let peak_ram = u(&peak, "/host/guest_ram_resident_bytes");
        let peak_memmap = u(&peak, "/host/memmap_resident_bytes");
        let peak_reg = u(&peak, "/host/kvm_registered_bytes");
        assert!(peak_ram >= HELD && peak_memmap >= HELD / 64 && peak_reg >= HELD, "{mode}: {peak}");
        assert_eq!(u(&ctl(sock, &["set-memory", "0"]), "/held_bytes"), 0);

        let r = match mode {
            // Data, memmap and KVM blocks all go back.
            // (The memslots are deleted a moment after the memmap is
            // discarded, so wait for both.)
            // The guest publishes its own counters (chunks de-initialized)
            // after the VMM has acted on its report, so wait for those too.
            "full" => memory_until(sock, "full reclaim", |r| {
                r["reclaim"]["events"].as_u64() >= Some(1)
                    && u(r, "/reclaim/chunks_deinitialized") >= HELD / CHUNK / 2
                    && u(r, "/host/memmap_resident_bytes") <= 4 * CHUNK_MEMMAP
                    && u(r, "/host/kvm_registered_bytes") < peak_reg / 4
                    && (reserve.is_none() || u(r, "/host/kvm_registered_bytes") <= u(&idle, "/host/kvm_registered_bytes"))
            }),
            // Data pages go back; the memmap and the registration stay.
            "data" => memory_until(sock, "data reclaim", |r| {
                r["reclaim"]["events"].as_u64() >= Some(1) && u(r, "/host/guest_ram_resident_bytes") < peak_ram / 2
            }),
            // Nothing goes back: give the guest several reclaim delays to
            // (wrongly) report, then check that everything is still there.
            _ => {
                std::thread::sleep(std::time::Duration::from_millis(2000));
                ctl(sock, &["memory"])
            }
        };
        assert_eq!(r["valid"], true, "{mode}: {r}");
        assert_eq!(u(&r, "/reclaim/ranges_rejected"), 0, "{mode}: {r}");
        let ram = u(&r, "/host/guest_ram_resident_bytes");
        let memmap = u(&r, "/host/memmap_resident_bytes");
        let reg = u(&r, "/host/kvm_registered_bytes");
        match mode {
            "full" => {
                // Back to the idle footprint + 1 MiB or less.
                let idle_ram = u(&idle, "/host/guest_ram_resident_bytes");
                assert!(ram <= idle_ram + MIB, "{mode}: {ram} resident, idle {idle_ram}: {r}");
                assert!(reg < peak_reg / 4, "{mode}: {reg} of {peak_reg} registered: {r}");
                assert!(u(&r, "/reclaim/chunks_deinitialized") >= HELD / CHUNK / 2, "{mode}: {r}");
                assert!(u(&r, "/reclaim/memslots_unregistered") >= 1, "{mode}: {r}");
                assert!(u(&r, "/reclaim/discarded_bytes") >= HELD, "{mode}: {r}");
                // KVM: the idle registration, plus (with the default 4 MiB
                // reserve) the runs holding the reserve's chunks: at most two
                // runs of 2 MiB this low in memory. The runs that held only
                // the memmap of the freed memory go too.
                let (idle_reg, idle_memmap) = (u(&idle, "/host/kvm_registered_bytes"), u(&idle, "/host/memmap_resident_bytes"));
                if reserve.is_some() {
                    assert_eq!((reg, memmap), (idle_reg, idle_memmap), "{mode} without a reserve: {r}");
                } else {
                    assert!(reg <= idle_reg + 4 * MIB, "{mode}: {reg} registered, idle {idle_reg}: {r}");
                }
            }
            "data" => {
                // What stays is the memmap (it lives in guest RAM) and a
                // little more.
                assert!(ram <= peak_memmap + 2 * MIB, "{mode}: {ram} resident: {r}");
                assert_eq!(memmap, peak_memmap, "{mode}: {r}");
                assert_eq!(reg, peak_reg, "{mode}: {r}");
                assert_eq!(u(&r, "/reclaim/chunks_deinitialized"), 0, "{mode}: {r}");
                assert_eq!(u(&r, "/reclaim/memslots_unregistered"), 0, "{mode}: {r}");
                assert!(u(&r, "/reclaim/discarded_bytes") >= HELD, "{mode}: {r}");
            }
            _ => {
                assert!(ram >= peak_ram, "{mode}: {r}");
                assert_eq!((memmap, reg), (peak_memmap, peak_reg), "{mode}: {r}");
                assert_eq!(u(&r, "/reclaim/events"), 0, "{mode}: {r}");
                assert_eq!(u(&r, "/reclaim/discarded_bytes"), 0, "{mode}: {r}");
            }
        }

        if mode == "full" && reserve.is_none() {
            // The reclaimed chunks are initialized and registered again on
            // the next allocation, and the report stays valid.
            assert_eq!(u(&ctl(sock, &["set-memory", "256"]), "/held_bytes"), HELD);
            let again = ctl(sock, &["memory"]);
            assert_eq!(again["valid"], true, "{again}");
            assert!(u(&again, "/host/guest_ram_resident_bytes") >= HELD, "{again}");
            assert!(u(&again, "/host/memmap_resident_bytes") >= HELD / 64, "{again}");
            assert!(u(&again, "/host/kvm_registered_bytes") >= HELD, "{again}");
            assert_eq!(u(&again, "/guest/allocated_bytes"), HELD, "{again}");
        }
    }
}

/// The host's view of the guest kernel's pages in one VM process, from
/// `/proc/PID/smaps`: the mappings of `file` inside guest RAM (the run of
/// adjacent mappings at least `ram` bytes long).
#[derive(Debug, Default)]
struct KernelPages {
    size: u64,
    rss: u64,
    anonymous: u64,
    shared_clean: u64,
}

fn kernel_pages(pid: u32, file: &std::path::Path, ram: u64) -> KernelPages {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    // (start, end, path, fields) per mapping.
    let mut maps: Vec<(u64, u64, String, std::collections::HashMap<String, u64>)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
            maps.push((a, b, words.nth(4).unwrap_or("").to_string(), Default::default()));
        } else if let (Some(key), Some(kb), Some(m)) = (first.strip_suffix(':'), words.next(), maps.last_mut()) {
            m.3.insert(key.to_string(), kb.parse::<u64>().unwrap_or(0) << 10);
        }
    }
    // Guest RAM: a run of adjacent mappings spanning at least `ram`.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if maps[r.1].1 == m.0 => r.1 = i,
            _ => runs.push((i, i)),
        }
    }
    let &(lo, hi) = runs.iter().find(|r| maps[r.1].1 - maps[r.0].0 >= ram).expect("guest RAM in smaps");
    let mut k = KernelPages::default();
    for m in &maps[lo..=hi] {
        if std::path::Path::new(&m.2) == file {
            k.size += m.1 - m.0;
            k.rss += m.3["Rss"];
            k.anonymous += m.3["Anonymous"];
            k.shared_clean += m.3["Shared_Clean"];
        }
    }
    k
}

#[test]
fn vms_share_the_kernel_pages_mapped_from_the_binary_and_copy_a_kernel_file() {
    const MAPPED: u64 = 64 << 10;
    let kernel = std::path::PathBuf::from(common::embedded_kernel_path()).canonicalize().unwrap();
    let embedded = ["run", "--mem-mib", "2048", "--serial", "none"];
    let vms = [
        common::Served::start("share-a", "api.sock", &embedded),
        common::Served::start("share-b", "api.sock", &embedded),
        common::Served::start("share-file", "api.sock", &["run", "--mem-mib", "2048", "--serial", "none", "--kernel", kernel.to_str().unwrap()]),
    ];
    let reports: Vec<Value> = vms
        .iter()
        .map(|vm| memory_until(&vm.sock, "guest ready", |r| r["timings"]["guest_ready"].is_number() && r["valid"] == true))
        .collect();
    // Two VMs of the built-in guest: the pages it runs from are the
    // binary's page-cache pages, mapped in both processes (copied pages
    // would be anonymous and private to each).
    for (vm, report) in vms[..2].iter().zip(&reports) {
        let exe = std::fs::read_link(format!("/proc/{}/exe", vm.child.id())).unwrap();
        let k = kernel_pages(vm.child.id(), &exe, 2048 * MIB);
        assert!(k.size >= MAPPED, "the kernel's segments are mapped from {exe:?}: {k:?}");
        assert!(k.rss - k.anonymous >= MAPPED, "the guest uses the file's pages, not copies: {k:?}");
        assert!(k.shared_clean >= MAPPED, "shared with the other VM: {k:?}");
        // The report says how much of resident guest RAM is those shared
        // pages (an idle guest writes no more of them after Ready).
        let shared = report["host"]["guest_ram_shared_bytes"].as_u64().unwrap();
        assert_eq!(shared, k.rss - k.anonymous, "{report}");
        assert!(shared < report["host"]["guest_ram_resident_bytes"].as_u64().unwrap(), "{report}");
    }
    // A --kernel file is copied: a new build copied over the path must not
    // change (or, truncated, fault) the kernel of a running VM.
    let vm = &vms[2];
    let k = kernel_pages(vm.child.id(), &kernel, 2048 * MIB);
    assert_eq!(k.size, 0, "nothing of {kernel:?} is mapped: {k:?}");
    assert_eq!(reports[2]["host"]["guest_ram_shared_bytes"], 0, "{}", reports[2]);
}
