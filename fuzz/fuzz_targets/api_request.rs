//! Fuzz target: API request parsing. The input is a method selector byte,
//! a path (up to the first NUL) and a body; [`api::ApiRequest::parse`] must
//! answer every one with a request or an error status, never a panic, and a
//! request it accepts names the endpoint that was asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "get"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (path, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else { return };
    match api::ApiRequest::parse(method, path, body) {
        Ok(req) => assert_eq!(Some(req.endpoint()), api::Endpoint::find(method, path).ok()),
        Err(e) => assert!((400..600).contains(&e.status()), "{e:?}"),
    }
});
