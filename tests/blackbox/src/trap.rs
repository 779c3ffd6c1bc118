//! The trap listener: a TCP listener on 127.0.0.1 that accepts and records every connection attempt and
//! never answers. A test points a hostile endpoint at it and asserts that nothing connected: no byte of
//! a secret can have left for that endpoint.
//!
//! Invariant: it listens on loopback only, counts every connection it accepted (read up to 4 KiB of each,
//! kept for the failure message), and stops accepting when dropped.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// One connection the trap accepted.
#[derive(Clone, Debug)]
pub struct Caught {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The first bytes it sent (at most 4 KiB; a TLS client hello, or a plaintext request).
    pub first_bytes: Vec<u8>,
}

/// A running trap listener.
pub struct Trap {
    addr: SocketAddr,
    caught: Arc<Mutex<Vec<Caught>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trap {
    /// Listens on an ephemeral port of 127.0.0.1.
    pub fn start() -> Result<Trap> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let caught = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (caught.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut buf = vec![0u8; 4096];
                        let n = stream.read(&mut buf).unwrap_or(0);
                        buf.truncate(n);
                        c.lock().unwrap_or_else(|p| p.into_inner()).push(Caught {
                            peer,
                            first_bytes: buf,
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Trap {
            addr,
            caught,
            stop,
            thread: Some(thread),
        })
    }

    /// `https://127.0.0.1:<port>`: an endpoint URL pointing at the trap.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every connection accepted so far.
    pub fn caught(&self) -> Vec<Caught> {
        self.caught
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trap is only worth its zero if it does see a connection.
    #[test]
    fn the_trap_records_a_connection() -> Result<()> {
        let trap = Trap::start()?;
        let mut s = std::net::TcpStream::connect(trap.addr)?;
        std::io::Write::write_all(&mut s, b"client_secret=x")?;
        drop(s);
        crate::wait_for(Duration::from_secs(5), "the connection", || {
            trap.caught().first().cloned()
        })?;
        assert_eq!(trap.caught()[0].first_bytes, b"client_secret=x");
        Ok(())
    }
}
