//! `m365-sensor update --bundle PATH|URL`: installs a signed RAUC bundle into the inactive slot of the
//! appliance, through the image's updater (`m365-update install`, which checks the signature, the target
//! and the version). Run as root on the device. Invariant: a downloaded bundle is installed only when its
//! SHA-256 matches `--sha256` (when given), and is deleted afterwards; the exit code is the updater's
//! (0 installed, 1 refused, 2 failed).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sensor_control::identity::Identity;
use sensor_control::update::{self, UpdateOutcome};
use sensor_core::config::Config;

/// The command line of `update`.
#[derive(clap::Args)]
pub struct Args {
    /// The bundle: a local file, or an https:// URL (fetched with the backend's TLS and proxy settings).
    #[arg(long)]
    pub bundle: String,
    /// The bundle's SHA-256 (hex); checked before anything is installed.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Install a version that is not newer than the running one: honoured by the helper only when the
    /// device's local switch allows downgrades (`/usr/lib/m365-sensor/allow-downgrade` in the image, or
    /// `/var/lib/m365-provision/allow-downgrade` from the seed), and never below the image's `MIN_VERSION`.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Configuration file (for a URL: state_dir, backend TLS settings, network.proxy).
    #[arg(long, default_value = crate::DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// Runs `update`; returns the exit code.
pub async fn run(args: Args) -> Result<i32> {
    let updater = update::updater()
        .ok_or_else(|| update::UpdateError::NoUpdater(PathBuf::from(update::UPDATER)))?;
    let expected = args
        .sha256
        .as_deref()
        .map(update::parse_sha256)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--sha256: {e}"))?;
    let (path, downloaded) = if args.bundle.starts_with("https://") {
        let mut config = Config::load(&args.config).with_context(|| {
            format!(
                "a bundle URL is fetched with the backend's TLS and proxy settings of {}",
                args.config.display()
            )
        })?;
        config.use_enrolled_identity();
        let sensor_id = Identity::load(&config.state_dir)
            .ok()
            .flatten()
            .map(|i| i.sensor_id)
            .unwrap_or_default();
        let client = crate::control::client_for(
            &config.backend,
            config.network.proxy.as_deref(),
            &sensor_id,
        )
        .map_err(anyhow::Error::msg)?;
        let name = update::bundle_name(&format!("cli-{}", std::process::id()));
        eprintln!("downloading {} ...", args.bundle);
        let (path, sha) = update::download(
            &client,
            &args.bundle,
            &config.state_dir,
            &name,
            expected.as_deref(),
        )
        .await?;
        eprintln!("downloaded {} (SHA-256 {sha})", path.display());
        (path, true)
    } else if args.bundle.contains("://") {
        bail!(
            "--bundle {}: only local files and https:// URLs",
            args.bundle
        );
    } else {
        let path = PathBuf::from(&args.bundle);
        if let Some(expected) = &expected {
            let actual = sha256_file(&path)?;
            if &actual != expected {
                bail!(
                    "{}: SHA-256 {actual}, not the expected {expected}; nothing installed",
                    path.display()
                );
            }
        }
        (path, false)
    };
    // The CLI waits for the updater anyway; blocking this thread is what it means.
    let mut cmd = std::process::Command::new(&updater);
    cmd.arg("install").arg(&path);
    if args.allow_downgrade {
        cmd.arg("--allow-downgrade");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", updater.display()));
    if downloaded {
        let _ = std::fs::remove_file(&path);
    }
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let code = out.status.code().unwrap_or(2);
    match serde_json::from_str::<UpdateOutcome>(line) {
        Ok(o) if o.ok => println!(
            "installed version {} into slot {}: reboot to start it (systemctl reboot); the health check after the boot keeps it or rolls back",
            o.version, o.slot
        ),
        Ok(o) => eprintln!("update {} ({}): {}", o.code, o.version, o.message),
        Err(_) => eprintln!(
            "{} exited {code} without an answer: {}{}",
            updater.display(),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    Ok(code)
}

fn sha256_file(path: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}
