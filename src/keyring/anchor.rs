//! The audit seal and the HSM anchor: every audit entry is MACed in the HSM (HMAC-SHA256
//! under `AUDIT_MAC_KEY`, a key that never leaves it) inside its transaction, and after
//! each commit that appended entries the anchor (the newest entry and each key's last
//! version, MACed too) is written to the HSM, alternating between its two slots.
//!
//! At start (`open`) the state is compared with the anchor: behind it is refused with one
//! line naming what is missing; ahead of it (a crash between a commit and its anchor
//! update) is accepted once the entries after the anchor pass their MACs, and the anchor
//! is caught up. `verify` is the full check of `audit verify`, read-only.
//!
//! A state several nodes write (PostgreSQL: `Store::anchored` is false) has no anchor: its
//! head moves on other nodes, whose anchors would fight over the HSM's slots. Entries are
//! still MACed; at start and in `audit verify` the whole chain must be intact and every
//! entry must pass its MAC. A database restored from an older backup is not detected
//! there (the operator's PostgreSQL is trusted for that).

use std::sync::{Arc, Mutex};

use crate::domain::audit::anchor::{self as anchor_fmt, compare, Anchor, Standing, StateHead};
use crate::domain::audit::{self, entry_mac_input, same_mac, Macs, Start};
use crate::domain::error::{Error, Result};
use crate::hsm::{HsmError, HsmWorker, ANCHOR_SLOTS, MAC_LEN};
use crate::store::{AuditSeal, Store};

/// Label of the HSM key that MACs audit entries and anchors.
pub const AUDIT_MAC_KEY: &str = "keyd-system/audit-mac";

/// MACs audit entries and keeps the anchor; one writer of anchors at a time.
pub struct Sealer {
    hsm: HsmWorker,
    /// `None`: a shared state, not anchored.
    written: Option<Mutex<Written>>,
}

/// The last anchor written (or found level with the state).
struct Written {
    counter: u64,
    head: StateHead,
}

impl AuditSeal for Sealer {
    fn mac(&self, hash: &str) -> Result<String> {
        let input = entry_mac_input(hash);
        let tag = self
            .hsm
            .call_blocking(move |h| h.mac(AUDIT_MAC_KEY, &input))?;
        Ok(hex::encode(tag))
    }

    fn appended(&self, store: &dyn Store) {
        if let Err(e) = self.update(store) {
            tracing::warn!(
                error = %e,
                "HSM anchor not updated after a change: it lags the state until the next change or start, which accept a state ahead of it"
            );
        }
    }
}

impl Sealer {
    /// Writes an anchor of the state as it is now, unless the last one already says so.
    fn update(&self, store: &dyn Store) -> Result<()> {
        let Some(written) = &self.written else {
            return Ok(());
        };
        let mut written = written.lock().unwrap_or_else(|p| p.into_inner());
        let head = store.head()?;
        if head == written.head {
            return Ok(());
        }
        // Never move the anchor back (the hash is not compared: entries only grow).
        let last = Anchor::of(written.counter, &written.head);
        if let Standing::Behind(line) = compare(&last, &head, Some(&last.hash)) {
            return Err(Error::integrity(format!(
                "the state went back while the daemon ran; anchor left as it was: {line}"
            )));
        }
        let counter = written.counter + 1;
        write(&self.hsm, counter, &head)?;
        *written = Written { counter, head };
        Ok(())
    }
}

/// Writes anchor `counter` of `head` to its slot.
fn write(hsm: &HsmWorker, counter: u64, head: &StateHead) -> Result<()> {
    let body = Anchor::of(counter, head).body()?;
    let slot = (counter % ANCHOR_SLOTS as u64) as usize;
    hsm.call_blocking(move |h| {
        let tag = h.mac(AUDIT_MAC_KEY, &anchor_fmt::mac_input(&body))?;
        h.write_anchor(slot, &anchor_fmt::sealed(&body, &tag))
    })?;
    Ok(())
}

/// The MAC key: made only when nothing was ever MACed (`create`); otherwise it must exist.
fn ensure_key(hsm: &HsmWorker, create: bool) -> Result<()> {
    match hsm.call_blocking(move |h| h.ensure_mac_key(AUDIT_MAC_KEY, create)) {
        Ok(true) => {
            tracing::info!(label = AUDIT_MAC_KEY, "made the HSM key that MACs the audit log");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(HsmError::RootKeyMissing(_)) => Err(Error::integrity(format!(
            "the HSM has no audit MAC key `{AUDIT_MAC_KEY}`, though it holds anchors or the audit log has MACed entries: this is not the token the state was written with, or the key was removed"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The valid anchor with the highest counter, and how many stored ones failed their MAC
/// (or do not parse).
fn authenticate(hsm: &HsmWorker, stored: Vec<Vec<u8>>) -> Result<(Option<Anchor>, usize)> {
    let checked: Vec<Option<Anchor>> = hsm.call_blocking(move |h| {
        stored
            .iter()
            .map(|s| {
                let Some((body, tag)) = anchor_fmt::split(s) else {
                    return Ok(None);
                };
                let expected = h.mac(AUDIT_MAC_KEY, &anchor_fmt::mac_input(body))?;
                Ok(same_mac(&hex::encode(tag), &hex::encode(expected))
                    .then(|| Anchor::parse(body))
                    .flatten())
            })
            .collect()
    })?;
    let spoiled = checked.iter().filter(|a| a.is_none()).count();
    let best = checked
        .into_iter()
        .flatten()
        .max_by_key(|a| (a.counter, a.seq));
    Ok((best, spoiled))
}

/// The expected MACs of chain hashes, computed in the HSM one batch per job.
fn mac_check(hsm: &HsmWorker) -> impl FnMut(&[String]) -> Result<Vec<String>> + '_ {
    move |hashes| {
        let inputs: Vec<Vec<u8>> = hashes.iter().map(|h| entry_mac_input(h)).collect();
        let tags: Vec<[u8; MAC_LEN]> = hsm.call_blocking(move |h| {
            inputs
                .iter()
                .map(|i| h.mac(AUDIT_MAC_KEY, i))
                .collect::<std::result::Result<_, _>>()
        })?;
        Ok(tags.iter().map(hex::encode).collect())
    }
}

/// At start, with the state lock held and before any entry is appended: checks the state
/// against the anchor, catches the anchor up (or writes the first one) and installs the
/// seal. Blocking.
pub fn open(store: &dyn Store, hsm: &HsmWorker) -> Result<Arc<Sealer>> {
    if !store.anchored() {
        return open_shared(store, hsm);
    }
    let stored = hsm.call_blocking(|h| h.read_anchors())?;
    let has_macs = store.audit_has_macs()?;
    let head = store.head()?;
    ensure_key(hsm, stored.is_empty() && !has_macs)?;
    let found = stored.len();
    let (best, spoiled) = authenticate(hsm, stored)?;
    if spoiled > 0 {
        tracing::warn!(
            spoiled,
            found,
            "passing over HSM anchor objects that fail their MAC check (a write cut short by a kill)"
        );
    }
    let counter = match best {
        None if has_macs => {
            return Err(Error::integrity(
                "the audit log has MACed entries but the HSM holds no valid anchor: its anchor objects were removed, or this is not the token the state was written with",
            ))
        }
        None => {
            write(hsm, 1, &head)?;
            tracing::info!(
                seq = head.seq,
                keys = head.keys.len(),
                "no HSM anchor yet (a new install, or the first start of a version with anchors): wrote one"
            );
            1
        }
        Some(anchor) => {
            let hash_at = store.audit_hash_at(anchor.seq)?;
            let standing = compare(&anchor, &head, hash_at.as_deref());
            if let Standing::Behind(line) = standing {
                return Err(Error::integrity(line));
            }
            check_since(store, hsm, &anchor)?;
            match standing {
                Standing::Ahead(what) => {
                    write(hsm, anchor.counter + 1, &head)?;
                    tracing::warn!(
                        "state is ahead of the HSM anchor ({what}): committed just before the daemon stopped without updating the anchor; its entries pass their MACs; anchor caught up"
                    );
                    anchor.counter + 1
                }
                _ => anchor.counter,
            }
        }
    };
    let sealer = Arc::new(Sealer {
        hsm: hsm.clone(),
        written: Some(Mutex::new(Written { counter, head })),
    });
    store.set_audit_seal(sealer.clone());
    Ok(sealer)
}

/// `open` for a shared state: the audit key made by the first node only (under the state's
/// exclusive lock, so that two nodes starting at once do not make two), then the whole
/// chain checked, every entry with its MAC.
fn open_shared(store: &dyn Store, hsm: &HsmWorker) -> Result<Arc<Sealer>> {
    store.exclusive(&mut || ensure_key(hsm, !store.audit_has_macs()?))?;
    if let Err((seq, why)) = walk_shared(store, hsm)? {
        return Err(Error::integrity(format!(
            "audit log entry {seq} fails its check: {why} (see `incountry-keyd audit verify`)"
        )));
    }
    let sealer = Arc::new(Sealer {
        hsm: hsm.clone(),
        written: None,
    });
    store.set_audit_seal(sealer.clone());
    Ok(sealer)
}

/// The chain of a shared state from the genesis, every entry with its MAC.
fn walk_shared(
    store: &dyn Store,
    hsm: &HsmWorker,
) -> Result<std::result::Result<audit::Walked, (i64, String)>> {
    let mut read = |since, limit| store.audit_since(since, limit);
    let mut check = mac_check(hsm);
    let macs = Macs {
        check: &mut check,
        legacy_until: 0,
    };
    audit::walk(&mut read, Start::genesis(), Some(macs))
}

/// The anchored entry and every one after it: chained, and MACed by this HSM.
fn check_since(store: &dyn Store, hsm: &HsmWorker, anchor: &Anchor) -> Result<()> {
    let start = match anchor.seq {
        0 => Start::genesis(),
        seq => Start { seq, prev: None },
    };
    let mut read = |since, limit| store.audit_since(since, limit);
    let mut check = mac_check(hsm);
    let macs = Macs {
        check: &mut check,
        legacy_until: anchor.seq,
    };
    match audit::walk(&mut read, start, Some(macs))? {
        Ok(_) => Ok(()),
        Err((seq, why)) => Err(Error::integrity(format!(
            "audit log entry {seq} fails its check: {why} (see `incountry-keyd audit verify`)"
        ))),
    }
}

/// `Keyring::load`'s call of `open`, off the runtime.
pub(super) async fn open_async(store: Arc<dyn Store>, hsm: HsmWorker) -> Result<()> {
    tokio::task::spawn_blocking(move || open(store.as_ref(), &hsm).map(|_| ()))
        .await
        .map_err(|e| Error::internal(format!("anchor check: {e}")))?
}

/// The outcome of `verify`: one line for the operator.
pub enum Verdict {
    Intact(String),
    Broken(String),
}

/// `audit verify` with the HSM: the whole chain, every MAC, and the state against the
/// anchor. Read-only (neither the anchor nor the MAC key is written). The anchor is read
/// before the state, so a daemon committing meanwhile only puts the state ahead.
pub fn verify(store: &dyn Store, hsm: &HsmWorker) -> Result<Verdict> {
    if !store.anchored() {
        if store.audit_has_macs()? {
            ensure_key(hsm, false)?;
        }
        return Ok(match walk_shared(store, hsm)? {
            Ok(w) => Verdict::Intact(format!(
                "{} audit entries, chain and {} MACs intact; shared PostgreSQL state: no HSM anchor (a database restored from an older backup is not detected here)",
                w.entries, w.macs_checked
            )),
            Err((seq, why)) => Verdict::Broken(format!("BROKEN at sequence {seq}: {why}")),
        });
    }
    let stored = hsm.call_blocking(|h| h.read_anchors())?;
    let has_macs = store.audit_has_macs()?;
    let head = store.head()?;
    let mut read = |since, limit| store.audit_since(since, limit);
    if stored.is_empty() && !has_macs {
        return Ok(match audit::walk(&mut read, Start::genesis(), None)? {
            Ok(w) => Verdict::Intact(format!(
                "{} audit entries, chain intact; no MACs and no HSM anchor yet (the daemon writes them from its next start)",
                w.entries
            )),
            Err((seq, why)) => Verdict::Broken(format!("BROKEN at sequence {seq}: {why}")),
        });
    }
    ensure_key(hsm, false)?;
    let (best, spoiled) = authenticate(hsm, stored)?;
    let Some(anchor) = best else {
        let found = match spoiled {
            0 => "the HSM holds no anchor".to_string(),
            n => format!("none of the {n} HSM anchor objects passes its MAC check"),
        };
        return Ok(Verdict::Broken(format!(
            "NO ANCHOR: the audit log has MACed entries, but {found}: its anchor objects were removed, or this is not the token the state was written with"
        )));
    };
    let mut check = mac_check(hsm);
    let macs = Macs {
        check: &mut check,
        legacy_until: anchor.seq,
    };
    let walked = match audit::walk(&mut read, Start::genesis(), Some(macs))? {
        Ok(w) => w,
        Err((seq, why)) => return Ok(Verdict::Broken(format!("BROKEN at sequence {seq}: {why}"))),
    };
    let hash_at = store.audit_hash_at(anchor.seq)?;
    let legacy = match walked.legacy {
        0 => String::new(),
        n => format!(" ({n} older entries from before MACs)"),
    };
    let done = format!(
        "{} audit entries, chain and {} MACs intact{legacy}",
        walked.entries, walked.macs_checked
    );
    Ok(match compare(&anchor, &head, hash_at.as_deref()) {
        Standing::Behind(line) => Verdict::Broken(format!("BEHIND: {line}")),
        Standing::Level => Verdict::Intact(format!(
            "{done}; the state matches the HSM anchor (counter {}, audit entry {})",
            anchor.counter, anchor.seq
        )),
        Standing::Ahead(what) => Verdict::Intact(format!(
            "{done}; the state is ahead of the HSM anchor ({what}): committed after it was written; the daemon catches it up"
        )),
    })
}
