//! The TOML configuration (`version = 1`). Unknown fields are refused by name; names in
//! access lists are resolved to uids and gids when the file is loaded, so a typo fails at
//! start (or at reload, which then keeps the old config) rather than silently matching nobody.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer};

mod cluster;

pub use cluster::{ClusterSection, PostgresSection, PostgresTarget, StateBackend};

pub const DEFAULT_PATH: &str = "/etc/incountry-keyd/keyd.toml";
pub const DEFAULT_SOCKET: &str = "/run/incountry-keyd/keyd.sock";
pub const ALLOWED_VERSIONS_PER_DAY: std::ops::RangeInclusive<u32> = 1..=1000;
/// The longest duration any setting takes (30 days): every duration is added to the
/// monotonic clock somewhere, and a larger one could overflow it.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub hsm: HsmSection,
    #[serde(default)]
    pub state: StateSection,
    #[serde(default)]
    pub postgres: PostgresSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub access: AccessSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub verification: VerificationSection,
    #[serde(default)]
    pub aws: AwsSection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub socket: PathBuf,
    /// Octal string, e.g. "0660".
    #[serde(deserialize_with = "de_mode")]
    pub socket_mode: u32,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Open connections at most; past it a new connection is closed at once.
    pub max_connections: usize,
    /// Open connections per peer uid at most, so one uid cannot starve the others.
    pub max_connections_per_uid: usize,
    /// A request's headers and body must arrive within this (long-poll waits excluded);
    /// also how long an idle keep-alive connection stays open.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o660,
            max_body: 1024 * 1024,
            max_connections: 4096,
            max_connections_per_uid: 256,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HsmSection {
    pub module: PathBuf,
    pub token_label: String,
    /// Where the user PIN is read from. `None`: `$CREDENTIALS_DIRECTORY/hsm-pin`.
    pub pin_file: Option<PathBuf>,
}

impl Default for HsmSection {
    fn default() -> Self {
        HsmSection {
            module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            token_label: "incountry-keyd".into(),
            pin_file: None,
        }
    }
}

impl HsmSection {
    /// The PIN file in force: the configured one, else the systemd credential.
    pub fn pin_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.pin_file {
            return Ok(p.clone());
        }
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => Ok(Path::new(&dir).join("hsm-pin")),
            None => bail!(
                "no HSM PIN source: set hsm.pin_file, or run under systemd with LoadCredential=hsm-pin:..."
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// The SQLite state (backend "sqlite").
    pub dir: PathBuf,
    pub backend: StateBackend,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            dir: PathBuf::from("/var/lib/incountry-keyd"),
            backend: StateBackend::Sqlite,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    pub readers: Vec<String>,
    pub admins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub versions_per_day: u32,
    pub customer_supplied_versions: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            versions_per_day: 1,
            customer_supplied_versions: 100,
        }
    }
}

pub use crate::domain::VerificationMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationSection {
    pub mode: VerificationMode,
}

impl Default for VerificationSection {
    fn default() -> Self {
        VerificationSection {
            mode: VerificationMode::Totp,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsSection {
    pub endpoint_url: Option<String>,
    #[serde(deserialize_with = "de_duration")]
    pub revalidate_interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_stale: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
}

impl Default for AwsSection {
    fn default() -> Self {
        AwsSection {
            endpoint_url: None,
            revalidate_interval: Duration::from_secs(15 * 60),
            max_stale: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter: "info", "debug", "incountry_keyd=debug,warn", ...
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
        }
    }
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not an octal mode like \"0660\""))
        })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration like \"15m\": {e}")))
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Loads the daemon's config, refusing a file that others could have changed.
    pub fn load_for_daemon(path: &Path) -> anyhow::Result<Config> {
        check_not_writable_by_others(path, "config")?;
        Self::load(path)
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.version != 1 {
            bail!("version = {} is not supported (expected 1)", self.version);
        }
        if !ALLOWED_VERSIONS_PER_DAY.contains(&self.limits.versions_per_day) {
            bail!(
                "limits.versions_per_day = {} is outside 1..=1000",
                self.limits.versions_per_day
            );
        }
        if self.limits.customer_supplied_versions == 0 {
            bail!("limits.customer_supplied_versions must be at least 1");
        }
        if self.server.max_body < 1024 {
            bail!("server.max_body must be at least 1024 bytes");
        }
        if self.server.max_connections == 0 || self.server.max_connections_per_uid == 0 {
            bail!("server.max_connections and server.max_connections_per_uid must be at least 1");
        }
        if self.server.request_timeout < Duration::from_millis(100) {
            bail!("server.request_timeout must be at least 100ms");
        }
        for (name, d) in [
            ("server.request_timeout", self.server.request_timeout),
            ("aws.revalidate_interval", self.aws.revalidate_interval),
            ("aws.max_stale", self.aws.max_stale),
            ("aws.request_timeout", self.aws.request_timeout),
        ] {
            if d > MAX_DURATION {
                bail!(
                    "{name} = {} is longer than the most allowed, 30 days",
                    humantime::format_duration(d)
                );
            }
        }
        if self.hsm.token_label.is_empty() || self.hsm.token_label.len() > 32 {
            bail!("hsm.token_label must be 1 to 32 characters (PKCS#11 label)");
        }
        if self.aws.revalidate_interval < Duration::from_secs(1) {
            bail!("aws.revalidate_interval must be at least 1s");
        }
        if self.aws.request_timeout < Duration::from_millis(100) {
            bail!("aws.request_timeout must be at least 100ms");
        }
        if let Some(url) = &self.aws.endpoint_url {
            check_endpoint_url(url)?;
        }
        self.cluster.validate()?;
        if self.state.backend == StateBackend::Postgres {
            self.postgres.target()?;
        }
        self.log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .map_err(|e| anyhow::anyhow!("log.level `{}`: {e}", self.log.level))?;
        self.access_policy()?;
        Ok(())
    }

    /// The access lists with names resolved against the user database.
    pub fn access_policy(&self) -> anyhow::Result<AccessPolicy> {
        Ok(AccessPolicy {
            readers: Principals::resolve(&self.access.readers).context("access.readers")?,
            admins: Principals::resolve(&self.access.admins).context("access.admins")?,
        })
    }
}

/// `aws.endpoint_url` must be `https://`, or `http://` to this host only (127.0.0.0/8, ::1,
/// localhost): over plain HTTP the signed request and the data key KMS returns would cross
/// the network in clear.
fn check_endpoint_url(url: &str) -> anyhow::Result<()> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("aws.endpoint_url `{url}` is not a URL: {e}"))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("aws.endpoint_url `{url}` has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback_host(host) => Ok(()),
        Some("http") => bail!(
            "aws.endpoint_url `{url}`: plain http is allowed only to a loopback host (127.0.0.0/8, ::1, localhost); use https"
        ),
        _ => bail!("aws.endpoint_url `{url}` must start with https:// (or http:// to a loopback host)"),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Resolved access lists, checked against each connection's peer credentials.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    pub readers: Principals,
    pub admins: Principals,
}

#[derive(Debug, Clone, Default)]
pub struct Principals {
    uids: HashSet<u32>,
    gids: HashSet<u32>,
}

impl Principals {
    fn resolve(entries: &[String]) -> anyhow::Result<Principals> {
        let mut p = Principals::default();
        for entry in entries {
            let (kind, value) = entry
                .split_once(':')
                .with_context(|| format!("`{entry}` is not uid:N, user:NAME or group:NAME"))?;
            match kind {
                "uid" => {
                    p.uids.insert(
                        value
                            .parse()
                            .with_context(|| format!("`{entry}`: not a number"))?,
                    );
                }
                "gid" => {
                    p.gids.insert(
                        value
                            .parse()
                            .with_context(|| format!("`{entry}`: not a number"))?,
                    );
                }
                "user" => {
                    let user = nix::unistd::User::from_name(value)?
                        .with_context(|| format!("`{entry}`: no such user"))?;
                    p.uids.insert(user.uid.as_raw());
                }
                "group" => {
                    let group = nix::unistd::Group::from_name(value)?
                        .with_context(|| format!("`{entry}`: no such group"))?;
                    p.gids.insert(group.gid.as_raw());
                }
                _ => bail!("`{entry}` is not uid:N, user:NAME or group:NAME"),
            }
        }
        Ok(p)
    }

    /// Whether a peer (uid, primary gid and supplementary groups) is listed.
    pub fn admits(&self, uid: u32, gids: &[u32]) -> bool {
        self.uids.contains(&uid) || gids.iter().any(|g| self.gids.contains(g))
    }
}

/// Refuses a file (or directory) that a user other than root and the daemon's own could
/// have written: owned by another user, or writable by its group or by everyone.
pub fn check_not_writable_by_others(path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        bail!(
            "{what} {} is owned by uid {}, not by root or this daemon's user (uid {euid}): chown it",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "{what} {} is writable by its group or by others (mode {mode:04o}): chmod go-w it",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
