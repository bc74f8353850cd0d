//! The state directory on disk: its checks, private file modes, the lock, opening read-only.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

pub const DB_FILE: &str = "keyd.sqlite3";
const LOCK_FILE: &str = "keyd.lock";

/// Opens the state database read-only (offline tools such as `audit verify`).
pub(super) fn open_read_only(dir: &Path) -> anyhow::Result<(Connection, PathBuf)> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        anyhow::bail!("no state database at {}", path.display());
    }
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| anyhow::anyhow!("cannot open {} read-only: {e}", path.display()))?;
    Ok((conn, path))
}

/// The state directory must be the daemon's own: owned by its user and writable by no one
/// else (whoever can write there can swap the database).
pub(super) fn check_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("cannot read state directory {}: {e}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        anyhow::bail!(
            "state directory {} is owned by uid {}, not by this daemon's user (uid {euid}): chown it",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "state directory {} is writable by its group or by others (mode {mode:04o}): chmod 0700 it",
            dir.display()
        );
    }
    Ok(())
}

/// The database and its WAL and shared-memory files are the daemon's alone, whatever the
/// umask: made 0600 before SQLite opens them (SQLite gives its -wal and -shm files the
/// database's mode), and tightened if an older run left them looser.
pub(super) fn private_files(db: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", db.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(meta) = fs::metadata(&p) {
            if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                    .map_err(|e| anyhow::anyhow!("cannot chmod 0600 {}: {e}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Takes an exclusive flock on the state directory's lock file and writes our pid into it.
pub(super) fn lock_state(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open lock file {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor that `file` owns for the whole call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        anyhow::bail!(
            "state directory {} is in use by another incountry-keyd (pid {}); stop it first",
            dir.display(),
            if holder.is_empty() { "unknown" } else { holder }
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}
