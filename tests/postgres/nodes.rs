//! Several nodes on one PostgreSQL state: each node is a `PgStore` of its own (its own
//! connections, as on its own host), all on the same database.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use harness::Postgres;
use incountry_keyd::domain::audit::{self, Actor, AuditEntry, AuditOutcome, Macs, Start};
use incountry_keyd::domain::error::{Error, Result};
use incountry_keyd::domain::{Code, Initiator, KeyId, VersionType};
use incountry_keyd::store::{AuditSeal, Store, StoredTotp, StoredVersion, TotpLimits};
use sha2::{Digest, Sha256};

/// MACs a test can check: SHA-256 of the chain hash under a label.
struct HashSeal;

fn mac_of(hash: &str) -> String {
    hex::encode(Sha256::digest(format!("test-mac:{hash}")))
}

impl AuditSeal for HashSeal {
    fn mac(&self, hash: &str) -> Result<String> {
        Ok(mac_of(hash))
    }
    fn appended(&self, _: &dyn Store) {}
}

fn node(pg: &Postgres, db: &str, name: &str) -> Arc<dyn Store> {
    let s = super::open(pg, db, name).unwrap();
    s.set_audit_seal(Arc::new(HashSeal));
    s
}

fn id(country: &str) -> KeyId {
    KeyId::parse("prod", country).unwrap()
}

fn entry(action: &str) -> AuditEntry {
    AuditEntry::new(1_000, &Actor::Timer, action, None).outcome(AuditOutcome::Ok, action)
}

fn add(s: &dyn Store, key: &KeyId, version: u32) -> Result<()> {
    let v = StoredVersion {
        version,
        kind: VersionType::Managed,
        created: 1_000 + i64::from(version),
        origin: Initiator::Timer,
        iv: [version as u8; 12],
        wrapped: vec![version as u8; 48],
        aws: None,
    };
    s.add_version(key, Some(30), &v, &entry("rotate").version(version))
}

/// The whole chain, every MAC checked: (entries, MACs checked).
fn walk(s: &dyn Store) -> (usize, usize) {
    let mut read = |since, limit| s.audit_since(since, limit);
    let mut check = |hashes: &[String]| Ok(hashes.iter().map(|h| mac_of(h)).collect());
    let macs = Macs {
        check: &mut check,
        legacy_until: 0,
    };
    let w = audit::walk(&mut read, Start::genesis(), Some(macs))
        .unwrap()
        .unwrap();
    (w.entries, w.macs_checked)
}

/// Runs `f` on both nodes at once (released together by a barrier); their results.
fn at_once<T: Send>(
    a: &Arc<dyn Store>,
    b: &Arc<dyn Store>,
    f: impl Fn(&dyn Store) -> T + Sync,
) -> [T; 2] {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let run = |store: &Arc<dyn Store>| {
            let (barrier, f) = (&barrier, &f);
            let store = store.clone();
            s.spawn(move || {
                barrier.wait();
                f(store.as_ref())
            })
        };
        let (ha, hb) = (run(a), run(b));
        [ha.join().unwrap(), hb.join().unwrap()]
    })
}

#[test]
fn two_nodes_racing_for_a_version_number_one_wins() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let (a, b) = (node(&pg, &db, "a"), node(&pg, &db, "b"));
    let de = id("DE");
    // Round 1 creates the key on both nodes at once; each later round adds the same next
    // number on both.
    for number in 1..=20 {
        let results = at_once(&a, &b, |s| add(s, &de, number));
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "version {number}: {results:?}");
        for r in results {
            if let Err(e) = r {
                assert_eq!(e.code(), Code::VersionConflict, "version {number}: {e}");
            }
        }
    }
    // Every number once, with its audit entry, in one chain both nodes read alike.
    let key = b.load_key(&de).unwrap().unwrap();
    let numbers: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (1..=20).collect::<Vec<_>>());
    assert_eq!(walk(a.as_ref()), (20, 20));
    assert_eq!(a.head().unwrap(), b.head().unwrap());
    assert_eq!(
        a.head().unwrap().keys.get(&("prod".into(), "DE".into())),
        Some(&20)
    );
}

#[test]
fn encryption_reservations_from_two_nodes_at_once_add_up() {
    const BLOCK: u64 = 65_536;
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let (a, b) = (node(&pg, &db, "a"), node(&pg, &db, "b"));
    let de = id("DE");
    add(a.as_ref(), &de, 1).unwrap();
    // Both nodes reserve a block at once, again and again: each gets a block of its own (the
    // new totals are all different), and the stored total is the sum of the blocks.
    let mut totals = Vec::new();
    for _ in 0..10 {
        totals.extend(at_once(&a, &b, |s| {
            s.reserve_encryptions(&de, 1, BLOCK).unwrap()
        }));
    }
    totals.sort_unstable();
    assert_eq!(totals, (1..=20).map(|i| i * BLOCK).collect::<Vec<_>>());
    assert_eq!(a.encryptions(&de, 1).unwrap(), 20 * BLOCK);
    assert_eq!(b.encryptions(&de, 1).unwrap(), 20 * BLOCK);
    // A clean stop of one node gives back only the unused part of its last block: what the
    // other node reserved stays counted.
    let unused = i64::try_from(BLOCK - 10).unwrap();
    b.settle_encryptions(&[(de.clone(), 1, -unused)]).unwrap();
    assert_eq!(a.encryptions(&de, 1).unwrap(), 19 * BLOCK + 10);
    // A version the state does not have is an error.
    assert!(a.reserve_encryptions(&de, 2, BLOCK).is_err());
}

#[test]
fn audit_entries_from_two_nodes_at_once_form_one_chain() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let (a, b) = (node(&pg, &db, "a"), node(&pg, &db, "b"));
    // Each node: refusals and versions of its own key, interleaved, as fast as it can.
    let keys = [id("DE"), id("FR")];
    let next = AtomicUsize::new(0);
    at_once(&a, &b, |s| {
        let key = &keys[next.fetch_add(1, Ordering::SeqCst)];
        for i in 1..=15u32 {
            s.audit(&entry("refused")).unwrap();
            add(s, key, i).unwrap();
        }
    });
    assert_eq!(walk(b.as_ref()), (60, 60));
    let records = a.audit_since(0, 100).unwrap();
    for pair in records.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    let head = a.head().unwrap();
    assert_eq!((head.seq, &head.hash), (60, &records[59].hash));
}

fn wrong(s: &dyn Store, uid: u32, now: i64) -> std::result::Result<Option<i64>, i64> {
    s.totp_attempt_begin(uid, now, LIMITS).unwrap()?;
    Ok(s.totp_attempt_failed(uid, now, LIMITS).unwrap())
}

const LIMITS: TotpLimits = TotpLimits {
    max_failures: 5,
    window: 300,
    lockout: 300,
};

#[test]
fn totp_failures_locks_and_used_steps_hold_on_every_node() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let (a, b) = (node(&pg, &db, "a"), node(&pg, &db, "b"));
    let t = 1_000_000;
    let secret = StoredTotp {
        iv: [4; 12],
        sealed: vec![5; 36],
        last_step: 0,
    };
    a.totp_put(9, &secret, t, &entry("totp-enroll")).unwrap();
    // Failures on both nodes add up; the fifth locks the uid on both.
    for (i, s) in [&a, &b, &a, &b].into_iter().enumerate() {
        assert_eq!(wrong(s.as_ref(), 9, t + i as i64), Ok(None));
    }
    assert_eq!(wrong(a.as_ref(), 9, t + 4), Ok(Some(t + 304)));
    assert_eq!(b.totp_locked_until(9, t + 5).unwrap(), Some(t + 304));
    assert_eq!(wrong(b.as_ref(), 9, t + 5), Err(t + 304));
    // Attempts begun on both at once are both counted (10 attempts, 2 windows' worth).
    a.totp_put(10, &secret, t, &entry("totp-enroll")).unwrap();
    for _ in 0..2 {
        let begun = at_once(&a, &b, |s| s.totp_attempt_begin(10, t, LIMITS).unwrap());
        assert_eq!(begun, [Ok(()), Ok(())]);
    }
    // A code used on one node is refused on the other (a replay stays counted).
    assert!(a.totp_attempt_passed(10, 100).unwrap());
    assert!(!b.totp_attempt_passed(10, 100).unwrap());
    // The same code checked on both at once passes once.
    let passed = at_once(&a, &b, |s| s.totp_attempt_passed(10, 101).unwrap());
    assert_eq!(passed.iter().filter(|p| **p).count(), 1, "{passed:?}");
    // 4 begun, 2 taken back by the passes: 2 failures + 3 more lock it.
    for i in 0..2 {
        assert_eq!(wrong(b.as_ref(), 10, t + i), Ok(None));
    }
    assert_eq!(wrong(a.as_ref(), 10, t + 2), Ok(Some(t + 302)));
}

#[test]
fn nodes_starting_at_once_migrate_once_and_exclusive_sections_never_overlap() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let barrier = Barrier::new(4);
    let stores: Vec<Arc<dyn Store>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (barrier, pg, db) = (&barrier, &pg, &db);
                s.spawn(move || {
                    barrier.wait();
                    super::open(pg, db, &format!("n{i}")).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // One schema row, at a version (not hardcoded: migrations are added over time).
    assert_eq!(
        pg.sql(
            &db,
            "SELECT count(*) = 1 AND min(version) > 0 FROM keyd_schema"
        ),
        "t"
    );
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM audit_head"), "1");
    let inside = AtomicBool::new(false);
    let entered = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for store in &stores {
            let (inside, entered) = (&inside, &entered);
            s.spawn(move || {
                store
                    .exclusive(&mut || {
                        assert!(!inside.swap(true, Ordering::SeqCst), "two sections at once");
                        std::thread::sleep(Duration::from_millis(50));
                        inside.store(false, Ordering::SeqCst);
                        entered.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .unwrap();
            });
        }
    });
    assert_eq!(entered.load(Ordering::SeqCst), 4);
}

#[test]
fn an_outage_refuses_changes_as_unavailable_until_postgres_is_back() {
    let mut pg = Postgres::init();
    let db = pg.database("keyd");
    let a = node(&pg, &db, "a");
    let de = id("DE");
    add(a.as_ref(), &de, 1).unwrap();
    assert_eq!(a.unavailable(), None);
    pg.stop();
    let password = std::fs::read_to_string(pg.password_file()).unwrap();
    let e = add(a.as_ref(), &de, 2).unwrap_err();
    assert!(
        matches!(e, Error::Unavailable { code: Code::StateUnavailable, retry_after, .. } if retry_after > 0),
        "{e:?}"
    );
    assert!(!e.to_string().contains(password.trim()));
    let reason = a
        .unavailable()
        .expect("unavailable while PostgreSQL is down");
    assert!(reason.contains("PostgreSQL"), "{reason}");
    assert_eq!(
        a.load_all().map(drop).unwrap_err().code(),
        Code::StateUnavailable
    );
    assert_eq!(
        a.totp_attempt_begin(1, 0, LIMITS)
            .map(drop)
            .unwrap_err()
            .code(),
        Code::StateUnavailable
    );
    pg.start();
    // The next operation connects again; nothing of the refused change was kept.
    add(a.as_ref(), &de, 2).unwrap();
    assert_eq!(a.unavailable(), None);
    assert_eq!(walk(a.as_ref()), (2, 2));
}

#[test]
fn a_wrong_password_is_refused_without_being_repeated() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let wrong = pg.tmp.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password-4711\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let right = super::config(&pg, &db, "a");
    let mut config = right.clone();
    config.postgres.password_file = Some(wrong);
    let e = incountry_keyd::store::Opener::new(&config, None)
        .unwrap()
        .open()
        .map(drop)
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("4711"), "{e}");
    // A password file others can read is refused before any connection.
    std::fs::set_permissions(
        pg.password_file(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let e = incountry_keyd::store::Opener::new(&right, None)
        .map(drop)
        .unwrap_err();
    assert!(format!("{e:#}").contains("chmod 0600"), "{e:#}");
}
