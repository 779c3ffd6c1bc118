//! A Microsoft 365 simulator for tests: Entra ID's token endpoint and the Office 365 Management Activity
//! API on one loopback HTTPS port, with fault injection and ground truth.
//!
//! Promises:
//! - It never contacts another host and binds only where it is told (loopback in practice). The server
//!   certificate is issued for `127.0.0.1` and `localhost` by a CA generated at start-up
//!   ([`SimHandle::ca_pem`]).
//! - Content is deterministic for a given scenario seed (record Ids, field values and blob layout; the
//!   timestamps follow the clock).
//! - The API behaves like the real one where a collector can tell (error codes and bodies, the listing
//!   window rules, `NextPageUri` pagination, blob expiry), as `docs/specs/sim-and-receiver.md` and the
//!   API facts describe.
//! - `GET /_sim/truth` ([`Truth`]) lists, at the time of the request, every record Id a correct collector
//!   can deliver, with the SHA-256 of every byte variant it may have received, and the Ids and contentIds
//!   it cannot get (expired, malformed, oversized blobs).
//! - Counters ([`Stats`]) record every token and API request, so tests can assert on collector
//!   behaviour (PublisherIdentifier, window errors, start calls, re-fetches).
//!
//! Control endpoints (no authentication, same port): `GET /_sim/truth`, `GET /_sim/stats`,
//! `POST /_sim/generation` ([`GenerationRequest`]), `POST /_sim/faults` ([`FaultsRequest`]),
//! `POST /_sim/tenant` ([`TenantPatch`]); the POSTs answer 204, or 404 for an unknown tenant.

pub mod api;
mod content;
pub mod entra;
pub mod sample;
pub mod scenario;
mod server;
mod state;
pub mod truth;

pub use api::{parse_api_time, validate_window, WindowError};
pub use entra::TokenError;
pub use scenario::{Cloud, Faults, GenerateTenants, Scenario, TenantSpec, ALL_CONTENT_TYPES};
pub use server::{start, FaultsRequest, GenerationRequest, SimHandle, TenantPatch};
pub use truth::{Stats, TenantStats, TenantTruth, Truth};

/// Errors starting or controlling the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario is invalid or could not be read.
    #[error("scenario: {0}")]
    Scenario(String),
    /// No tenant with that id.
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    /// Binding the socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(#[from] sensor_testkit::TestkitError),
}

#[cfg(test)]
mod tests;
