//! `m365-sensor enroll`: puts the device into service with the backend. The configuration file is read
//! leniently (a device that is not enrolled yet has no valid backend credential): only `state_dir`,
//! `backend.url`, `backend.ca_file` and `network.proxy` are taken from it. Invariant: on any failure
//! nothing was installed (see `sensor_control::client::enroll_device`) and the exit code is 1.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sensor_control::client::{enroll_device, EnrollOptions};

/// The command line of `enroll`.
#[derive(clap::Args)]
pub struct Args {
    /// The backend's base URL (default: `backend.url` of the configuration file).
    #[arg(long)]
    pub backend: Option<String>,
    /// The enrolment token (prefer --token-file: a command line is visible to other users).
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the enrolment token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Configuration file (for state_dir, network.proxy, backend.url and backend.ca_file); optional.
    #[arg(long, default_value = crate::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Extra trust anchors (PEM) for the backend's server certificate (default: backend.ca_file). The
    /// anchor that verifies the backend now is pinned for it from then on.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Enrol again although the device already has an identity.
    #[arg(long)]
    pub force: bool,
}

/// What the configuration file contributes.
#[derive(Default)]
struct FromFile {
    state_dir: Option<PathBuf>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    proxy: Option<String>,
}

fn read_file(path: &Path) -> Result<FromFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FromFile::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: toml::Value =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let s = |p: &[&str]| {
        let mut cur = &v;
        for k in p {
            cur = cur.get(k)?;
        }
        cur.as_str().map(str::to_string)
    };
    Ok(FromFile {
        state_dir: s(&["state_dir"]).map(PathBuf::from),
        url: s(&["backend", "url"]),
        ca_file: s(&["backend", "ca_file"]).map(PathBuf::from),
        proxy: s(&["network", "proxy"]),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "m365-sensor".to_string())
}

/// Runs the enrolment; exit code 0 when enrolled, 1 when not.
pub async fn run(a: Args) -> Result<i32> {
    let file = read_file(&a.config)?;
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the enrolment token from {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            anyhow::bail!("give the enrolment token with --token-file FILE (or --token TOKEN)")
        }
    };
    if token.is_empty() {
        anyhow::bail!("the enrolment token is empty");
    }
    let Some(backend) = a.backend.or(file.url) else {
        anyhow::bail!(
            "no backend: pass --backend https://... or set backend.url in {}",
            a.config.display()
        );
    };
    let state_dir = file
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/m365-sensor"));
    let ca_file = a.ca_file.or(file.ca_file);
    let host = hostname();
    let opts = EnrollOptions {
        backend_url: &backend,
        token: &token,
        state_dir: &state_dir,
        ca_file: ca_file.as_deref(),
        proxy: file.proxy.as_deref(),
        hostname: &host,
        force: a.force,
    };
    match enroll_device(&opts).await {
        Ok(identity) => {
            let until = time::OffsetDateTime::from_unix_timestamp(identity.not_after)
                .map(sensor_core::timefmt::rfc3339)
                .unwrap_or_default();
            println!(
                "enrolled with {backend} as sensor {}; device certificate valid until {until}; identity in {}",
                identity.sensor_id,
                state_dir.join(sensor_core::config::IDENTITY_LINK).display()
            );
            println!("the agent uses it for mutual TLS when the configuration names no other backend credential");
            Ok(0)
        }
        Err(e) => {
            eprintln!("m365-sensor enroll: {e}");
            eprintln!("nothing was installed");
            Ok(1)
        }
    }
}
