//! Property tests of request parsing, on the inputs the `api_request` fuzz
//! target feeds it (fuzz/): any method, path and body gets a request or an
//! error status, never a panic; well-formed bodies round-trip.

use api::{ActionType, ApiRequest, Endpoint, InstanceActionInfo, VmStateTarget, VmStateUpdate};
use proptest::prelude::*;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "get"];
const PATHS: [&str; 12] = [
    "/", "/vm/status", "/version", "/vm/config", "/machine-config", "/logger", "/boot-source", "/actions", "/vm",
    "/memory", "/guest/memory", "/metrics",
];

/// A body: JSON-looking text built from the API's own words, or raw bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        "[ {}\\[\\]\":,0-9a-z_A-Z.-]{0,120}".prop_map(String::into_bytes),
        (
            prop::sample::select(vec![
                "action_type", "state", "target_mib", "vcpu_count", "mem_size_mib", "kernel_image_path",
                "boot_args", "log_path", "level", "metrics_path", "memmap_chunk_kib",
            ]),
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                "\"[a-zA-Z/ ]{0,20}\"",
                Just("null".to_string()),
                Just("[]".to_string()),
                Just("{}".to_string()),
            ],
        )
            .prop_map(|(k, v)| format!("{{\"{k}\": {v}}}").into_bytes()),
    ]
}

proptest! {
    #[test]
    fn any_request_gets_a_request_or_an_error_status(
        method in prop::sample::select(METHODS.to_vec()),
        path in prop_oneof![prop::sample::select(PATHS.to_vec()).prop_map(String::from), "/[ -~]{0,40}"],
        body in body(),
    ) {
        match ApiRequest::parse(method, &path, &body) {
            Ok(req) => prop_assert_eq!(Some(req.endpoint()), Endpoint::find(method, &path).ok()),
            Err(e) => prop_assert!((400..600).contains(&e.status()), "{:?}", e),
        }
    }

    #[test]
    fn actions_and_vm_states_round_trip(a in prop::sample::select(ActionType::ALL.to_vec()),
                                        s in prop::sample::select(VmStateTarget::ALL.to_vec()),
                                        spaces in " {0,3}") {
        let action = InstanceActionInfo { action_type: a };
        let body = format!("{spaces}{}{spaces}", serde_json::to_string(&action).unwrap());
        prop_assert_eq!(ApiRequest::parse("PUT", "/actions", body.as_bytes()).ok(), Some(ApiRequest::PutActions(action)));
        let state = VmStateUpdate { state: s };
        let body = serde_json::to_vec(&state).unwrap();
        prop_assert_eq!(ApiRequest::parse("PATCH", "/vm", &body).ok(), Some(ApiRequest::PatchVm(state)));
    }

    #[test]
    fn a_memory_target_round_trips(mib in 0u64..(1 << 20)) {
        let body = format!("{{\"target_mib\": {mib}}}");
        match ApiRequest::parse("PUT", "/guest/memory", body.as_bytes()) {
            Ok(ApiRequest::PutGuestMemory(t)) => prop_assert_eq!(t.target_mib, mib),
            other => prop_assert!(false, "{:?}", other),
        }
    }
}
