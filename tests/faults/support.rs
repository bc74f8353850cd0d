//! What the fault tests share: daemon options and checks, `audit verify`, the seeded PRNG,
//! key fingerprints and the SoftHSM token's files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use harness::{bin, Daemon, Options, Secrets};
use incountry_keyd::proto::HealthDocument;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

pub fn options() -> Options {
    Options {
        versions_per_day: 1000,
        log_level: "info",
        ..Options::default()
    }
}

/// Adds settings to the config's `[server]` table.
pub fn server_settings(d: &Daemon, lines: &str) {
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        cfg.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1),
    )
    .unwrap();
}

pub fn health(d: &Daemon) -> HealthDocument {
    d.health()
}

/// Keys are still served while the HSM is away.
pub fn assert_reads_served(d: &Daemon, expect_versions: usize) {
    assert_eq!(d.secrets("prod", "DE").secrets.len(), expect_versions);
}

/// Polls rotations until one succeeds; returns how long that took.
pub fn rotate_until_ok(d: &Daemon, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let r = d.rotate("prod", "DE");
        if r.status == 201 {
            return start.elapsed();
        }
        assert_eq!(r.status, 503, "while recovering: {}", r.text());
        assert!(
            start.elapsed() < limit,
            "no successful change within {limit:?} of the HSM's return: {}\n{}",
            r.text(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `audit verify` on the daemon's state (read-only, so also while it runs): asserts that
/// the chain, the MACs and the state against the HSM anchor pass, and returns how many
/// entries the log has.
pub fn audit_verify(d: &Daemon) -> u64 {
    let out = Command::new(bin())
        .arg("--config")
        .arg(&d.config)
        .args(["audit", "verify"])
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "audit verify failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .strip_prefix("OK: ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("audit verify said {stdout:?}"))
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `pid` is alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

// ---------------------------------------------------------------------------------------
// The SoftHSM token
// ---------------------------------------------------------------------------------------

/// The directory of the one token under `tokens`.
pub fn token_dir(tokens: &Path) -> PathBuf {
    std::fs::read_dir(tokens)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// Every file of every token under `tokens` (none where a directory cannot be read).
pub fn token_files(tokens: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(tokens)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|token| std::fs::read_dir(token.path()).into_iter().flatten())
        .flatten()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Randomness and key material
// ---------------------------------------------------------------------------------------

/// splitmix64: small, deterministic, good enough to pick moments and shapes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform enough in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The run's seed: `KEYD_FAULT_SEED` when set (replay), else from the time.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("KEYD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: seed {seed} (replay with KEYD_FAULT_SEED={seed})");
    seed
}

/// SHA-256 of a served secret (base64 in the document), hex. Keys themselves are never kept.
fn fingerprint(secret_b64: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(secret_b64)
        .expect("secret is base64");
    hex::encode(Sha256::digest(&raw))
}

/// (version, fingerprint) of every secret in a secrets document.
pub fn secret_fingerprints(doc: &Secrets) -> Vec<(u32, String)> {
    doc.secrets
        .iter()
        .map(|s| (s.version, fingerprint(&s.secret)))
        .collect()
}
