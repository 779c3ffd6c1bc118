//! Shared vocabulary of the sensor: the strict configuration, the clouds' endpoints, the status model,
//! the record envelope sent to the backend, and the process-wide counters.
//!
//! Invariant: the only network I/O here is reading an answer's body with a cap ([`http::read_capped`]);
//! the only file access is reading the configuration and checking the permissions of the files it names.

pub mod cloud;
pub mod config;
pub mod counters;
pub mod envelope;
pub mod http;
pub mod status;
pub mod timefmt;
pub mod tls;

pub use cloud::Cloud;
pub use config::{Config, ConfigError};

/// The sensor's version, as reported in `User-Agent`, status and heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The five content types of the Management Activity API. Invariant: spelled exactly as the API does.
pub const CONTENT_TYPES: [&str; 5] = [
    "Audit.AzureActiveDirectory",
    "Audit.Exchange",
    "Audit.SharePoint",
    "Audit.General",
    "DLP.All",
];

/// The `User-Agent` every request of the sensor carries: `m365-sensor/<version> (<os>; <arch>)`.
pub fn user_agent() -> String {
    format!(
        "m365-sensor/{VERSION} ({}; {})",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// One line describing `e` and its whole source chain (`a: b: c`), redacted of credentials. Transport
/// errors hide their cause (a TLS certificate problem, a refused connection) in the chain.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    status::redact(&msg)
}
