//! The `m365-sensor` binary: parses the command line, wires the stages and runs them. Everything else
//! lives in the library crates under `agent/`.

mod agent;
mod control;
#[cfg(feature = "demo")]
mod demo;
mod doctor;
mod enroll_cmd;
mod harden;
mod logging;
mod sdnotify;
mod stages;
mod status_cmd;
mod update_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sensor_core::config::Config;

const DEFAULT_CONFIG: &str = "/etc/m365-sensor/sensor.toml";

#[derive(Parser)]
#[command(
    name = "m365-sensor",
    version,
    about = "Collects Microsoft 365 audit logs and relays them to the analysis backend"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (default: M365_SENSOR_LOG or info).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the agent in the foreground until SIGTERM/SIGINT.
    Run {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Stay root when no `m365-sensor` user exists (not recommended).
        #[arg(long)]
        allow_root: bool,
    },
    /// Prints the status of the running (or last run) agent. Exit 0 ok, 1 degraded, 2 failed.
    Status {
        /// Configuration file (for its state_dir).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the JSON status document.
        #[arg(long)]
        json: bool,
    },
    /// Checks the whole setup chain once, step by step, with the fix for each failure.
    Doctor {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Enrols the device with the backend: generates its key pair here, sends a CSR with the single-use
    /// token, installs the returned certificate for mutual TLS.
    Enroll(enroll_cmd::Args),
    /// Installs a signed update bundle (file or https:// URL) into the inactive slot of the appliance
    /// image, as root. Exit 0 installed, 1 refused, 2 failed.
    Update(update_cmd::Args),
    /// Validates the configuration and prints every error at once.
    CheckConfig {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Runs the main job on the embedded default: a simulated tenant and backend on loopback.
    #[cfg(feature = "demo")]
    Demo {
        /// Stop once this many records were delivered (default: run until interrupted).
        #[arg(long)]
        records: Option<u64>,
        /// Keep the demo's working directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("m365-sensor: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn real_main(cli: Cli) -> Result<i32> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Run { config, allow_root } => {
            harden::close_inherited_fds();
            logging::init(cli.log_level.as_deref());
            let config_path = config;
            let config = Config::load(&config_path)?;
            harden::harden(&config.state_dir, allow_root)?;
            let rt = runtime()?;
            let result = rt.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    agent::termination().await;
                    let _ = tx.send(true);
                });
                let reload = agent::reload_on_sighup();
                agent::run_agent(config, Some(config_path), reload, rx, |_| {}).await
            });
            // A blocking spool call stuck on a dying disk must not hold the exit: what it would
            // commit is atomic, and what was committed is recovered at the next start.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            result?;
            Ok(0)
        }
        Command::Status { config, json } => {
            let state_dir = match Config::load(&config) {
                Ok(c) => c.state_dir,
                Err(e) => {
                    eprintln!("warning: {e}; using the default state directory");
                    PathBuf::from("/var/lib/m365-sensor")
                }
            };
            status_cmd::print_status(&state_dir, json)
        }
        Command::Doctor { config } => Ok(runtime()?.block_on(doctor::run(&config))),
        Command::Enroll(args) => {
            logging::init(cli.log_level.as_deref());
            runtime()?.block_on(enroll_cmd::run(args))
        }
        Command::Update(args) => runtime()?.block_on(update_cmd::run(args)),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: OK ({} tenant(s))", config.display(), c.tenants.len());
                Ok(0)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(1)
            }
        },
        #[cfg(feature = "demo")]
        Command::Demo { records, keep } => {
            logging::init(Some(cli.log_level.as_deref().unwrap_or("warn")));
            runtime()?.block_on(demo::run(records, keep))?;
            Ok(0)
        }
    }
}
