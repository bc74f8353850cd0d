//! The anchor: what the state held at its last commit (the newest audit entry, each key's
//! last version), kept in the HSM where whoever can write the database cannot reach it.
//! A state behind its anchor was cut short or restored from an older copy; a state ahead
//! of it committed a change just before a crash (the anchor is updated after each commit).
//!
//! Stored as `body ‖ HMAC-SHA256(label ‖ body)` under the HSM's audit key, with a counter
//! that grows with every write: of the anchors found, the valid one with the highest
//! counter is the anchor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Length of an HMAC-SHA256 tag (audit entries and anchors).
pub const MAC_LEN: usize = 32;

/// What the state holds now, as an anchor records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHead {
    /// The newest audit entry: 0 and the genesis hash when there is none.
    pub seq: i64,
    pub hash: String,
    /// `(environment, country)` → last version ever made.
    pub keys: BTreeMap<(String, String), u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// Format of the body.
    pub v: u32,
    pub counter: u64,
    pub seq: i64,
    pub hash: String,
    /// `(environment, country, last version)`, ordered.
    pub keys: Vec<(String, String, u32)>,
}

const FORMAT: u32 = 1;

impl Anchor {
    pub fn of(counter: u64, head: &StateHead) -> Anchor {
        Anchor {
            v: FORMAT,
            counter,
            seq: head.seq,
            hash: head.hash.clone(),
            keys: head
                .keys
                .iter()
                .map(|((env, country), v)| (env.clone(), country.clone(), *v))
                .collect(),
        }
    }

    /// The bytes the MAC covers.
    pub fn body(&self) -> crate::domain::error::Result<Vec<u8>> {
        // Strings and numbers only: this cannot fail, but a failure must not write an anchor.
        serde_json::to_vec(self)
            .map_err(|e| crate::domain::error::Error::internal(format!("anchor: {e}")))
    }

    /// The anchor a body holds, if it is one this daemon writes.
    pub fn parse(body: &[u8]) -> Option<Anchor> {
        serde_json::from_slice::<Anchor>(body)
            .ok()
            .filter(|a| a.v == FORMAT)
    }
}

/// What the HSM MACs for an anchor body (entries are MACed under another label).
pub fn mac_input(body: &[u8]) -> Vec<u8> {
    [b"keyd-anchor\0".as_slice(), body].concat()
}

/// The stored form: body, then its MAC.
pub fn sealed(body: &[u8], mac: &[u8; MAC_LEN]) -> Vec<u8> {
    [body, mac.as_slice()].concat()
}

/// Body and MAC of a stored anchor; `None` when it is too short to hold both.
pub fn split(stored: &[u8]) -> Option<(&[u8], &[u8])> {
    (stored.len() > MAC_LEN).then(|| stored.split_at(stored.len() - MAC_LEN))
}

/// The state against its anchor.
#[derive(Debug, PartialEq, Eq)]
pub enum Standing {
    /// Exactly what the anchor holds.
    Level,
    /// Ahead of it (what is newer, for the log).
    Ahead(String),
    /// Behind it: the one line that says what is missing.
    Behind(String),
}

/// How many names a line lists before it says "and N more".
const LIST: usize = 8;

/// Compares the state with its anchor. `hash_at_anchor`: the hash of the state's audit
/// entry at the anchor's sequence (`None`: no such entry).
pub fn compare(anchor: &Anchor, state: &StateHead, hash_at_anchor: Option<&str>) -> Standing {
    let mut missing = Vec::new();
    let mut rewritten = false;
    if state.seq < anchor.seq {
        missing.push(if state.seq + 1 == anchor.seq {
            format!("audit entry {} missing", anchor.seq)
        } else {
            format!("audit entries {}..{} missing", state.seq + 1, anchor.seq)
        });
    } else if anchor.seq > 0 && hash_at_anchor != Some(anchor.hash.as_str()) {
        rewritten = true;
        missing.push(format!(
            "audit entry {} is not the one anchored",
            anchor.seq
        ));
    }
    let mut keys = Vec::new();
    for (env, country, last) in &anchor.keys {
        match state.keys.get(&(env.clone(), country.clone())) {
            None => keys.push(format!("{env}/{country} missing (last version {last})")),
            Some(v) if v < last => keys.push(format!("{env}/{country} last version {v} < {last}")),
            Some(_) => {}
        }
    }
    if keys.len() > LIST {
        let more = keys.len() - LIST;
        keys.truncate(LIST);
        keys.push(format!("and {more} more keys"));
    }
    let cut = !keys.is_empty() || !rewritten;
    missing.extend(keys);
    if !missing.is_empty() {
        let why = if cut {
            "restored from an older backup or truncated"
        } else {
            "the audit log was rewritten, or restored from another copy"
        };
        return Standing::Behind(format!(
            "state is behind the HSM anchor: {} — {why}",
            missing.join("; ")
        ));
    }
    let mut newer = Vec::new();
    if state.seq > anchor.seq {
        newer.push(format!("audit entries {}..{}", anchor.seq + 1, state.seq));
    }
    let anchored: BTreeMap<(&str, &str), u32> = anchor
        .keys
        .iter()
        .map(|(e, c, v)| ((e.as_str(), c.as_str()), *v))
        .collect();
    for ((env, country), v) in &state.keys {
        match anchored.get(&(env.as_str(), country.as_str())) {
            None => newer.push(format!("new key {env}/{country}")),
            Some(a) if a < v => newer.push(format!("{env}/{country} versions {}..{v}", a + 1)),
            Some(_) => {}
        }
    }
    if newer.is_empty() {
        Standing::Level
    } else {
        Standing::Ahead(newer.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: i64, hash: &str, keys: &[(&str, &str, u32)]) -> StateHead {
        StateHead {
            seq,
            hash: hash.into(),
            keys: keys
                .iter()
                .map(|(e, c, v)| ((e.to_string(), c.to_string()), *v))
                .collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_other_bodies() {
        let a = Anchor::of(7, &head(57, "ab", &[("prod", "DE", 9)]));
        let stored = sealed(&a.body().unwrap(), &[1; MAC_LEN]);
        let (body, mac) = split(&stored).unwrap();
        assert_eq!(mac, &[1; MAC_LEN]);
        assert_eq!(Anchor::parse(body), Some(a));
        assert_eq!(Anchor::parse(b"{\"v\":2}"), None);
        assert!(split(&[0; MAC_LEN]).is_none());
    }

    #[test]
    fn behind_names_what_is_missing() {
        let a = Anchor::of(3, &head(57, "h57", &[("prod", "DE", 9), ("prod", "FR", 2)]));
        let s = head(40, "h40", &[("prod", "DE", 7)]);
        assert_eq!(
            compare(&a, &s, None),
            Standing::Behind(
                "state is behind the HSM anchor: audit entries 41..57 missing; prod/DE last version 7 < 9; prod/FR missing (last version 2) — restored from an older backup or truncated".into()
            )
        );
        let s = head(60, "h60", &[("prod", "DE", 9), ("prod", "FR", 2)]);
        let Standing::Behind(line) = compare(&a, &s, Some("other")) else {
            panic!()
        };
        assert!(
            line.contains("audit entry 57 is not the one anchored"),
            "{line}"
        );
        assert!(line.contains("rewritten"), "{line}");
    }

    #[test]
    fn ahead_and_level() {
        let a = Anchor::of(3, &head(5, "h5", &[("prod", "DE", 2)]));
        let s = head(5, "h5", &[("prod", "DE", 2)]);
        assert_eq!(compare(&a, &s, Some("h5")), Standing::Level);
        let s = head(6, "h6", &[("prod", "DE", 3), ("prod", "NL", 1)]);
        assert_eq!(
            compare(&a, &s, Some("h5")),
            Standing::Ahead("audit entries 6..6; prod/DE versions 3..3; new key prod/NL".into())
        );
        // An empty log anchored: anything is level or ahead.
        let a = Anchor::of(1, &head(0, crate::domain::audit::GENESIS, &[]));
        assert_eq!(
            compare(&a, &head(0, crate::domain::audit::GENESIS, &[]), None),
            Standing::Level
        );
    }
}
