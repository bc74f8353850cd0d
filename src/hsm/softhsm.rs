//! What the daemon knows of SoftHSM, the PKCS#11 module it is developed and tested with:
//! where its token directory is (for start-up messages), and a guard for its file store.
//!
//! SoftHSM's file store rewrites `token.object` in place (truncate, then write) at every
//! login. A process killed in that window leaves it empty, and the token (with every root
//! key on it) no longer loads: the fault suite hit this in about one kill in fifteen
//! during start-up. So after each successful login the daemon keeps a copy beside it, and
//! before it initializes the module it puts the copy back over a `token.object` that is
//! empty or cut short. The copy's name does not end in `.object`, so SoftHSM ignores it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const TOKEN_FILE: &str = "token.object";
const COPY_FILE: &str = "token.object.keyd-copy";

/// The SoftHSM config in force and how it was chosen, for messages.
fn config() -> (PathBuf, String) {
    match std::env::var_os("SOFTHSM2_CONF") {
        Some(p) => {
            let p = PathBuf::from(p);
            let name = format!("SOFTHSM2_CONF={}", p.display());
            (p, name)
        }
        None => {
            let p = PathBuf::from("/etc/softhsm/softhsm2.conf");
            let name = format!("SOFTHSM2_CONF unset, default {}", p.display());
            (p, name)
        }
    }
}

fn token_dir_in(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
    })
}

/// SoftHSM's token directory, when its config names one.
fn token_dir() -> Option<PathBuf> {
    token_dir_in(&fs::read_to_string(config().0).ok()?)
}

/// The likely cause of a failed start: whether the token directory named by the SoftHSM
/// config can be read.
pub fn hint() -> String {
    let (conf, conf_name) = config();
    let text = match fs::read_to_string(&conf) {
        Ok(text) => text,
        Err(e) => return format!("the SoftHSM config cannot be read: {e} ({conf_name})"),
    };
    match token_dir_in(&text) {
        None => format!("the SoftHSM config names no directories.tokendir ({conf_name})"),
        Some(dir) => match fs::read_dir(&dir) {
            Ok(_) => format!(
                "token directory {} is readable: check its files and owner ({conf_name})",
                dir.display()
            ),
            Err(e) => format!(
                "token directory {} cannot be read: {e} ({conf_name})",
                dir.display()
            ),
        },
    }
}

/// Each token's folder in the token directory.
fn tokens() -> Vec<PathBuf> {
    let Some(dir) = token_dir() else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(TOKEN_FILE).exists() || p.join(COPY_FILE).exists())
        .collect()
}

/// Writes `bytes` to `to` atomically: a temporary file beside it, synced, then renamed.
fn replace(to: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = to.with_extension("keyd-tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, to)?;
    if let Some(dir) = to.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Before the module loads: puts the kept copy back over a `token.object` that a killed
/// login left empty or short.
pub fn restore_cut_token_files() {
    for token in tokens() {
        let (file, copy) = (token.join(TOKEN_FILE), token.join(COPY_FILE));
        let (Ok(now), Ok(kept)) = (fs::metadata(&file), fs::read(&copy)) else {
            continue;
        };
        if now.len() >= kept.len() as u64 {
            continue;
        }
        match replace(&file, &kept) {
            Ok(()) => tracing::warn!(
                token = %token.display(),
                "SoftHSM's token.object was cut short ({} of {} bytes: a process was killed while it rewrote it at login); put back the copy kept at the last successful login",
                now.len(),
                kept.len()
            ),
            Err(e) => {
                tracing::error!(token = %token.display(), error = %e, "SoftHSM's token.object is cut short and the kept copy cannot be put back")
            }
        }
    }
}

/// After a successful login: keeps a copy of each token's `token.object` as it is now.
pub fn keep_token_files() {
    for token in tokens() {
        let (file, copy) = (token.join(TOKEN_FILE), token.join(COPY_FILE));
        let Ok(now) = fs::read(&file) else { continue };
        if now.is_empty() || fs::read(&copy).is_ok_and(|kept| kept == now) {
            continue;
        }
        if let Err(e) = replace(&copy, &now) {
            tracing::debug!(token = %token.display(), error = %e, "cannot keep a copy of token.object");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_token_directory_in_the_config() {
        let text = "# c\ndirectories.tokendir = /var/lib/x/tokens\nlog.level = ERROR\n";
        assert_eq!(token_dir_in(text), Some(PathBuf::from("/var/lib/x/tokens")));
        assert_eq!(token_dir_in("log.level = ERROR"), None);
    }

    #[test]
    fn replace_is_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token.object");
        fs::write(&p, b"old contents").unwrap();
        replace(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!p.with_extension("keyd-tmp").exists());
    }
}
