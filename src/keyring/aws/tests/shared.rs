//! Refusals shared through the state: recorded by the node whose check saw them, learned by
//! every node (in its passes, at load, at a key's reload), cleared by a success.

use std::time::Duration;

use super::revalidation::{audited, problem, registered, revalidate, unavailable, KEY};
use crate::domain::{Code, KeyId};
use crate::keyring::fixture::Fixture;
use crate::keyring::{recorded_refusals, AwsState};
use crate::kms::fake::Answer;
use crate::kms::Rejection;
use crate::store::AwsRefusal;

/// What the state records for version 1 of `id`.
fn recorded(fx: &Fixture, id: &KeyId) -> Option<(Code, String)> {
    let all = fx.store.aws_refusals().unwrap();
    assert!(all.len() <= 1);
    all.into_iter()
        .find(|(k, n, _)| k == id && *n == 1)
        .map(|(_, _, r)| (r.code, r.why))
}

/// Another node's refusal of version 1 of `id`, written to the state.
fn elsewhere(fx: &Fixture, id: &KeyId) {
    let r = AwsRefusal {
        code: Code::AwsKeyDisabled,
        why: "KMS: the CMK is disabled (seen on node b)".into(),
        at: fx.now(),
    };
    assert!(fx.store.set_aws_refusal(id, 1, Some(&r)).unwrap());
}

#[tokio::test]
async fn a_refusal_this_node_sees_is_recorded_and_its_success_clears_it() {
    let (fx, de) = registered(b"k").await;
    revalidate(&fx).await;
    assert_eq!(recorded(&fx, &de), None);
    fx.kms.script(b"k", Answer::Rejected(Rejection::Disabled));
    revalidate(&fx).await;
    assert!(unavailable(&fx, &de).is_some());
    let (code, why) = recorded(&fx, &de).expect("the refusal is in the state");
    assert_eq!(code, Code::AwsKeyDisabled);
    assert!(why.contains("disabled"), "{why}");
    // Still refused: nothing more is written, nothing more audited.
    revalidate(&fx).await;
    assert_eq!(audited(&fx).len(), 1);
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    assert_eq!(recorded(&fx, &de), None);
}

#[tokio::test]
async fn a_refusal_recorded_elsewhere_withdraws_a_key_this_node_cannot_check() {
    let (fx, de) = registered(b"k").await;
    revalidate(&fx).await;
    // KMS is out of reach from here: the cached key would serve until max_stale.
    fx.kms
        .script(b"k", Answer::Transient("connection refused".into()));
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    elsewhere(&fx, &de);
    revalidate(&fx).await;
    let why = unavailable(&fx, &de).expect("withdrawn by the recorded refusal");
    assert!(
        why.contains("the CMK is disabled") && why.contains("recorded in the state"),
        "{why}"
    );
    assert_eq!(
        problem(&fx),
        Some((AwsState::Revoked, Code::AwsKeyDisabled))
    );
    // Learned, not seen here: the node that saw it audited it.
    assert!(audited(&fx).is_empty());
    // Another node decrypts it again and clears it: this node checks at once, and while
    // KMS stays out of reach the version stays withdrawn (and is not recorded again).
    assert!(fx.store.set_aws_refusal(&de, 1, None).unwrap());
    revalidate(&fx).await;
    assert!(unavailable(&fx, &de).is_some());
    assert_eq!(recorded(&fx, &de), None);
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    let said = audited(&fx);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].1.contains("version restored"), "{said:?}");
}

#[tokio::test]
async fn a_recorded_refusal_holds_from_the_start_until_kms_decrypts_again() {
    let (fx, de) = registered(b"k").await;
    fx.kms.script(b"k", Answer::Rejected(Rejection::Disabled));
    revalidate(&fx).await;
    let fx = fx.restart().await;
    // Before any check: withdrawn as the state says, not "waiting for the first check".
    let why = unavailable(&fx, &de).expect("withdrawn at load");
    assert!(why.contains("recorded in the state"), "{why}");
    assert_eq!(
        problem(&fx),
        Some((AwsState::Revoked, Code::AwsKeyDisabled))
    );
    fx.kms.script(b"k", Answer::Transient("timeout".into()));
    revalidate(&fx).await;
    assert!(unavailable(&fx, &de).is_some());
    fx.kms.script(b"k", Answer::Plaintext(KEY.to_vec()));
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
    assert_eq!(recorded(&fx, &de), None);
}

#[tokio::test]
async fn a_reloaded_key_brings_its_refusals_and_their_clearing() {
    let (fx, de) = registered(b"k").await;
    revalidate(&fx).await;
    let wake = fx.keyring.aws_wake();
    elsewhere(&fx, &de);
    let stored = fx.store.load_key(&de).unwrap().unwrap();
    fx.keyring
        .learn_aws_state(&de, recorded_refusals(&stored))
        .await;
    assert!(unavailable(&fx, &de).is_some());
    assert!(fx.store.set_aws_refusal(&de, 1, None).unwrap());
    let stored = fx.store.load_key(&de).unwrap().unwrap();
    assert!(recorded_refusals(&stored).is_empty());
    fx.keyring
        .learn_aws_state(&de, recorded_refusals(&stored))
        .await;
    // The revalidation loop is woken to check it now.
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("the loop is woken");
    revalidate(&fx).await;
    assert_eq!(unavailable(&fx, &de), None);
}
