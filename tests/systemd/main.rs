//! systemd integration: the units (verify, security exposure, sysusers, tmpfiles), socket
//! activation, sd_notify lifecycle (READY, WATCHDOG, RELOADING, STOPPING), reload, the PIN
//! from systemd credentials, and logs. The real binary, a fresh SoftHSM token per test.
//!
//! - `units`: the unit files, checked by systemd's own tools;
//! - `lifecycle`: socket activation and the sd_notify messages;
//! - `reload`: SIGHUP applies a new config or keeps the running one;
//! - `credentials`: the PIN from `$CREDENTIALS_DIRECTORY`;
//! - `logs`: plain lines on files, priorities on the journal.

mod credentials;
mod lifecycle;
mod logs;
mod reload;
mod units;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A NOTIFY_SOCKET owned by the test: the daemon's sd_notify datagrams arrive here, in order.
struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        // Not a speed check: only keeps a broken daemon from hanging the test forever.
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        NotifySocket { path, sock }
    }

    /// The next datagram, as its `KEY=value` lines.
    pub fn recv(&self) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("no sd_notify message from the daemon within 60 s");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Reads datagrams until one contains the line `line`; returns that datagram. The ones
    /// read before it are appended to `skipped` when given.
    pub fn wait_for(&self, line: &str, mut skipped: Option<&mut Vec<Vec<String>>>) -> Vec<String> {
        loop {
            let msg = self.recv();
            if msg.iter().any(|l| l == line) {
                return msg;
            }
            if let Some(s) = skipped.as_deref_mut() {
                s.push(msg);
            }
        }
    }
}

/// The value of `KEY=` in a datagram.
fn notify_value<'a>(msg: &'a [String], key: &str) -> Option<&'a str> {
    msg.iter()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
