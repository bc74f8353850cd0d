//! systemd integration: the listening socket (socket activation or our own bind), readiness
//! and status notifications, the watchdog interval, and whether stderr goes to the journal.
//! Every notification is a no-op outside systemd (no NOTIFY_SOCKET).

use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage};
use sd_notify::NotifyState;

/// Where the listening socket came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerSource {
    /// Passed by systemd (LISTEN_FDS); the path it is bound to, when it has one.
    Activated(Option<PathBuf>),
    /// Bound by the daemon at this path.
    Bound(PathBuf),
}

impl std::fmt::Display for ListenerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenerSource::Activated(Some(p)) => write!(f, "{} (from systemd)", p.display()),
            ListenerSource::Activated(None) => f.write_str("socket from systemd"),
            ListenerSource::Bound(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The socket systemd passed (LISTEN_FDS), else one bound at `path` with `mode`. A stale
/// socket file left by a crash is replaced; a live one (another daemon answers) is not.
pub fn listener(
    path: &Path,
    mode: u32,
) -> anyhow::Result<(std::os::unix::net::UnixListener, ListenerSource)> {
    let mut fds = sd_notify::listen_fds().context("LISTEN_FDS")?;
    if fds.len() > 1 {
        bail!(
            "systemd passed {} sockets (LISTEN_FDS); incountry-keyd listens on exactly one: \
             keep a single ListenStream= in incountry-keyd.socket",
            fds.len()
        );
    }
    if let Some(fd) = fds.next() {
        // SAFETY: systemd hands us this descriptor (LISTEN_PID is ours) to own; nothing else
        // in the process uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        return activated(fd);
    }
    bind(path, mode).map(|l| (l, ListenerSource::Bound(path.to_path_buf())))
}

/// Checks that a passed descriptor is a listening Unix stream socket, so peer credentials
/// work and accept() answers.
fn activated(fd: OwnedFd) -> anyhow::Result<(std::os::unix::net::UnixListener, ListenerSource)> {
    let kind = getsockopt(&fd.as_fd(), sockopt::SockType)
        .context("the descriptor systemd passed is not a socket")?;
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).context("cannot read the address of the passed socket")?;
    let Some(unix) = addr.as_unix_addr() else {
        bail!(
            "systemd passed a {:?} socket; incountry-keyd needs a Unix stream socket \
             (ListenStream=/path)",
            addr.family()
        );
    };
    if kind != SockType::Stream {
        bail!("systemd passed a {kind:?} socket; incountry-keyd needs ListenStream=, not ListenDatagram= or ListenSequentialPacket=");
    }
    if !getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false) {
        bail!("the socket systemd passed is not listening");
    }
    let path = unix.path().map(Path::to_path_buf);
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok((listener, ListenerSource::Activated(path)))
}

fn bind(path: &Path, mode: u32) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another daemon answers on it", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Bind with a tight umask so the socket is never briefly wider than `mode`.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("cannot bind {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode of {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// READY=1 with a STATUS= summary: at start, and at the end of every reload.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS= alone (shown by `systemctl status`).
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC now), as systemd expects of a reload.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading configuration"),
    ];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for MONOTONIC_USEC"),
    }
    notify(&states);
}

pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining in-flight requests"),
    ]);
}

pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// The watchdog interval systemd asks for (WATCHDOG_USEC, for this pid), if any. Zero means
/// none.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Whether stderr is connected to the journal (JOURNAL_STREAM names its device and inode):
/// then log lines carry a `<N>` syslog priority prefix and no timestamp.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}
