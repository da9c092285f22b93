//! run-engine's domain crate.
pub mod connection;
pub use connection::{
    ConnectError, DEFAULT_DATABASE_URL, SQLITE_BUSY_TIMEOUT, connect, redact_url,
};
