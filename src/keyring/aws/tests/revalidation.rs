//! Revalidation passes over a real keyring with the fake KMS: refusals, outages up to
//! `aws.max_stale` (by the daemon's clock), restores, what is audited, and when the next
//! check is due.

use std::time::Duration;

use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{check, SETTINGS};
use crate::domain::audit::AuditOutcome;
use crate::domain::{Code, KeyId};
use crate::keyring::aws::revalidate::{judge_one, Found};
use crate::keyring::fixture::{id, Fixture};
use crate::keyring::{AwsState, AwsStatus, RevalidateSettings};
use crate::kms::fake::Answer;
use crate::kms::{KmsError, Rejection};

/// Every version is due again a moment after each check (time since the last success is
/// the daemon's clock's, which the tests move).
pub(super) const EVERY_PASS: RevalidateSettings = RevalidateSettings {
    interval: Duration::from_millis(1),
    max_stale: Duration::from_secs(3600),
};

pub(super) const KEY: [u8; 32] = [0x11; 32];

/// A keyring with one aws version (`prod`/`DE` version 1 of `blob`), checked every pass.
pub(super) async fn registered(blob: &[u8]) -> (Fixture, KeyId) {
    let fx = Fixture::new().await;
    // Sets the interval that registrations schedule their first check with.
    fx.keyring.revalidate_due(EVERY_PASS).await;
    let de = id("prod", "DE");
    assert_eq!(fx.aws(&de, blob, KEY).await.unwrap(), 1);
    (fx, de)
}

pub(super) async fn revalidate(fx: &Fixture) {
    tokio::time::sleep(Duration::from_millis(2)).await;
    fx.keyring.revalidate_due(EVERY_PASS).await;
}

/// Why version 1 is not served; `None` while it serves `KEY`.
pub(super) fn unavailable(fx: &Fixture, id: &KeyId) -> Option<String> {
    let key = fx.keyring.key(id).unwrap();
    let v = key.version(1).unwrap();
    match v.key() {
        Some(k) => {
            assert_eq!(k.expose(), &KEY);
            None
        }
        None => Some(v.availability.unavailable_reason().unwrap().to_string()),
    }
}

/// `(outcome, detail)` of the revalidation's audit entries.
pub(super) fn audited(fx: &Fixture) -> Vec<(AuditOutcome, String)> {
    fx.audit()
        .into_iter()
        .filter(|e| e.action == "kms-revalidate" && e.actor == "timer")
        .map(|e| (e.outcome, e.detail))
        .collect()
}

/// The one problem health shows: its state and code.
pub(super) fn problem(fx: &Fixture) -> Option<(AwsState, Code)> {
    let health = fx.keyring.aws_health();
    assert_eq!(health.versions, 1);
    assert!(health.problems.len() <= 1);
    let p = health.problems.first().map(|p| (p.state, p.code));
    let status = if p.is_some() {
        AwsStatus::Degraded
    } else {
        AwsStatus::Ok
    };
    assert_eq!(health.status, status);
    p
}

#[tokio::test]
async fn a_refusal_stops_the_version_at_once_and_a_later_success_restores_it() {
    let (fx, de) = registered(b"k").await;
    revalidate(&fx).await;
    assert_eq!((unavailable(&fx, &de), problem(&fx)), (None, None));
    assert!(audited(&fx).is_empty());
    fx.kms.script(b"k", Answer::Rejected(Rejection::Disabled));
    revalidate(&fx).await;
    let why = unavailable(&fx, &de).expect("a revoked key is not served");
    assert!(
        why.starts_with("revoked:") && why.contains("disabled"),
        "{why}"
    );
    assert_eq!(
        problem(&fx),
        Some((AwsState::Revoked, Code::AwsKeyDisabled))
    );
    // Audited once, however often KMS says the same.
    revalidate(&fx).await;
    revalidate(&fx).await;
    let said = audited(&fx);
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0].0, AuditOutcome::Failed);
    assert!(
        said[0].1.contains("version unavailable: revoked"),
        "{said:?}"
    );
    // Another refusal is another event.
    fx.kms
        .script(b"k", Answer::Rejected(Rejection::PendingDeletion));
    revalidate(&fx).await;
    assert_eq!(audited(&fx).len(), 2);
    // A refused key stays refused through an outage.
    fx.kms.script(b"k", Answer::Transient("timeout".into()));
    revalidate(&fx).await;
    assert!(unavailable(&fx, &de).is_some());
    assert_eq!(audited(&fx).len(), 2);
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!((unavailable(&fx, &de), problem(&fx)), (None, None));
    let said = audited(&fx);
    assert_eq!(said.len(), 3);
    assert_eq!(said[2].0, AuditOutcome::Ok);
    assert!(said[2].1.contains("version restored"), "{said:?}");
}

#[tokio::test]
async fn an_outage_keeps_the_cached_key_until_max_stale() {
    let (fx, de) = registered(b"k").await;
    fx.kms
        .script(b"k", Answer::Transient("connection refused".into()));
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    assert_eq!(
        problem(&fx),
        Some((AwsState::Unreachable, Code::KmsUnavailable))
    );
    // Exactly max_stale since the last success: still served.
    fx.clock.advance(3600);
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    assert!(audited(&fx).is_empty());
    fx.clock.advance(1);
    revalidate(&fx).await;
    let why = unavailable(&fx, &de).expect("a stale key is not served");
    assert!(
        why.contains("aws.max_stale") && why.contains("connection refused"),
        "{why}"
    );
    assert_eq!(problem(&fx), Some((AwsState::Stale, Code::AwsKeyStale)));
    revalidate(&fx).await;
    let said = audited(&fx);
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0].0, AuditOutcome::Failed);
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!((unavailable(&fx, &de), problem(&fx)), (None, None));
    let said = audited(&fx);
    assert_eq!(said.len(), 2);
    assert!(said[1].1.contains("version restored"), "{said:?}");
    // The stale clock starts again from this success.
    fx.kms.script(b"k", Answer::Transient("timeout".into()));
    fx.clock.advance(3600);
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
}

#[tokio::test]
async fn the_first_success_after_a_start_serves_without_an_audit_entry() {
    let (fx, de) = registered(b"k").await;
    let fx = fx.restart().await;
    assert!(unavailable(&fx, &de).unwrap().contains("first KMS check"));
    // No check has succeeded since start: an outage keeps it from serving.
    fx.kms.script(b"k", Answer::Transient("timeout".into()));
    fx.keyring.revalidate_due(EVERY_PASS).await;
    assert!(unavailable(&fx, &de).is_some());
    assert_eq!(problem(&fx), Some((AwsState::Stale, Code::AwsKeyStale)));
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!((unavailable(&fx, &de), problem(&fx)), (None, None));
    assert!(audited(&fx).is_empty(), "{:?}", audited(&fx));
    // A key KMS now decrypts to something else is not served, and said.
    fx.kms.script(b"k", Answer::Plaintext(vec![0x22; 32]));
    revalidate(&fx).await;
    let why = unavailable(&fx, &de).unwrap();
    assert!(why.contains("aws_key_mismatch"), "{why}");
    assert_eq!(audited(&fx).len(), 1);
}

#[tokio::test]
async fn the_next_check_backs_off_after_a_transient_failure() {
    let slow = RevalidateSettings {
        interval: Duration::from_secs(900),
        max_stale: Duration::from_secs(3600),
    };
    let (fx, _) = registered(b"k").await;
    // After a start every version is due at once.
    let fx = fx.restart().await;
    fx.kms.script(b"k", Answer::Transient("timeout".into()));
    let before = Instant::now();
    let next = fx.keyring.revalidate_due(slow).await;
    let wait = next - before;
    assert!(wait >= Duration::from_secs(2), "{wait:?}");
    assert!(wait < Duration::from_secs(3), "{wait:?}");
    // A success waits the whole interval.
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    let fx = fx.restart().await;
    let before = Instant::now();
    let wait = fx.keyring.revalidate_due(slow).await - before;
    assert!(wait >= Duration::from_secs(900), "{wait:?}");
    assert!(wait < Duration::from_secs(901), "{wait:?}");
}

#[test]
fn transient_failures_double_the_wait_up_to_the_interval_and_success_resets_it() {
    let de = id("prod", "DE");
    let mut c = check();
    let cached = std::sync::Arc::new(crate::domain::DataKey::new(&KEY).unwrap());
    let transient = || Found::Kms(KmsError::Transient("timeout".into()));
    // `SETTINGS` checks every 60 s.
    for secs in [2, 4, 8, 16, 32, 60, 60] {
        let before = Instant::now();
        judge_one(&de, 1, Some(&cached), &mut c, transient(), 0, SETTINGS);
        let wait = c.due - before;
        assert!(
            wait >= Duration::from_secs(secs)
                && wait < Duration::from_secs(secs) + Duration::from_secs(1),
            "{secs}: {wait:?}"
        );
    }
    let ok = Found::Key(Zeroizing::new(KEY.to_vec()));
    let before = Instant::now();
    judge_one(&de, 1, Some(&cached), &mut c, ok, 0, SETTINGS);
    assert_eq!(c.failures, 0);
    assert!(c.due - before >= Duration::from_secs(60));
    let before = Instant::now();
    judge_one(&de, 1, Some(&cached), &mut c, transient(), 0, SETTINGS);
    assert!(c.due - before < Duration::from_secs(3));
}
