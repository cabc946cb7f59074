//! The control API's HTTP side: the server thread ([`server`]), one request's
//! way through it ([`http`]), and the socket file ([`socket`]). The API's
//! types live in the `api` crate; only the controller acts on requests.

pub mod http;
pub mod server;
pub mod socket;

pub use server::{start, ApiServer, ApiServerError};
