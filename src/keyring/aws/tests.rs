//! Unit tests of aws versions: backoff, key checks and bindings, loading, judging KMS answers.

mod revalidation;
mod shared;

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::check::{check_aad, decide_binding, key_check_value, mark_checked, Binding, KCV_LEN};
use super::revalidate::{backoff, judge_one, Decision, Found};
use super::{later, load_version, Check, RevalidateSettings, MISMATCH_CODE};
use crate::domain::Availability;
use crate::domain::AwsKeyRef;
use crate::domain::DataKey;
use crate::domain::KeyId;
use crate::hsm::HsmError;
use crate::store::StoredAws;

#[test]
fn backoff_doubles_up_to_the_interval() {
    let i = Duration::from_secs(900);
    assert_eq!(backoff(1, i), Duration::from_secs(2));
    assert_eq!(backoff(2, i), Duration::from_secs(4));
    assert_eq!(backoff(30, i), i);
    assert_eq!(backoff(3, Duration::from_secs(1)), Duration::from_secs(1));
}

#[test]
fn later_never_overflows() {
    let now = Instant::now();
    assert_eq!(
        later(now, Duration::from_secs(5)),
        now + Duration::from_secs(5)
    );
    let far = later(now, Duration::MAX);
    assert!(far > now && far <= now + crate::config::MAX_DURATION);
}

fn aws_ref(region: &str, blob: &[u8], arn: &str, akid: &str) -> AwsKeyRef {
    AwsKeyRef {
        region: region.into(),
        encrypted_key: blob.to_vec(),
        cmk_arn: arn.into(),
        access_key_id: akid.into(),
        secret_access_key: Zeroizing::new("secret".into()),
    }
}

#[test]
fn key_check_aad_covers_the_slot_and_every_kms_field() {
    let id = KeyId::parse("p", "DE").unwrap();
    let base = aws_ref("eu-central-1", b"blob", "arn:1", "AKIA1");
    let aad = check_aad(&id, 1, &base);
    let others = [
        check_aad(&id, 2, &base),
        check_aad(&KeyId::parse("p", "FR").unwrap(), 1, &base),
        check_aad(&KeyId::parse("q", "DE").unwrap(), 1, &base),
        check_aad(&id, 1, &aws_ref("eu-west-1", b"blob", "arn:1", "AKIA1")),
        check_aad(&id, 1, &aws_ref("eu-central-1", b"blob2", "arn:1", "AKIA1")),
        check_aad(&id, 1, &aws_ref("eu-central-1", b"blob", "arn:2", "AKIA1")),
        check_aad(&id, 1, &aws_ref("eu-central-1", b"blob", "arn:1", "AKIA2")),
        // Moving bytes from one field to the next is not the same AAD either.
        check_aad(&id, 1, &aws_ref("eu-central-1b", b"lob", "arn:1", "AKIA1")),
    ];
    for o in &others {
        assert_ne!(&aad, o);
    }
    assert_ne!(aad, id.aws_secret_aad(1));
    assert_ne!(aad, id.wrap_aad(1));
    // The IAM secret is never part of it.
    let mut other_secret = aws_ref("eu-central-1", b"blob", "arn:1", "AKIA1");
    other_secret.secret_access_key = Zeroizing::new("other".into());
    assert_eq!(aad, check_aad(&id, 1, &other_secret));
}

#[test]
fn key_check_value_identifies_the_key_without_being_it() {
    let a = key_check_value(&[1u8; 32]);
    assert_eq!(a, key_check_value(&[1u8; 32]));
    assert_ne!(a, key_check_value(&[2u8; 32]));
    assert_ne!(&a[..], &[1u8; 32][..]);
    // Domain-separated: not the plain SHA-256 of the key.
    assert_ne!(&a[..], &Sha256::digest([1u8; 32])[..]);
    assert_ne!(key_check_value(&[1u8; 16]), key_check_value(&[1u8; 17]));
    let bound = Binding::Bound(key_check_value(&[7u8; 32]));
    assert!(bound.admits(&[7u8; 32]).is_ok());
    assert!(bound.admits(&[8u8; 32]).is_err());
    assert!(bound.admits(&[7u8; 16]).is_err());
    assert!(Binding::Unbound.admits(&[8u8; 32]).is_ok());
    assert!(Binding::Broken("x".into()).admits(&[7u8; 32]).is_err());
}

#[test]
fn binding_decisions() {
    let kcv = || Some(Ok(Zeroizing::new(vec![5u8; KCV_LEN])));
    // Registered with a check: bound.
    assert!(matches!(
        decide_binding(Ok(true), kcv()),
        Ok(Binding::Bound(_))
    ));
    // Registered before key checks (no mark, no check): keeps working, unbound.
    assert!(matches!(
        decide_binding(Ok(false), None),
        Ok(Binding::Unbound)
    ));
    // The check removed from the state of a marked version: broken.
    match decide_binding(Ok(true), None) {
        Ok(Binding::Broken(why)) => assert!(why.contains("removed"), "{why}"),
        _ => panic!("a removed check must break the binding"),
    }
    // The KMS fields changed (the AAD no longer matches) or the check altered: broken.
    match decide_binding(Ok(true), Some(Err(HsmError::Integrity))) {
        Ok(Binding::Broken(why)) => assert!(why.contains("encrypted key"), "{why}"),
        _ => panic!("a failed tag check must break the binding"),
    }
    assert!(matches!(
        decide_binding(Ok(false), Some(Err(HsmError::Integrity))),
        Ok(Binding::Broken(_))
    ));
    assert!(matches!(
        decide_binding(Ok(true), Some(Ok(Zeroizing::new(vec![1u8; 3])))),
        Ok(Binding::Broken(_))
    ));
    assert!(matches!(
        decide_binding(Err(HsmError::Integrity), None),
        Ok(Binding::Broken(_))
    ));
    // An HSM that cannot answer now: retried, not judged.
    assert!(decide_binding(Err(HsmError::Unavailable("gone".into())), None).is_err());
    assert!(decide_binding(Ok(true), Some(Err(HsmError::Unavailable("gone".into())))).is_err());
}

#[test]
fn the_mark_is_taken_off_the_loaded_secret() {
    let id = KeyId::parse("p", "DE").unwrap();
    let stored = || StoredAws {
        region: "r".into(),
        encrypted_key: vec![1],
        cmk_arn: "a".into(),
        access_key_id: "k".into(),
        check: None,
        refusal: None,
    };
    let secret = Zeroizing::new("wJalrXUtnFEMI/K7MDENG".to_string());
    let marked = mark_checked(&secret);
    assert!(marked.starts_with('\0') && marked.ends_with(secret.as_str()));
    for sealed in [marked.as_bytes(), secret.as_bytes()] {
        let opened = Some(Ok(Zeroizing::new(sealed.to_vec())));
        let (material, aws) = load_version(&id, 1, &None, stored(), opened).unwrap();
        assert!(matches!(material, Availability::AwaitingFirstCheck));
        assert_eq!(aws.unwrap().secret_access_key.as_str(), secret.as_str());
    }
}

fn check() -> Check {
    Check::new(Instant::now())
}

const SETTINGS: RevalidateSettings = RevalidateSettings {
    interval: Duration::from_secs(60),
    max_stale: Duration::from_secs(3600),
};

#[test]
fn a_mismatch_is_unavailable_with_its_code_once() {
    let id = KeyId::parse("p", "DE").unwrap();
    let mut c = check();
    let found = || Found::Mismatch("its key check was removed from the state".into());
    match judge_one(&id, 1, None, &mut c, found(), 0, SETTINGS) {
        Decision::Becomes(Availability::Unavailable(why)) => {
            assert!(
                why.contains(MISMATCH_CODE.as_str()) && why.contains("removed"),
                "{why}"
            )
        }
        _ => panic!("a mismatch must make the version unavailable"),
    }
    assert_eq!(c.rejected.as_ref().unwrap().code, MISMATCH_CODE);
    // Said once: the next check that finds the same changes nothing.
    assert!(matches!(
        judge_one(&id, 1, None, &mut c, found(), 0, SETTINGS),
        Decision::Unchanged
    ));
    // A served key that KMS now decrypts to another one: a mismatch too.
    let mut c = check();
    let cached = Arc::new(DataKey::new(&[1u8; 32]).unwrap());
    let other = Found::Key(Zeroizing::new(vec![2u8; 32]));
    match judge_one(&id, 1, Some(&cached), &mut c, other, 0, SETTINGS) {
        Decision::Becomes(Availability::Unavailable(why)) => {
            assert!(why.contains(MISMATCH_CODE.as_str()), "{why}")
        }
        _ => panic!("another key must not be served"),
    }
    // A KMS refusal keeps its own code.
    let mut c = check();
    let refused = Found::Kms(crate::kms::classify_code("DisabledException", "", 400));
    judge_one(&id, 1, Some(&cached), &mut c, refused, 0, SETTINGS);
    assert_eq!(
        c.rejected.as_ref().unwrap().code,
        crate::domain::Code::AwsKeyDisabled
    );
}
