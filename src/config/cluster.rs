//! The state backend (`[state] backend`), the PostgreSQL connection (`[postgres]`) and this
//! node's place in a cluster (`[cluster]`). The PostgreSQL password is never in the config:
//! `postgres.password_file`, or the systemd credential `postgres-password`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;
use tokio_postgres::config::{Host, SslMode};

use super::{de_duration, MAX_DURATION};

/// Where the state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// One SQLite file under `state.dir`: one host, no set-up.
    #[default]
    Sqlite,
    /// A PostgreSQL database several hosts share.
    Postgres,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSection {
    /// `postgresql://USER@HOST[:PORT]/DB[?sslmode=verify-full&...]`, or a Unix socket
    /// directory as the host (`?host=/run/postgresql`). Never a password.
    pub url: Option<String>,
    /// Where the password is read from. `None`: `$CREDENTIALS_DIRECTORY/postgres-password`
    /// when it exists (else no password: peer or certificate authentication).
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to; its name must match the
    /// host (verify-full). Required for a TCP host.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This node's name in the cluster (the rotator's lease, logs). Default: the host name.
    pub node_name: Option<String>,
    /// How long the rotator's lease lasts: how soon another node takes over timer
    /// rotations after the rotator is gone.
    #[serde(deserialize_with = "de_duration")]
    pub lease: Duration,
    /// How often a node reloads the whole state, in case a change notification was lost.
    #[serde(deserialize_with = "de_duration")]
    pub reconcile_interval: Duration,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node_name: None,
            lease: Duration::from_secs(15),
            reconcile_interval: Duration::from_secs(60),
        }
    }
}

impl ClusterSection {
    /// The configured node name, else the host name.
    pub fn node_name(&self) -> anyhow::Result<String> {
        match &self.node_name {
            Some(name) => Ok(name.clone()),
            None => {
                let host = nix::unistd::gethostname().map_err(|e| {
                    anyhow::anyhow!("cluster.node_name unset and no host name: {e}")
                })?;
                Ok(host.to_string_lossy().into_owned())
            }
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if let Some(name) = &self.node_name {
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if name.is_empty() || name.len() > 63 || !name.chars().all(ok) {
                bail!("cluster.node_name `{name}` must be 1 to 63 characters of A-Z a-z 0-9 . - _");
            }
        }
        for (name, d, least) in [
            ("cluster.lease", self.lease, Duration::from_secs(1)),
            (
                "cluster.reconcile_interval",
                self.reconcile_interval,
                Duration::from_secs(1),
            ),
        ] {
            if d < least || d > MAX_DURATION {
                bail!(
                    "{name} = {} must be between 1s and 30 days",
                    humantime::format_duration(d)
                );
            }
        }
        Ok(())
    }
}

/// What the daemon connects to, from `[postgres]`: the connection settings (no password
/// yet) and, for a TCP host, the CA file that verifies the server (verify-full).
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub config: tokio_postgres::Config,
    pub ca_file: Option<PathBuf>,
}

impl PostgresSection {
    /// The connection settings `url` and `ca_file` describe. Errors name the key, and never
    /// repeat the URL (it could hold a password by mistake).
    pub fn target(&self) -> anyhow::Result<PostgresTarget> {
        let Some(url) = &self.url else {
            bail!("postgres.url is required with state.backend = \"postgres\"");
        };
        let (url, sslmode) = take_sslmode(url)?;
        if has_password(&url) {
            bail!("postgres.url must not hold a password: give it in postgres.password_file or the systemd credential postgres-password");
        }
        // The parser's errors name an option, never a value.
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            anyhow::anyhow!("postgres.url is not a PostgreSQL URL: {e}{why}")
        })?;
        if config.get_password().is_some() {
            bail!("postgres.url must not hold a password: give it in postgres.password_file or the systemd credential postgres-password");
        }
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            bail!("postgres.url names no host (a host name, or a socket directory as ?host=/run/postgresql)");
        }
        let tcp = hosts.iter().any(|h| matches!(h, Host::Tcp(_)));
        if tcp {
            if hosts.iter().any(|h| !matches!(h, Host::Tcp(_))) {
                bail!("postgres.url mixes TCP hosts and socket directories");
            }
            if !matches!(sslmode.as_deref(), None | Some("verify-full")) {
                bail!("postgres.url: sslmode must be verify-full (or left out) for a TCP host: the server's certificate is always checked");
            }
            let Some(ca) = &self.ca_file else {
                bail!("postgres.ca_file is required for a TCP host: the server's certificate is verified against it (verify-full)");
            };
            check_readable(ca, "postgres.ca_file")?;
            config.ssl_mode(SslMode::Require);
        } else {
            // PostgreSQL does not speak TLS on its socket; the kernel keeps it on this host.
            if !matches!(sslmode.as_deref(), None | Some("disable")) {
                bail!(
                    "postgres.url: TLS is for TCP hosts; over a socket directory leave sslmode out"
                );
            }
            if self.ca_file.is_some() {
                bail!("postgres.ca_file is for a TCP host; postgres.url names a socket directory");
            }
            config.ssl_mode(SslMode::Disable);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        Ok(PostgresTarget {
            config,
            ca_file: self.ca_file.clone().filter(|_| tcp),
        })
    }

    /// The password file in force: the configured one (which must exist), else the
    /// systemd credential when it exists; `None`: no password.
    pub fn password_path(&self) -> anyhow::Result<Option<PathBuf>> {
        if let Some(p) = &self.password_file {
            check_readable(p, "postgres.password_file")?;
            return Ok(Some(p.clone()));
        }
        Ok(std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join("postgres-password"))
            .filter(|p| p.exists()))
    }
}

fn check_readable(path: &Path, key: &str) -> anyhow::Result<()> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{key} {}: {e}", path.display()))
}

/// The URL without its `sslmode` parameter (tokio-postgres knows only disable, prefer and
/// require; verify-full is what the daemon does with `ca_file`), and that parameter.
fn take_sslmode(url: &str) -> anyhow::Result<(String, Option<String>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut mode = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert" | "sslcert" | "sslkey" | "sslpassword", _)) => {
                bail!("postgres.url: give the CA in postgres.ca_file (client certificates are not supported)")
            }
            _ => kept.push(pair),
        }
    }
    if let Some(m) = &mode {
        if !matches!(
            m.as_str(),
            "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
        ) {
            bail!("postgres.url: sslmode `{m}` is not a PostgreSQL sslmode");
        }
    }
    let url = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((url, mode))
}

/// Whether the URL's user info carries a password (`user:password@`).
fn has_password(url: &str) -> bool {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .unwrap_or("");
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(user_info, _)| user_info.contains(':'))
}
