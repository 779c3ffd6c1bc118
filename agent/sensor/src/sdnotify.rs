//! The systemd notification protocol (`sd_notify`), spoken directly over `NOTIFY_SOCKET`: `READY=1` once
//! the spool is open and the stages run, `WATCHDOG=1` from the main loop at half the `WATCHDOG_USEC`
//! period (a hung main loop gets the service restarted), `STATUS=` with the overall state, `RELOADING=1`
//! and `STOPPING=1`. Invariant: without `NOTIFY_SOCKET` every call is a no-op; a send failure is logged,
//! never fatal.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// A connection to the service manager, if the agent runs under one.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = match path.strip_prefix('@') {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                        .ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        Self {
            socket,
            watchdog,
            last_ping: None,
        }
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                log::warn!(target: "agent", "sd_notify failed: {e}");
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// `RELOADING=1`; follow with [`Self::ready`].
    pub fn reloading(&self) {
        self.send("RELOADING=1");
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: draining in-flight batches");
    }

    /// Sends `WATCHDOG=1` when half the watchdog period passed since the last ping.
    pub fn watchdog_tick(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.is_none_or(|t| t.elapsed() >= period / 2) {
            self.send("WATCHDOG=1");
            self.last_ping = Some(Instant::now());
        }
    }
}
