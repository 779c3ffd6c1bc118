//! `m365-sim --listen 127.0.0.1:0 --scenario FILE.toml --out-dir DIR`: runs the simulator until killed.
//! When ready it writes `DIR/ca.pem`, then `DIR/url` (atomically, via a temporary file and rename).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "m365-sim", about = "Microsoft 365 simulator for tests")]
struct Args {
    /// Address to listen on (loopback), e.g. 127.0.0.1:0.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The scenario TOML file.
    #[arg(long)]
    scenario: PathBuf,
    /// Directory receiving `ca.pem` and `url`.
    #[arg(long)]
    out_dir: PathBuf,
}

fn write_atomic(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A minimal stderr logger (level from `RUST_LOG`: error, warn, info, debug; default info).
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0 && m.target().starts_with("m365_sim")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("m365-sim {} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let level = match std::env::var("RUST_LOG").unwrap_or_default().as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "debug" | "trace" => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_logger(Box::leak(Box::new(StderrLog(level))));
    log::set_max_level(level);
    let args = Args::parse();
    let scenario = m365_sim::Scenario::load(&args.scenario)?;
    let handle = m365_sim::start(scenario, args.listen).await?;
    std::fs::create_dir_all(&args.out_dir)?;
    write_atomic(&args.out_dir.join("ca.pem"), &handle.ca_pem)?;
    write_atomic(&args.out_dir.join("url"), &handle.url)?;
    log::info!("ready: {}", handle.url);
    std::future::pending::<()>().await;
    Ok(())
}
