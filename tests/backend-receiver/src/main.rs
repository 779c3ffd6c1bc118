//! `backend-receiver`: runs the reference backend receiver until killed.
//!
//! When ready it writes, each atomically (temporary file + rename), `DIR/ca.pem`, `DIR/device.pem`,
//! `DIR/device.key` (mode 0600), `DIR/control_url` and, last, `DIR/url`. Logs go to stderr
//! (`BACKEND_RECEIVER_LOG=debug|info|warn|error`, default info).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

/// Reference receiver of the m365-sensor backend protocol (test rig; loopback only).
#[derive(Debug, Parser)]
#[command(name = "backend-receiver", version)]
struct Args {
    /// Address of the main HTTPS port (`/v1/...`: ingest, heartbeat, enrolment, config, commands).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address of the control HTTPS port (`/_rx/...`).
    #[arg(long, default_value = "127.0.0.1:0")]
    control_listen: SocketAddr,
    /// Directory receiving ca.pem, device.pem, device.key, control_url and url.
    #[arg(long)]
    out_dir: PathBuf,
    /// File holding the accepted bearer token (surrounding whitespace ignored). Without it only mTLS
    /// authenticates.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Cap on a request's compressed body, bytes.
    #[arg(long, default_value_t = backend_receiver::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Cap on a request's decompressed body, bytes.
    #[arg(long, default_value_t = backend_receiver::DEFAULT_MAX_DECOMPRESSED_BYTES)]
    max_decompressed_bytes: usize,
    /// A single-use enrolment token accepted by `POST /v1/enroll` (repeat the flag for more; more can
    /// be added through `POST /_rx/enroll-tokens`).
    #[arg(long = "enroll-token", value_name = "TOKEN")]
    enroll_tokens: Vec<String>,
    /// Validity of the certificates issued at enrolment and renewal, seconds.
    #[arg(long, default_value_t = backend_receiver::DEFAULT_DEVICE_CERT_VALIDITY.as_secs())]
    device_cert_validity_secs: u64,
    /// Another name (DNS or IP) for the server certificate, e.g. the address a VM reaches the receiver
    /// by (repeat the flag for more).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Play a compromised backend: renewals issued by a second CA (written to DIR/hostile-ca.pem) and
    /// answered as `ca_pem`; `POST /_rx/server-cert {"issuer":"hostile"}` makes the main port present a
    /// server certificate of that CA.
    #[arg(long)]
    hostile_renewal_ca: bool,
}

/// A minimal stderr logger.
struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.0
            && (metadata.target().starts_with("backend_receiver")
                || metadata.level() <= log::Level::Warn)
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "backend-receiver {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = std::env::var("BACKEND_RECEIVER_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_logger(Box::leak(Box::new(StderrLogger(level)))).is_ok() {
        log::set_max_level(level);
    }
}

/// Writes `contents` to `dir/name` through a temporary file and a rename.
fn write_atomic(dir: &Path, name: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let bearer_token = match &args.token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(!t.is_empty(), "the token file {} is empty", path.display());
            Some(t)
        }
        None => None,
    };
    anyhow::ensure!(
        args.enroll_tokens.iter().all(|t| !t.trim().is_empty()),
        "--enroll-token must not be empty"
    );
    anyhow::ensure!(
        args.device_cert_validity_secs > 0,
        "--device-cert-validity-secs must be at least 1"
    );
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let cfg = backend_receiver::ReceiverConfig {
        listen: args.listen,
        control_listen: args.control_listen,
        bearer_token,
        max_body_bytes: args.max_body_bytes,
        max_decompressed_bytes: args.max_decompressed_bytes,
        enrollment_tokens: args.enroll_tokens,
        device_cert_validity: std::time::Duration::from_secs(args.device_cert_validity_secs),
        server_names: args.server_names,
        hostile_renewal_ca: args.hostile_renewal_ca,
        ..Default::default()
    };
    let handle = backend_receiver::start(cfg).await?;
    let dir = &args.out_dir;
    write_atomic(dir, "ca.pem", &handle.ca_pem, 0o644)?;
    write_atomic(dir, "device.pem", &handle.device_cert_pem, 0o644)?;
    write_atomic(dir, "device.key", &handle.device_key_pem, 0o600)?;
    if let Some(pem) = &handle.hostile_ca_pem {
        write_atomic(dir, "hostile-ca.pem", pem, 0o644)?;
    }
    write_atomic(dir, "control_url", &handle.control_url, 0o644)?;
    write_atomic(dir, "url", &handle.url, 0o644)?;
    log::info!("ready: {} (control {})", handle.url, handle.control_url);
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
    log::info!("stopping");
    drop(handle);
    Ok(())
}
