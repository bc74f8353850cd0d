//! Unit tests of the keyring over the fake HSM and KMS with a manual clock: the limits on
//! new versions, rotation periods, wrapped keys bound to their slot, a missing root key and
//! an HSM outage.

use super::fixture::{admin, aws_ref, id, timer, Fixture, DAY, T0};
use super::KeySource;
use crate::domain::limits::check_period;
use crate::domain::{Code, Error, KeyId};
use crate::hsm::HsmError;

/// The data key a version serves, or `None` while it is unavailable.
fn served(fx: &Fixture, id: &KeyId, version: u32) -> Option<[u8; 32]> {
    let key = fx.keyring.key(id).unwrap();
    key.version(version)?.key().map(|k| *k.expose())
}

fn code<T>(r: crate::domain::Result<T>) -> Code {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn the_daily_limit_counts_admin_versions_per_key_per_utc_day() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    let limited = || admin(KeySource::Managed, Some(30), 2, 1000);
    let add = |req| fx.keyring.add_version(&de, req);
    add(limited()).await.unwrap();
    // Timer versions are not the admin's: any number of them leaves the admin's second.
    for active in 1..=3 {
        fx.keyring.add_version(&de, timer(active)).await.unwrap();
    }
    assert_eq!(add(limited()).await.unwrap().version, 5);
    match add(limited()).await {
        Err(Error::RateLimited {
            code: Code::DailyLimit,
            retry_after,
            ..
        }) => assert_eq!(retry_after, (DAY - 3600) as u64),
        Err(e) => panic!("expected daily_limit, got {e}"),
        Ok(_) => panic!("a third admin version on one day must be refused"),
    }
    assert_eq!(fx.keyring.key(&de).unwrap().last_version(), 5);
    // Per key: another key is not affected.
    let fr = id("prod", "FR");
    let req = admin(KeySource::Managed, Some(30), 2, 1000);
    fx.keyring.add_version(&fr, req).await.unwrap();
    // A second before midnight UTC: still refused, retry after that second.
    fx.clock.set(T0 + DAY - 1);
    match add(limited()).await {
        Err(Error::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 1),
        _ => panic!("the limit holds until midnight UTC"),
    }
    // At midnight UTC the count starts again.
    fx.clock.set(T0 + DAY);
    assert_eq!(add(limited()).await.unwrap().version, 6);
    assert_eq!(add(limited()).await.unwrap().version, 7);
    assert_eq!(code(add(limited()).await), Code::DailyLimit);
}

#[tokio::test]
async fn the_customer_supplied_limit_never_resets() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    let aws = |blob: &[u8]| {
        fx.kms.script(
            blob,
            crate::kms::fake::Answer::Plaintext(blob.repeat(32)[..32].to_vec()),
        );
        admin(KeySource::Aws(aws_ref(blob)), None, 1000, 2)
    };
    fx.keyring.add_version(&de, aws(b"a")).await.unwrap();
    fx.keyring.add_version(&de, aws(b"b")).await.unwrap();
    let third = fx.keyring.add_version(&de, aws(b"c")).await;
    assert_eq!(code(third), Code::CustomerSuppliedLimit);
    // Refused before KMS is asked.
    assert_eq!(fx.kms.calls(b"c"), 0);
    // Not a daily limit: a year later it still holds.
    fx.clock.advance(400 * DAY);
    let later = fx.keyring.add_version(&de, aws(b"d")).await;
    assert_eq!(code(later), Code::CustomerSuppliedLimit);
    // Managed versions are not limited by it.
    let managed = admin(KeySource::Managed, Some(30), 1000, 2);
    assert_eq!(
        fx.keyring.add_version(&de, managed).await.unwrap().version,
        3
    );
    assert_eq!(fx.keyring.key(&de).unwrap().customer_supplied_versions(), 2);
}

#[tokio::test]
async fn rotation_periods_are_checked_and_set_the_next_rotation() {
    for days in [30, 60, 180, 360] {
        assert_eq!(check_period(days).unwrap(), days);
    }
    for days in [0, 1, 29, 31, 90, 365, u32::MAX] {
        assert_eq!(code(check_period(days)), Code::InvalidRotationPeriod);
    }
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    // A managed key needs a period; nothing is made without one.
    assert_eq!(
        code(fx.managed(&de, None).await),
        Code::MissingRotationPeriod
    );
    assert_eq!(code(fx.keyring.key(&de)), Code::KeyNotFound);
    let made = fx.managed(&de, Some(60)).await.unwrap();
    assert!(made.key_created);
    let created = fx.now();
    let next = || fx.keyring.key(&de).unwrap().next_rotation();
    assert_eq!(next(), Some(created + 60 * DAY));
    let actor = crate::domain::audit::Actor::Timer;
    fx.keyring
        .set_rotation_period(&de, 180, &actor)
        .await
        .unwrap();
    assert_eq!(next(), Some(created + 180 * DAY));
    // A customer-supplied key needs none, and does not rotate while its version is active.
    let fr = id("prod", "FR");
    fx.aws(&fr, b"fr", [7; 32]).await.unwrap();
    assert_eq!(fx.keyring.key(&fr).unwrap().next_rotation(), None);
    // A managed version on it then needs a period again.
    assert_eq!(
        code(fx.managed(&fr, None).await),
        Code::MissingRotationPeriod
    );
    fx.managed(&fr, Some(30)).await.unwrap();
    assert_eq!(
        fx.keyring.key(&fr).unwrap().next_rotation(),
        Some(fx.now() + 30 * DAY)
    );
}

/// Puts `(iv, wrapped)` of `from` in place of `to`'s, as someone with the state file could.
fn move_wrapped(fx: &Fixture, from: (&str, u32), to: (&str, u32)) {
    let db = fx.dir.path().join("state").join(crate::store::DB_FILE);
    let conn = rusqlite::Connection::open(db).unwrap();
    let q = "UPDATE versions SET (iv, wrapped) = (
               SELECT v.iv, v.wrapped FROM versions v JOIN keys k ON k.id = v.key_id
               WHERE k.country = ?1 AND v.version = ?2)
             WHERE version = ?4 AND key_id = (SELECT id FROM keys WHERE country = ?3)";
    let n = conn
        .execute(q, rusqlite::params![from.0, from.1, to.0, to.1])
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_wrapped_key_opens_only_in_its_own_slot() {
    let fx = Fixture::new().await;
    let (de, fr) = (id("prod", "DE"), id("prod", "FR"));
    fx.managed(&de, Some(30)).await.unwrap();
    fx.managed(&de, Some(30)).await.unwrap();
    fx.managed(&de, Some(30)).await.unwrap();
    fx.managed(&fr, Some(30)).await.unwrap();
    let de3 = served(&fx, &de, 3).unwrap();
    assert_ne!(served(&fx, &de, 1), served(&fx, &de, 2));

    // In the HSM: a blob opens under its own slot's AAD, under no other.
    let stored = fx.store.load_all().unwrap();
    let v1 = &stored.iter().find(|k| k.id == de).unwrap().versions[0];
    let (iv, blob) = (v1.iv, v1.wrapped.clone());
    let tries = [
        (de.root_label(), de.wrap_aad(1)),
        (de.root_label(), de.wrap_aad(2)),
        (de.root_label(), de.aws_secret_aad(1)),
        (de.root_label(), fr.wrap_aad(1)),
        (fr.root_label(), fr.wrap_aad(1)),
    ];
    let opened = fx
        .worker
        .call(move |h| {
            Ok(tries
                .iter()
                .map(|(label, aad)| h.open(label, &iv, aad, &blob).map(|k| k.to_vec()))
                .collect::<Vec<_>>())
        })
        .await
        .unwrap();
    assert_eq!(
        opened[0].as_ref().unwrap()[..],
        served(&fx, &de, 1).unwrap()
    );
    for other in &opened[1..] {
        assert!(matches!(other, Err(HsmError::Integrity)));
    }

    // In the state: blobs moved to another version or key load as unavailable, loudly;
    // the rest still serve.
    move_wrapped(&fx, ("DE", 2), ("DE", 1));
    move_wrapped(&fx, ("DE", 3), ("FR", 1));
    let fx = fx.restart().await;
    for (key, v) in [(&de, 1), (&fr, 1)] {
        let state = fx.keyring.key(key).unwrap();
        let why = state.version(v).unwrap().availability.unavailable_reason();
        let why = why.unwrap_or_else(|| panic!("{key} version {v} must not serve a moved blob"));
        assert!(why.contains("integrity check failed"), "{why}");
    }
    assert!(served(&fx, &de, 2).is_some());
    assert_eq!(served(&fx, &de, 3), Some(de3));
}

#[tokio::test]
async fn a_missing_root_key_refuses_changes_and_loads_unavailable() {
    let fx = Fixture::new().await;
    let (de, fr) = (id("prod", "DE"), id("prod", "FR"));
    fx.managed(&de, Some(30)).await.unwrap();
    fx.managed(&fr, Some(30)).await.unwrap();
    let key = served(&fx, &de, 1);
    fx.hsm.hide_root(&de.root_label(), true);
    assert_eq!(code(fx.managed(&de, None).await), Code::RootKeyMissing);
    // A restart loads the key unavailable, makes no new root key, and keeps the others.
    let fx = fx.restart().await;
    let state = fx.keyring.key(&de).unwrap();
    assert!(state.unavailable_reason.is_some());
    assert!(served(&fx, &de, 1).is_none());
    assert_eq!(code(fx.managed(&de, None).await), Code::RootKeyMissing);
    assert!(!fx.hsm.has_root(&de.root_label()));
    assert!(served(&fx, &fr, 1).is_some());
    // The key back on the token: the next start serves it again.
    fx.hsm.hide_root(&de.root_label(), false);
    let fx = fx.restart().await;
    assert_eq!(served(&fx, &de, 1), key);
    assert_eq!(fx.managed(&de, None).await.unwrap().version, 2);
}

#[tokio::test]
async fn an_hsm_outage_refuses_changes_while_loaded_keys_serve() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    let key = served(&fx, &de, 1);
    fx.hsm.set_down(true);
    assert_eq!(code(fx.managed(&de, None).await), Code::HsmUnavailable);
    assert!(fx.keyring.hsm_status().unavailable.is_some());
    assert_eq!(served(&fx, &de, 1), key);
    // The worker reconnects by itself once the token answers (after 100 ms at first).
    fx.hsm.set_down(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fx.keyring.hsm_ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(fx.hsm.reconnects() >= 1);
    assert_eq!(fx.managed(&de, None).await.unwrap().version, 2);
}
