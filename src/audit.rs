//! The audit log: one entry per admin action and per refusal, each carrying the SHA-256 of
//! the entry before it, so that changing or removing a row breaks the chain. Entries hold
//! who, what, which key and the outcome — never key material or codes.

use rusqlite::Connection;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::Peer;
use crate::keyring::KeyId;

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
    pub fn of(peer: &Peer) -> Actor {
        Actor::Peer {
            uid: peer.uid,
            gid: peer.gid,
            pid: peer.pid,
        }
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
    /// "ok", "refused" or "failed".
    pub outcome: String,
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
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    pub fn outcome(mut self, outcome: &str, detail: impl Into<String>) -> Self {
        self.outcome = outcome.to_string();
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
}

impl AuditRecord {
    pub fn chain(seq: i64, entry: AuditEntry, prev_hash: String) -> AuditRecord {
        let hash = digest(seq, &entry, &prev_hash);
        AuditRecord {
            seq,
            entry,
            prev_hash,
            hash,
        }
    }
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
        e.outcome.clone(),
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

/// Walks the whole chain. `Ok(count)`, or `Err((seq, reason))` at the first broken entry.
pub fn verify(conn: &Connection) -> crate::error::Result<Result<usize, (i64, String)>> {
    let mut expected_prev = GENESIS.to_string();
    let mut expected_seq = 1;
    let mut count = 0;
    let mut since = 0;
    loop {
        let batch = crate::store::read_audit(conn, since, 1000)?;
        if batch.is_empty() {
            return Ok(Ok(count));
        }
        for r in batch {
            if r.seq != expected_seq {
                return Ok(Err((
                    expected_seq,
                    format!("entry {expected_seq} is missing (next is {})", r.seq),
                )));
            }
            if r.prev_hash != expected_prev {
                return Ok(Err((
                    r.seq,
                    "prev_hash does not match the entry before".into(),
                )));
            }
            if digest(r.seq, &r.entry, &r.prev_hash) != r.hash {
                return Ok(Err((r.seq, "contents do not match its hash".into())));
            }
            expected_prev = r.hash;
            expected_seq += 1;
            since = r.seq;
            count += 1;
        }
    }
}
