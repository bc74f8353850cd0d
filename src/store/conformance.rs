//! The `Store` contract, as tests any backend runs: version numbering and conflicts, aws
//! versions, the audit chain across a reopen, read-only stores, TOTP attempts and lockout.
//! `store::tests` runs them on SQLite, `tests/postgres` on PostgreSQL; each case takes a
//! fresh, empty state.

// Test code (unit tests, test-clock builds): a failed expectation panics.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod copy;

pub use copy::{
    a_state_copies_whole_into_an_empty_one, aws_refusals_are_recorded_kept_and_cleared,
};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{
    AuditSeal, SealedCheck, Store, StoredAws, StoredTotp, StoredVersion, TestSeal, TotpLimits,
};
use crate::domain::audit::{self, Actor, AuditEntry, AuditOutcome, Start};
use crate::domain::error::Result;
use crate::domain::{Code, Initiator, KeyId, VersionType};

/// A state to test: each call opens a store on the same state (the previous one dropped).
pub trait Backend {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>>;
    fn open_read_only(&self) -> anyhow::Result<Arc<dyn Store>>;
}

const LIMITS: TotpLimits = TotpLimits {
    max_failures: 5,
    window: 300,
    lockout: 300,
};

/// A store on the backend's state, sealing entries with a fixed MAC.
fn open(b: &dyn Backend) -> Arc<dyn Store> {
    let s = b.open().unwrap();
    s.set_audit_seal(Arc::new(TestSeal));
    s
}

fn id(country: &str) -> KeyId {
    KeyId::parse("prod", country).unwrap()
}

fn managed(version: u32) -> StoredVersion {
    StoredVersion {
        version,
        kind: VersionType::Managed,
        created: 1_000 + i64::from(version),
        origin: Initiator::Admin,
        iv: [version as u8; 12],
        wrapped: vec![version as u8; 48],
        aws: None,
    }
}

fn entry(action: &str, key: Option<&KeyId>) -> AuditEntry {
    AuditEntry::new(1_000, &Actor::Timer, action, key).outcome(AuditOutcome::Ok, action)
}

fn add(s: &dyn Store, key: &KeyId, version: u32) -> Result<()> {
    s.add_version(
        key,
        Some(30),
        &managed(version),
        &entry("rotate", Some(key)).version(version),
    )
}

/// Every audit entry, checked as a chain from genesis; how many there are.
fn walk(s: &dyn Store) -> usize {
    let mut read = |since, limit| s.audit_since(since, limit);
    audit::walk(&mut read, Start::genesis(), None)
        .unwrap()
        .unwrap()
        .entries
}

pub fn versions_follow_on_and_a_conflicting_insert_is_refused_whole(b: &dyn Backend) {
    let s = open(b);
    let de = id("DE");
    // A new key starts at 1.
    let e = add(s.as_ref(), &de, 2).unwrap_err();
    assert_eq!(e.code(), Code::VersionConflict);
    add(s.as_ref(), &de, 1).unwrap();
    // Two writers that both picked 2: the second is refused, as is a gap.
    add(s.as_ref(), &de, 2).unwrap();
    for v in [2, 1, 4] {
        let e = add(s.as_ref(), &de, v).unwrap_err();
        assert_eq!(e.code(), Code::VersionConflict, "version {v}");
    }
    // A refused version leaves nothing behind: no row, no audit entry.
    assert_eq!(walk(s.as_ref()), 2);
    let key = s.load_key(&de).unwrap().unwrap();
    let versions: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(key.created, 1_001);
    assert_eq!(key.versions[1].wrapped, vec![2; 48]);
    assert!(s.load_key(&id("FR")).unwrap().is_none());
    // Settings of a key that does not exist are refused.
    let e = s
        .set_rotation_period(&id("FR"), Some(60), &entry("settings", None))
        .unwrap_err();
    assert_eq!(e.code(), Code::KeyNotFound);
    s.set_rotation_period(&de, Some(60), &entry("settings", Some(&de)))
        .unwrap();
    // The head names each key's last version; load_all sees what load_key sees.
    let head = s.head().unwrap();
    assert_eq!(head.keys.get(&("prod".into(), "DE".into())), Some(&2));
    assert_eq!(head.seq, 3);
    let all = s.load_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].rotation_period_days, Some(60));
}

pub fn aws_versions_keep_their_kms_details_and_seals(b: &dyn Backend) {
    let s = open(b);
    let de = id("DE");
    let v = StoredVersion {
        kind: VersionType::Aws,
        aws: Some(StoredAws {
            region: "eu-central-1".into(),
            encrypted_key: vec![7; 20],
            cmk_arn: "arn:aws:kms:eu-central-1:111122223333:key/k".into(),
            access_key_id: "AKIAEXAMPLE".into(),
            check: Some(SealedCheck {
                iv: [9; 12],
                sealed: vec![8; 24],
            }),
            refusal: None,
        }),
        ..managed(1)
    };
    s.add_version(&de, None, &v, &entry("create", Some(&de)))
        .unwrap();
    let loaded = s.load_key(&de).unwrap().unwrap();
    let aws = loaded.versions[0].aws.as_ref().unwrap();
    assert_eq!(aws.region, "eu-central-1");
    assert_eq!(aws.encrypted_key, vec![7; 20]);
    assert_eq!(aws.check.as_ref().unwrap().sealed, vec![8; 24]);
    let seals = s.aws_seals(&de, 1).unwrap().unwrap();
    assert_eq!((seals.secret_iv, seals.secret), ([1; 12], vec![1; 48]));
    assert_eq!(seals.check.unwrap().iv, [9; 12]);
    assert!(s.aws_seals(&de, 2).unwrap().is_none());
}

/// Counts the commits it is told about.
#[derive(Default)]
struct CountingSeal(AtomicUsize);

impl AuditSeal for CountingSeal {
    fn mac(&self, _: &str) -> Result<String> {
        Ok("11".repeat(audit::MAC_LEN))
    }
    fn appended(&self, store: &dyn Store) {
        // Called with the state free again: it may read it (the anchor does).
        store.head().unwrap();
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn the_audit_chain_holds_across_a_reopen(b: &dyn Backend) {
    let de = id("DE");
    {
        let s = b.open().unwrap();
        // No seal yet: nothing is appended, and the change it goes with is not made.
        assert!(s.audit(&entry("refused", None)).is_err());
        assert!(add(s.as_ref(), &de, 1).is_err());
        assert!(s.load_all().unwrap().is_empty());
        assert!(!s.audit_has_macs().unwrap());
        let seal = Arc::new(CountingSeal::default());
        s.set_audit_seal(seal.clone());
        s.audit(&entry("refused", None)).unwrap();
        add(s.as_ref(), &de, 1).unwrap();
        // A refused change tells the seal nothing; writes without entries neither.
        assert!(add(s.as_ref(), &de, 1).is_err());
        assert_eq!(s.reserve_encryptions(&de, 1, 10).unwrap(), 10);
        assert_eq!(seal.0.load(Ordering::SeqCst), 2);
    }
    let s = open(b);
    assert!(s.audit_has_macs().unwrap());
    s.audit(&entry("refused", None)).unwrap();
    add(s.as_ref(), &de, 2).unwrap();
    assert_eq!(walk(s.as_ref()), 4);
    let records = s.audit_since(0, 100).unwrap();
    assert_eq!(records[0].prev_hash, audit::GENESIS);
    for pair in records.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert_eq!(records[3].entry.version, Some(2));
    assert_eq!(records[1].mac.as_deref(), Some("11".repeat(32).as_str()));
    assert_eq!(records[2].mac.as_deref(), Some("00".repeat(32).as_str()));
    // The head and the hash at a sequence agree with what was read.
    let head = s.head().unwrap();
    assert_eq!(
        (head.seq, head.hash.as_str()),
        (4, records[3].hash.as_str())
    );
    assert_eq!(
        s.audit_hash_at(2).unwrap().as_deref(),
        Some(records[1].hash.as_str())
    );
    assert_eq!(s.audit_hash_at(5).unwrap(), None);
    // Reading since and with a limit.
    let page = s.audit_since(1, 2).unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
}

pub fn a_read_only_store_reads_beside_the_daemon_and_refuses_writes(b: &dyn Backend) {
    assert!(b.open_read_only().is_err());
    let daemon = open(b);
    let de = id("DE");
    add(daemon.as_ref(), &de, 1).unwrap();
    let r = b.open_read_only().unwrap();
    r.set_audit_seal(Arc::new(TestSeal));
    assert_eq!(r.load_all().unwrap().len(), 1);
    assert_eq!(walk(r.as_ref()), 1);
    assert_eq!(r.head().unwrap(), daemon.head().unwrap());
    let refused = [
        r.audit(&entry("refused", None)).map(drop),
        add(r.as_ref(), &de, 2),
        r.reserve_encryptions(&de, 1, 5).map(drop),
        r.settle_encryptions(&[(de.clone(), 1, 5)]),
        r.totp_attempt_begin(1, 0, LIMITS).map(drop),
        r.totp_attempt_withdraw(1),
    ];
    for e in refused {
        assert_eq!(e.unwrap_err().code(), Code::InternalError);
    }
    // Not a fault of the disk, and nothing changed.
    assert_eq!(r.unavailable(), None);
    assert_eq!(walk(daemon.as_ref()), 1);
    assert_eq!(daemon.encryptions(&de, 1).unwrap(), 0);
}

fn wrong(s: &dyn Store, uid: u32, now: i64) -> std::result::Result<Option<i64>, i64> {
    s.totp_attempt_begin(uid, now, LIMITS).unwrap()?;
    Ok(s.totp_attempt_failed(uid, now, LIMITS).unwrap())
}

pub fn counts_before_the_check_locks_at_five_and_survives_a_reopen(b: &dyn Backend) {
    let s = open(b);
    let t = 1_000_000;
    for i in 0..4 {
        assert_eq!(wrong(s.as_ref(), 7, t + i), Ok(None));
    }
    // The fifth wrong code locks the uid; another uid is not affected.
    assert_eq!(wrong(s.as_ref(), 7, t + 4), Ok(Some(t + 4 + 300)));
    assert_eq!(wrong(s.as_ref(), 7, t + 5), Err(t + 304));
    assert_eq!(wrong(s.as_ref(), 8, t + 5), Ok(None));
    assert_eq!(s.totp_locked_until(7, t + 5).unwrap(), Some(t + 304));
    // A restart keeps the lock.
    drop(s);
    let s = open(b);
    assert_eq!(s.totp_locked_until(7, t + 303).unwrap(), Some(t + 304));
    assert_eq!(wrong(s.as_ref(), 7, t + 303), Err(t + 304));
    assert_eq!(s.totp_locked_until(7, t + 304).unwrap(), None);
    assert_eq!(wrong(s.as_ref(), 7, t + 304), Ok(None));
}

pub fn abandoned_checks_count_and_withdrawn_ones_do_not(b: &dyn Backend) {
    let s = open(b);
    let t = 2_000_000;
    // Five attempts begun and never settled (requests dropped mid-check): the sixth is
    // refused and locks.
    for _ in 0..5 {
        s.totp_attempt_begin(1, t, LIMITS).unwrap().unwrap();
    }
    assert_eq!(s.totp_attempt_begin(1, t, LIMITS).unwrap(), Err(t + 300));
    // Attempts taken back (HSM failures, right codes) never add up to a lock.
    for _ in 0..20 {
        s.totp_attempt_begin(2, t, LIMITS).unwrap().unwrap();
        s.totp_attempt_withdraw(2).unwrap();
    }
    assert_eq!(s.totp_locked_until(2, t).unwrap(), None);
    // Failures older than the window are forgotten.
    for i in 0..4 {
        assert_eq!(wrong(s.as_ref(), 3, t + i), Ok(None));
    }
    assert_eq!(wrong(s.as_ref(), 3, t + 300), Ok(None));
}

pub fn secrets_used_steps_and_failures_persist_until_a_reset(b: &dyn Backend) {
    let t = 3_000_000;
    {
        let s = open(b);
        let secret = StoredTotp {
            iv: [4; 12],
            sealed: vec![5; 36],
            last_step: 0,
        };
        s.totp_put(9, &secret, t, &entry("totp-enroll", None))
            .unwrap();
        s.totp_attempt_begin(9, t, LIMITS).unwrap().unwrap();
        assert!(s.totp_attempt_passed(9, 100).unwrap());
        for i in 0..3 {
            assert_eq!(wrong(s.as_ref(), 9, t + i), Ok(None));
        }
    }
    let s = open(b);
    assert_eq!(s.totp_count().unwrap(), 1);
    let stored = s.totp_get(9).unwrap().unwrap();
    assert_eq!(
        (stored.iv, stored.sealed, stored.last_step),
        ([4; 12], vec![5; 36], 100)
    );
    // The used step is refused after the restart (a replay stays counted); a later one
    // passes. With the 3 failures before and the replay, the next wrong code locks.
    s.totp_attempt_begin(9, t + 3, LIMITS).unwrap().unwrap();
    assert!(!s.totp_attempt_passed(9, 100).unwrap());
    s.totp_attempt_begin(9, t + 3, LIMITS).unwrap().unwrap();
    assert!(s.totp_attempt_passed(9, 101).unwrap());
    assert_eq!(wrong(s.as_ref(), 9, t + 4), Ok(Some(t + 304)));
    // A reset removes the secret and its lock, and is audited even for a uid without one.
    assert!(s.totp_delete(9, &entry("totp-reset", None)).unwrap());
    assert!(!s.totp_delete(9, &entry("totp-reset", None)).unwrap());
    assert!(s.totp_get(9).unwrap().is_none());
    assert_eq!(s.totp_locked_until(9, t + 5).unwrap(), None);
    assert_eq!(s.totp_count().unwrap(), 0);
    assert_eq!(walk(s.as_ref()), 3);
}
