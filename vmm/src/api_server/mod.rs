//! The control API's HTTP side: the server ([`server`]), one request's
//! way through it ([`http`]), how connections share the server
//! ([`connections`]), and the socket file ([`socket`]). The API's
//! types live in the `api` crate; only the controller acts on requests.

pub mod connections;
pub mod http;
pub mod server;
pub mod socket;

pub use connections::ConnectionStats;
pub use server::{bind, start, ApiServer, ApiServerError};
