//! The audit log: one entry per admin action and per refusal, each carrying the SHA-256 of
//! the entry before it, so that changing or removing a row breaks the chain, and an
//! HMAC-SHA256 of its hash made in the HSM, so that only the daemon can write a valid entry.
//! The HSM anchor (`anchor`) pins the newest entry, so cutting the log short is seen too.
//! Entries hold who, what, which key and the outcome — never key material or codes.

pub mod anchor;

pub use anchor::MAC_LEN;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Caller;
use crate::domain::KeyId;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who acted: a peer on the socket, or the daemon itself (timers).
#[derive(Debug, Clone)]
pub enum Actor {
    Peer {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Timer,
}

impl Actor {
    pub fn of(caller: &Caller) -> Actor {
        Actor::Peer {
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
        }
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    Ok,
    /// Refused: the caller was not allowed, or the input or a limit said no.
    Refused,
    /// Failed: a dependency (HSM, KMS, disk) or an integrity check failed.
    Failed,
}

impl AuditOutcome {
    /// As stored and hashed into the chain (so never to change).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Refused => "refused",
            AuditOutcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<AuditOutcome> {
        [
            AuditOutcome::Ok,
            AuditOutcome::Refused,
            AuditOutcome::Failed,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl std::fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub time: i64,
    pub actor: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
    pub action: String,
    pub environment: Option<String>,
    pub country: Option<String>,
    pub version: Option<u32>,
    pub outcome: AuditOutcome,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(time: i64, actor: &Actor, action: &str, key: Option<&KeyId>) -> AuditEntry {
        let (name, uid, gid, pid) = match actor {
            Actor::Peer { uid, gid, pid } => (format!("uid:{uid}"), Some(*uid), Some(*gid), *pid),
            Actor::Timer => ("timer".to_string(), None, None, None),
        };
        AuditEntry {
            time,
            actor: name,
            uid,
            gid,
            pid,
            action: action.to_string(),
            environment: key.map(|k| k.env.clone()),
            country: key.map(|k| k.country.clone()),
            version: None,
            outcome: AuditOutcome::Ok,
            detail: String::new(),
        }
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    pub fn outcome(mut self, outcome: AuditOutcome, detail: impl Into<String>) -> Self {
        self.outcome = outcome;
        self.detail = detail.into();
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub seq: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub hash: String,
    /// HMAC-SHA256 (hex) of `hash` under the HSM's audit key; `None` on entries written
    /// before entries were MACed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditRecord {
    /// The entry at `seq` after `prev_hash`, not MACed yet.
    pub fn chain(seq: i64, entry: AuditEntry, prev_hash: String) -> AuditRecord {
        let hash = digest(seq, &entry, &prev_hash);
        AuditRecord {
            seq,
            entry,
            prev_hash,
            hash,
            mac: None,
        }
    }
}

/// What the HSM MACs for an entry: its chain hash, under a label of its own (anchors are
/// MACed under another).
pub fn entry_mac_input(hash: &str) -> Vec<u8> {
    [b"keyd-audit-entry\0".as_slice(), hash.as_bytes()].concat()
}

/// Equality of two MACs (hex) in time that does not depend on where they differ.
pub fn same_mac(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// SHA-256 over every field, length-prefixed so no two entries serialize alike.
fn digest(seq: i64, e: &AuditEntry, prev_hash: &str) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields = [
        seq.to_string(),
        e.time.to_string(),
        e.actor.clone(),
        opt(e.uid.map(|v| v.to_string())),
        opt(e.gid.map(|v| v.to_string())),
        opt(e.pid.map(|v| v.to_string())),
        e.action.clone(),
        opt(e.environment.clone()),
        opt(e.country.clone()),
        opt(e.version.map(|v| v.to_string())),
        e.outcome.as_str().to_string(),
        e.detail.clone(),
        prev_hash.to_string(),
    ];
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Reads entries with `seq >` the first argument, oldest first, at most the second.
pub type Reader<'a> = &'a mut dyn FnMut(i64, usize) -> super::error::Result<Vec<AuditRecord>>;

/// The expected MACs (hex) of chain hashes, in order: the HSM's, for `walk`.
pub type MacCheck<'a> = &'a mut dyn FnMut(&[String]) -> super::error::Result<Vec<String>>;

/// Where a walk of the chain starts.
pub struct Start {
    /// The first entry to walk; it must exist.
    pub seq: i64,
    /// The hash it must follow; `None`: taken as stored (an anchor pins the entry).
    pub prev: Option<String>,
}

impl Start {
    /// The whole chain, from the genesis.
    pub fn genesis() -> Start {
        Start {
            seq: 1,
            prev: Some(GENESIS.to_string()),
        }
    }
}

/// MACs a walk checks.
pub struct Macs<'a> {
    pub check: MacCheck<'a>,
    /// Entries up to this one may have no MAC (written before entries were MACed), as long
    /// as no entry before them has one; every later entry must have a valid one.
    pub legacy_until: i64,
}

/// What a walk saw.
#[derive(Debug, Default)]
pub struct Walked {
    pub entries: usize,
    pub macs_checked: usize,
    /// Entries from before MACs.
    pub legacy: usize,
}

/// Walks the chain from `from` to its newest entry: each entry follows the one before it,
/// matches its hash and, with `macs`, its MAC. `Ok(walked)`, or `Err((seq, reason))` at the
/// first broken entry.
pub fn walk(
    read: Reader<'_>,
    from: Start,
    mut macs: Option<Macs<'_>>,
) -> super::error::Result<Result<Walked, (i64, String)>> {
    let mut expected_prev = from.prev;
    let mut expected_seq = from.seq;
    let mut since = from.seq - 1;
    let mut walked = Walked::default();
    let mut seen_mac = false;
    loop {
        let batch = read(since, 1000)?;
        if batch.is_empty() {
            if from.seq > 1 && walked.entries == 0 {
                return Ok(Err((from.seq, format!("entry {} is missing", from.seq))));
            }
            return Ok(Ok(walked));
        }
        let expected_macs = match macs.as_mut() {
            Some(m) => {
                let hashes: Vec<String> = batch.iter().map(|r| r.hash.clone()).collect();
                Some((m.check)(&hashes)?)
            }
            None => None,
        };
        for (i, r) in batch.into_iter().enumerate() {
            if r.seq != expected_seq {
                return Ok(Err((
                    expected_seq,
                    format!("entry {expected_seq} is missing (next is {})", r.seq),
                )));
            }
            if expected_prev.as_ref().is_some_and(|p| *p != r.prev_hash) {
                return Ok(Err((
                    r.seq,
                    "prev_hash does not match the entry before".into(),
                )));
            }
            if digest(r.seq, &r.entry, &r.prev_hash) != r.hash {
                return Ok(Err((r.seq, "contents do not match its hash".into())));
            }
            if let (Some(m), Some(expected)) = (macs.as_ref(), expected_macs.as_ref()) {
                match &r.mac {
                    Some(mac) if same_mac(mac, &expected[i]) => {
                        seen_mac = true;
                        walked.macs_checked += 1;
                    }
                    Some(_) => {
                        return Ok(Err((
                            r.seq,
                            "its MAC does not match: the entry was altered (or sealed by another HSM key)".into(),
                        )))
                    }
                    None if seen_mac => {
                        return Ok(Err((
                            r.seq,
                            "it has no MAC, though an entry before it has one".into(),
                        )))
                    }
                    None if r.seq > m.legacy_until => {
                        return Ok(Err((
                            r.seq,
                            "it has no MAC, though it comes after the HSM anchor".into(),
                        )))
                    }
                    None => walked.legacy += 1,
                }
            }
            expected_prev = Some(r.hash);
            expected_seq += 1;
            since = r.seq;
            walked.entries += 1;
        }
    }
}

#[cfg(test)]
mod tests;
