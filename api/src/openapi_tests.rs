//! Checks `openapi.yaml` against the Rust types, so the spec cannot drift:
//! the routes (both ways), each operation's request, success and error
//! bodies, and for every schema its property names, required list,
//! nullability, JSON types and enum values.
//!
//! The serde side is never restated by hand: each struct gets a fully
//! populated example (every `Option` is `Some`) and a minimal one (every
//! `Option` is `None`), and the test serializes them. The full example gives
//! the property names (recursively); the keys left in the minimal one are the
//! required ones (request types skip `None`s; response types write them as
//! `null`, and those must be `nullable`). For request types, removing each
//! key in turn and deserializing confirms which keys are really optional.

use crate::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const SPEC: &str = include_str!("../openapi.yaml");

fn spec() -> Value {
    serde_yaml_ng::from_str(SPEC).expect("openapi.yaml is not valid YAML")
}

/// A struct's two examples, as JSON, and a way to deserialize JSON into it.
struct Sample {
    name: &'static str,
    full: Value,
    minimal: Value,
    request: bool,
    parses: fn(&Value) -> Result<(), serde_json::Error>,
}

fn parses<T: DeserializeOwned>(v: &Value) -> Result<(), serde_json::Error> {
    serde_json::from_value::<T>(v.clone()).map(drop)
}

fn sample<T: Serialize + DeserializeOwned>(
    name: &'static str,
    request: bool,
    full: T,
    minimal: T,
) -> Sample {
    Sample {
        name,
        full: serde_json::to_value(full).unwrap(),
        minimal: serde_json::to_value(minimal).unwrap(),
        request,
        parses: parses::<T>,
    }
}

fn report_full() -> MemoryReport {
    MemoryReport {
        valid: true,
        invalid_reason: Some("stale".into()),
        strategy: Some(Strategy::Deferred),
        guest: Some(GuestMemoryView::example()),
        host: HostMemoryView::example(),
        timings: BootTimings::example(),
        reclaim: ReclaimView::example(),
    }
}

fn report_minimal() -> MemoryReport {
    MemoryReport {
        valid: false,
        invalid_reason: None,
        strategy: None,
        guest: None,
        host: HostMemoryView { vmm_pss_bytes: None, ..HostMemoryView::example() },
        timings: BootTimings::default(),
        reclaim: ReclaimView::default(),
    }
}

fn samples() -> Vec<Sample> {
    let mut guest_min = GuestMemoryView::example();
    guest_min.init_us = None;
    let mut status_full = InstanceStatus::new("vm0", VmState::Halted);
    status_full.exit_code = Some(-3);
    status_full.failure_reason = Some("reason".into());
    status_full.started_at_unix_ms = Some(1_796_000_000_000);
    let config_full = MachineConfig {
        vcpu_count: 4,
        mem_size_mib: 513,
        smt: true,
        track_dirty_pages: true,
        cpu_template: CpuTemplate::T2,
        huge_pages: HugePages::Size2M,
        memmap_init: Strategy::Parallel,
        memmap_chunk_kib: 128,
        guest_cpl: GuestCpl::Ring3,
        memmap_on_memory: true,
        reclaim: Some(Reclaim::Data),
        reclaim_delay_ms: Some(100),
    };
    let update_full = MachineConfigUpdate {
        vcpu_count: Some(2),
        mem_size_mib: Some(1024),
        smt: Some(false),
        track_dirty_pages: Some(false),
        cpu_template: Some(CpuTemplate::None),
        huge_pages: Some(HugePages::None),
        memmap_init: Some(Strategy::Eager),
        memmap_chunk_kib: Some(4096),
        guest_cpl: Some(GuestCpl::Ring0),
        memmap_on_memory: Some(true),
        reclaim: Some(Reclaim::Off),
        reclaim_delay_ms: Some(0),
    };
    let put_full = MachineConfigPut {
        vcpu_count: 2,
        mem_size_mib: 1024,
        smt: Some(false),
        track_dirty_pages: Some(false),
        cpu_template: Some(CpuTemplate::None),
        huge_pages: Some(HugePages::Size2M),
        memmap_init: Some(Strategy::Eager),
        memmap_chunk_kib: Some(4096),
        guest_cpl: Some(GuestCpl::Ring0),
        memmap_on_memory: Some(true),
        reclaim: Some(Reclaim::Off),
        reclaim_delay_ms: Some(0),
    };
    let put_minimal = MachineConfigPut {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: None,
        track_dirty_pages: None,
        cpu_template: None,
        huge_pages: None,
        memmap_init: None,
        memmap_chunk_kib: None,
        guest_cpl: None,
        memmap_on_memory: None,
        reclaim: None,
        reclaim_delay_ms: None,
    };
    let logger_full = Logger {
        log_path: Some("/tmp/log".into()),
        level: Some(LogLevel::Debug),
        show_level: Some(true),
        show_log_origin: Some(true),
        module: Some("vmm::controller".into()),
    };
    let boot_full = BootSource {
        kernel_image_path: Some("/k".into()),
        boot_args: Some("quiet".into()),
        initrd_path: Some("/i".into()),
    };
    let metrics_config = MetricsConfig { metrics_path: "/tmp/metrics".into() };
    let metrics_full = Metrics {
        vm_exits: VmExitCounts {
            io_in: 1,
            io_out: 2,
            mmio_read: 3,
            mmio_write: 4,
            hlt: 5,
            shutdown: 6,
            system_event: 7,
            failed: 8,
            other: 9,
        },
        api_requests: 10,
        api_errors: 11,
        guest_commands: 12,
        serial_bytes: 13,
        serial_bytes_dropped: 16,
        stdio_lines_dropped: 17,
        guest_protocol_errors: 18,
        log_lines_dropped: 14,
        metrics_lines_dropped: 15,
    };
    let status = |report| GuestMemoryStatus {
        target_mib: 64,
        held_bytes: 64 << 20,
        status: GuestMemoryOutcome::OutOfMemory,
        report,
    };
    vec![
        sample(
            "ApiErrorBody",
            false,
            ApiErrorBody {
                fault_message: "x".into(),
            },
            ApiErrorBody {
                fault_message: "x".into(),
            },
        ),
        sample(
            "InstanceInfo",
            false,
            InstanceInfo::new("vm0", "0.1.0", VmState::Paused),
            InstanceInfo::new("vm0", "0.1.0", VmState::NotStarted),
        ),
        sample(
            "InstanceStatus",
            false,
            status_full,
            InstanceStatus::new("vm0", VmState::NotStarted),
        ),
        sample(
            "FirecrackerVersion",
            false,
            FirecrackerVersion { firecracker_version: "0.1.0".into() },
            FirecrackerVersion { firecracker_version: "0.1.0".into() },
        ),
        sample(
            "FullVmConfiguration",
            false,
            FullVmConfiguration::new(
                boot_full.clone(),
                config_full.clone(),
                Some(logger_full.clone()),
                Some(metrics_config.clone()),
            ),
            FullVmConfiguration::new(BootSource::default(), MachineConfig::default(), None, None),
        ),
        sample("MachineConfig", false, config_full, MachineConfig::default()),
        sample("MachineConfigPut", true, put_full, put_minimal),
        sample("Logger", true, logger_full, Logger::default()),
        sample("MetricsConfig", true, metrics_config.clone(), metrics_config),
        sample(
            "MachineConfigUpdate",
            true,
            update_full,
            MachineConfigUpdate::default(),
        ),
        sample(
            "BootSource",
            true,
            boot_full,
            BootSource::default(),
        ),
        sample(
            "InstanceActionInfo",
            true,
            InstanceActionInfo {
                action_type: ActionType::Shutdown,
            },
            InstanceActionInfo {
                action_type: ActionType::Shutdown,
            },
        ),
        sample(
            "VmStateUpdate",
            true,
            VmStateUpdate {
                state: VmStateTarget::Paused,
            },
            VmStateUpdate {
                state: VmStateTarget::Paused,
            },
        ),
        sample("MemoryReport", false, report_full(), report_minimal()),
        sample("GuestMemoryView", false, GuestMemoryView::example(), guest_min),
        sample(
            "HostMemoryView",
            false,
            HostMemoryView::example(),
            HostMemoryView { vmm_pss_bytes: None, guest_ram_shared_bytes: None, ..HostMemoryView::example() },
        ),
        sample("BootTimings", false, BootTimings::example(), BootTimings::default()),
        sample("ReclaimView", false, ReclaimView::example(), ReclaimView::default()),
        sample(
            "GuestMemoryTarget",
            true,
            GuestMemoryTarget { target_mib: 64 },
            GuestMemoryTarget { target_mib: 64 },
        ),
        sample(
            "GuestMemoryStatus",
            false,
            status(Some(report_full())),
            status(None),
        ),
        sample("Metrics", false, metrics_full.clone(), metrics_full.clone()),
        sample(
            "VmExitCounts",
            false,
            metrics_full.vm_exits.clone(),
            metrics_full.vm_exits,
        ),
    ]
}

/// String enums: schema name and every value serde writes.
fn string_enums() -> Vec<(&'static str, Vec<Value>)> {
    fn all<T: Serialize>(values: &[T]) -> Vec<Value> {
        values
            .iter()
            .map(|v| serde_json::to_value(v).unwrap())
            .collect()
    }
    vec![
        ("VmState", all(&VmState::ALL)),
        ("Strategy", all(&Strategy::ALL)),
        ("Reclaim", all(&Reclaim::ALL)),
        ("ActionType", all(&ActionType::ALL)),
        ("HugePages", all(&HugePages::ALL)),
        ("CpuTemplate", all(&CpuTemplate::ALL)),
        ("LogLevel", all(&LogLevel::ALL)),
        ("VmStateTarget", all(&VmStateTarget::ALL)),
        ("GuestMemoryOutcome", all(&GuestMemoryOutcome::ALL)),
        ("GuestCpl", all(&GuestCpl::ALL)),
    ]
}

/// Follows `$ref`, and `allOf` with a single member (the OpenAPI 3.0 way to
/// put `nullable` or `default` beside a reference).
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        let target = &spec["components"]["schemas"][name];
        assert!(!target.is_null(), "dangling $ref {r}");
        return resolve(spec, target);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        assert_eq!(all.len(), 1, "allOf with more than one member: {schema}");
        return resolve(spec, &all[0]);
    }
    schema
}

/// The schema name a `$ref` (possibly inside a one-member `allOf`) points to.
fn ref_name(schema: &Value) -> Option<&str> {
    let schema = match schema.get("allOf").and_then(Value::as_array) {
        Some(all) if all.len() == 1 => &all[0],
        _ => schema,
    };
    schema
        .get("$ref")?
        .as_str()?
        .strip_prefix("#/components/schemas/")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        // Stricter than JSON Schema on purpose: an integer field (u64) must
        // not be spec'd as a number. Float examples are never whole numbers,
        // and serde_json keeps f64s as f64 anyway.
        "number" => v.is_f64(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => false,
    }
}

/// Checks a non-null value against a schema, recursively; appends problems.
fn check_value(spec: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let mut matching = 0;
        for b in branches {
            let mut sub = Vec::new();
            check_value(spec, b, v, at, &mut sub);
            matching += usize::from(sub.is_empty());
        }
        if matching != 1 {
            errs.push(format!(
                "{at}: {v} matches {matching} oneOf branches, not 1"
            ));
        }
        return;
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        errs.push(format!("{at}: schema has no type"));
        return;
    };
    if !type_matches(ty, v) {
        errs.push(format!("{at}: {v} is not of type {ty}"));
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            errs.push(format!("{at}: {v} not in enum {values:?}"));
        }
    }
    if ty == "object" && v.is_object() {
        let props = &schema["properties"];
        if !props.is_object() {
            errs.push(format!("{at}: object schema without properties"));
            return;
        }
        if schema.get("additionalProperties") != Some(&json!(false)) {
            errs.push(format!("{at}: additionalProperties must be false"));
        }
        let (want, have) = (keys(v), keys(props));
        if want != have {
            errs.push(format!(
                "{at}: serde fields {want:?} but spec properties {have:?}"
            ));
        }
        for (k, child) in v.as_object().unwrap() {
            if child.is_null() || props.get(k).is_none() {
                continue;
            }
            check_value(spec, &props[k], child, &format!("{at}.{k}"), errs);
        }
    }
}

fn check_sample(spec: &Value, s: &Sample, errs: &mut Vec<String>) {
    let name = s.name;
    let schema = &spec["components"]["schemas"][name];
    if schema.is_null() {
        errs.push(format!("{name}: missing from components.schemas"));
        return;
    }
    // Names, types, enums, recursively.
    check_value(spec, schema, &s.full, name, errs);
    assert!(
        !s.full.as_object().unwrap().values().any(Value::is_null),
        "{name}: the full example must fill every field"
    );
    // Required = the keys a minimal value still has.
    let required: BTreeSet<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    let present = keys(&s.minimal);
    if required != present {
        errs.push(format!(
            "{name}: required {required:?} but serde always writes {present:?}"
        ));
    }
    // Nullable = the field is an Option.
    for (k, prop) in schema["properties"].as_object().into_iter().flatten() {
        let nullable = prop.get("nullable") == Some(&json!(true));
        let is_option = s.minimal.get(k).is_none_or(Value::is_null);
        if nullable != is_option {
            errs.push(format!(
                "{name}.{k}: nullable is {nullable} but the field is {}an Option",
                if is_option { "" } else { "not " }
            ));
        }
    }
    // Both examples read back.
    for (which, v) in [("full", &s.full), ("minimal", &s.minimal)] {
        if let Err(e) = (s.parses)(v) {
            errs.push(format!("{name}: {which} example does not deserialize: {e}"));
        }
    }
    // Requests: leaving a key out fails exactly when the key is required.
    if s.request {
        for k in keys(&s.full) {
            let mut v = s.full.clone();
            v.as_object_mut().unwrap().remove(&k);
            let ok = (s.parses)(&v).is_ok();
            if ok == required.contains(&k) {
                errs.push(format!(
                    "{name}: without {k:?} deserializing {}, but the spec says it is {}required",
                    if ok { "works" } else { "fails" },
                    if ok { "" } else { "not " }
                ));
            }
        }
        let mut v = s.full.clone();
        v.as_object_mut()
            .unwrap()
            .insert("no_such_field".into(), json!(1));
        if (s.parses)(&v).is_ok() {
            errs.push(format!("{name}: accepts unknown fields"));
        }
    }
}

fn fail_if_any(errs: Vec<String>) {
    assert!(
        errs.is_empty(),
        "openapi.yaml disagrees with the types:\n  {}",
        errs.join("\n  ")
    );
}

#[test]
fn spec_is_openapi_3() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.0"));
}

#[test]
fn routes_match_both_ways() {
    let spec = spec();
    let mut errs = Vec::new();
    let in_code: BTreeSet<(String, String)> = Endpoint::ALL
        .iter()
        .map(|e| (e.path().to_string(), e.method().as_str().to_lowercase()))
        .collect();
    let mut in_spec = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            in_spec.insert((path.clone(), method.clone()));
        }
    }
    for missing in in_code.difference(&in_spec) {
        errs.push(format!("{missing:?} is served but not in the spec"));
    }
    for extra in in_spec.difference(&in_code) {
        errs.push(format!("{extra:?} is in the spec but not served"));
    }
    fail_if_any(errs);
}

#[test]
fn operations_match_endpoints() {
    let spec = spec();
    let mut errs = Vec::new();
    for e in Endpoint::ALL {
        let op = &spec["paths"][e.path()][e.method().as_str().to_lowercase()];
        if op.is_null() {
            continue; // Reported by routes_match_both_ways.
        }
        // Request body.
        let body = &op["requestBody"];
        match e.request_type() {
            Some(want) => {
                let got = ref_name(&body["content"]["application/json"]["schema"]);
                if got != Some(want) || body["required"] != json!(true) {
                    errs.push(format!(
                        "{e}: request body should be required {want}, is {got:?}"
                    ));
                }
            }
            None if !body.is_null() => errs.push(format!("{e}: takes no body, spec has one")),
            None => {}
        }
        // Statuses.
        let responses = op["responses"].as_object().unwrap();
        let got: BTreeSet<String> = responses.keys().cloned().collect();
        let mut want: BTreeSet<String> = e.error_statuses().iter().map(u16::to_string).collect();
        want.insert(e.success_status().to_string());
        if got != want {
            errs.push(format!("{e}: statuses {got:?}, expected {want:?}"));
        }
        // Success body.
        let ok = &responses
            .get(&e.success_status().to_string())
            .cloned()
            .unwrap_or_default();
        let got = ref_name(&ok["content"]["application/json"]["schema"]);
        if got != e.response_type() {
            errs.push(format!(
                "{e}: success body {got:?}, expected {:?}",
                e.response_type()
            ));
        }
        // Error bodies.
        for status in e.error_statuses() {
            let Some(mut r) = responses.get(&status.to_string()) else {
                continue;
            };
            if let Some(target) = r.get("$ref").and_then(Value::as_str) {
                let name = target.strip_prefix("#/components/responses/").unwrap();
                r = &spec["components"]["responses"][name];
            }
            let got = ref_name(&r["content"]["application/json"]["schema"]);
            if got != Some("ApiErrorBody") {
                errs.push(format!("{e}: {status} body is {got:?}, not ApiErrorBody"));
            }
        }
    }
    fail_if_any(errs);
}

#[test]
fn schemas_match_types() {
    let spec = spec();
    let mut errs = Vec::new();
    let samples = samples();
    for s in &samples {
        check_sample(&spec, s, &mut errs);
    }
    for (name, values) in string_enums() {
        let schema = &spec["components"]["schemas"][name];
        // GuestCpl's string branch is its first oneOf member.
        let schema = schema.get("oneOf").map_or(schema, |b| &b[0]);
        let got = schema["enum"].as_array().cloned().unwrap_or_default();
        if got != values || schema["type"] != json!("string") {
            errs.push(format!(
                "{name}: spec enum {got:?}, serde writes {values:?}"
            ));
        }
    }
    // Every schema in the spec is checked by one of the above.
    let covered: BTreeSet<&str> = samples
        .iter()
        .map(|s| s.name)
        .chain(string_enums().into_iter().map(|(n, _)| n))
        .collect();
    for name in spec["components"]["schemas"].as_object().unwrap().keys() {
        if !covered.contains(name.as_str()) {
            errs.push(format!("schema {name} is not checked against a type"));
        }
    }
    // Every endpoint's body types are among them.
    for e in Endpoint::ALL {
        for t in [e.request_type(), e.response_type()].into_iter().flatten() {
            if !covered.contains(t) {
                errs.push(format!("{e}: {t} has no sample"));
            }
        }
    }
    fail_if_any(errs);
}

#[test]
fn guest_cpl_integer_branch_is_accepted() {
    let spec = spec();
    let ints = spec["components"]["schemas"]["GuestCpl"]["oneOf"][1]["enum"].clone();
    for v in ints.as_array().unwrap() {
        serde_json::from_value::<GuestCpl>(v.clone()).unwrap();
    }
    assert_eq!(ints, json!([0, 3]));
}

#[test]
fn machine_config_defaults_and_limits_match() {
    let spec = spec();
    let props = &spec["components"]["schemas"]["MachineConfig"]["properties"];
    let defaults = serde_json::to_value(MachineConfig::default()).unwrap();
    for (k, v) in defaults.as_object().unwrap() {
        assert_eq!(&props[k]["default"], v, "default of {k}");
    }
    assert_eq!(props["vcpu_count"]["maximum"], json!(MAX_VCPUS));
    assert_eq!(props["mem_size_mib"]["maximum"], json!(MAX_MEM_SIZE_MIB));
    assert_eq!(props["mem_size_mib"]["minimum"], json!(MIN_MEM_SIZE_MIB));
    for schema in ["MachineConfigPut", "MachineConfigUpdate"] {
        let p = &spec["components"]["schemas"][schema]["properties"]["mem_size_mib"];
        assert_eq!((&p["minimum"], &p["maximum"]), (&json!(MIN_MEM_SIZE_MIB), &json!(MAX_MEM_SIZE_MIB)), "{schema}");
    }
    assert_eq!(props["memmap_chunk_kib"]["minimum"], json!(MIN_CHUNK_KIB));
    assert_eq!(props["memmap_chunk_kib"]["maximum"], json!(MAX_CHUNK_KIB));
    let boot = &spec["components"]["schemas"]["BootSource"]["properties"];
    assert_eq!(boot["boot_args"]["maxLength"], json!(MAX_BOOT_ARGS_LEN));
}

/// The rules the server enforces are in the schema: the power-of-two
/// chunk sizes, boot_args' control characters and byte length, the largest
/// memory target.
#[test]
fn enforced_rules_are_in_the_schema() {
    let spec = spec();
    let schemas = &spec["components"]["schemas"];
    let chunks: Vec<Value> = std::iter::successors(Some(MIN_CHUNK_KIB), |k| Some(k * 2))
        .take_while(|&k| k <= MAX_CHUNK_KIB)
        .map(|k| json!(k))
        .collect();
    for schema in ["MachineConfig", "MachineConfigPut", "MachineConfigUpdate"] {
        let e = schemas[schema]["properties"]["memmap_chunk_kib"]["enum"].as_array().unwrap_or_else(|| panic!("{schema}"));
        let ints: Vec<Value> = e.iter().filter(|v| !v.is_null()).cloned().collect();
        assert_eq!(ints, chunks, "{schema}");
        for k in e.iter().filter_map(Value::as_u64) {
            let c = MachineConfig { memmap_chunk_kib: k, ..MachineConfig::default() };
            assert_eq!(c.validate(), Ok(()), "{k} KiB is listed and accepted");
        }
    }
    let bad = MachineConfig { memmap_chunk_kib: 384, ..MachineConfig::default() };
    assert!(bad.validate().is_err(), "a listed rule the server enforces");
    let args = &schemas["BootSource"]["properties"]["boot_args"];
    assert!(args["description"].as_str().unwrap().contains("bytes of UTF-8"));
    let pattern = args["pattern"].as_str().unwrap();
    assert_eq!(pattern, "^[^\\u0000-\\u001F\\u007F-\\u009F]*$");
    // Every character the pattern excludes, the server refuses, and no other.
    for c in ['\u{0}', '\u{1f}', '\u{7f}', '\u{9f}', '\n'] {
        let b = BootSource { boot_args: Some(format!("a{c}b")), ..BootSource::default() };
        assert!(b.validate().is_err(), "{c:?}");
    }
    for c in [' ', '~', '\u{a0}', 'é'] {
        let b = BootSource { boot_args: Some(format!("a{c}b")), ..BootSource::default() };
        assert!(b.validate().is_ok(), "{c:?}");
    }
    let target = &schemas["GuestMemoryTarget"]["properties"]["target_mib"];
    assert_eq!(target["maximum"], json!(MAX_MEM_SIZE_MIB));
}

/// Keys that scripts read from `GET /memory`; renaming one breaks them.
#[test]
fn memory_report_has_the_keys_scripts_use() {
    let spec = spec();
    let report = serde_json::to_value(report_full()).unwrap();
    for dotted in [
        "strategy",
        "guest.memmap_bytes_reserved",
        "guest.memmap_bytes_initialized",
        "guest.allocated_bytes",
        "host.memmap_resident_bytes",
        "host.guest_ram_resident_bytes",
        "timings",
    ] {
        let mut v = &report;
        let mut schema = &spec["components"]["schemas"]["MemoryReport"];
        for part in dotted.split('.') {
            v = &v[part];
            schema = &resolve(&spec, schema)["properties"][part];
            assert!(!schema.is_null(), "spec lacks {dotted}");
        }
        assert!(!v.is_null(), "report lacks {dotted}");
    }
}
