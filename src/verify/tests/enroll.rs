//! Enrollment: the offline bootstrap, replacing a secret, a first enrollment vouched for by
//! another admin, and the rules of confirming.

use super::*;

fn actions(fx: &Fixture, action: &str) -> Vec<String> {
    fx.audit()
        .into_iter()
        .filter(|e| e.action == action)
        .map(|e| e.detail)
        .collect()
}

#[tokio::test]
async fn the_first_admin_is_enrolled_offline_only_and_once() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let begun = v.enroll_begin(&caller(1), None, None).await;
    assert_eq!(begun.err().unwrap().code(), Code::BootstrapRequired);
    let secret = enroll(&v, &fx, 1).await;
    let again = v.offline_enroll_begin(1).await;
    assert_eq!(again.err().unwrap().code(), Code::AlreadyEnrolled);
    let enrolled = actions(&fx, "totp-enroll");
    assert_eq!(enrolled.len(), 1);
    assert!(enrolled[0].contains("offline"), "{}", enrolled[0]);
    fx.clock.advance(30);
    check(&v, 1, Some(&code_at(&secret, 1, fx.now())))
        .await
        .unwrap();
    // Verification off: nothing to enroll, nothing asked.
    let off = Verifier::Off;
    check(&off, 1, None).await.unwrap();
    let begun = off.enroll_begin(&caller(1), None, None).await;
    assert_eq!(begun.err().unwrap().code(), Code::VerificationOff);
}

#[tokio::test]
async fn replacing_a_secret_needs_a_code_from_the_current_one() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let old = enroll(&v, &fx, 1).await;
    fx.clock.advance(30);
    let me = caller(1);
    let refused = |r: crate::domain::Result<Enrollment>| r.err().unwrap().code();
    let now = fx.now();
    assert_eq!(
        refused(v.enroll_begin(&me, None, None).await),
        Code::VerificationRequired
    );
    let wrong = wrong_at(&old, 1, now);
    assert_eq!(
        refused(v.enroll_begin(&me, Some(&wrong), None).await),
        Code::VerificationFailed
    );
    let right = code_at(&old, 1, now);
    assert_eq!(
        refused(v.enroll_begin(&me, Some(&right), Some(2)).await),
        Code::InvalidVerificationUid
    );
    let new = secret_of(&v.enroll_begin(&me, Some(&right), None).await.unwrap());
    assert_ne!(new, old);
    // Confirmed only by a code of the new secret.
    let r = v.enroll_confirm(&me, &wrong_at(&new, 1, now)).await;
    assert_eq!(code_of(r), Code::VerificationFailed);
    let confirm = code_at(&new, 1, now);
    v.enroll_confirm(&me, &confirm).await.unwrap();
    // Nothing pending any more; the confirming step is spent; the old secret is gone.
    let r = v.enroll_confirm(&me, &confirm).await;
    assert_eq!(code_of(r), Code::NoPendingEnrollment);
    assert_eq!(
        code_of(check(&v, 1, Some(&confirm)).await),
        Code::VerificationReplayed
    );
    fx.clock.advance(30);
    let old_code = code_at(&old, 1, fx.now());
    assert_eq!(
        code_of(check(&v, 1, Some(&old_code)).await),
        Code::VerificationFailed
    );
    check(&v, 1, Some(&code_at(&new, 1, fx.now())))
        .await
        .unwrap();
    let replaced = actions(&fx, "totp-enroll");
    assert!(replaced[1].contains("replaced"), "{replaced:?}");
}

#[tokio::test]
async fn a_first_enrollment_is_vouched_for_by_an_enrolled_admin() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let admin = enroll(&v, &fx, 1).await;
    fx.clock.advance(30);
    let vouch = code_at(&admin, 1, fx.now());
    let refused = |r: crate::domain::Result<Enrollment>| r.err().unwrap();
    let r = v.enroll_begin(&caller(2), Some(&vouch), None).await;
    assert_eq!(refused(r).code(), Code::VerificationRequired);
    let new = secret_of(
        &v.enroll_begin(&caller(2), Some(&vouch), Some(1))
            .await
            .unwrap(),
    );
    let vouched = actions(&fx, "totp-vouch");
    assert_eq!(vouched.len(), 1);
    assert!(vouched[0].contains("uid 1"), "{vouched:?}");
    // The voucher's code is spent: it cannot vouch twice, and the refusal names it.
    let r = v.enroll_begin(&caller(3), Some(&vouch), Some(1)).await;
    let e = refused(r);
    assert_eq!(e.code(), Code::VerificationReplayed);
    assert!(e.to_string().contains("uid 1"), "{e}");
    v.enroll_confirm(&caller(2), &code_at(&new, 2, fx.now()))
        .await
        .unwrap();
    let enrolled = actions(&fx, "totp-enroll");
    assert!(enrolled[1].contains("vouched for by uid 1"), "{enrolled:?}");
}

#[tokio::test]
async fn a_pending_enrollment_expires_and_wrong_confirmations_lock() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let old = enroll(&v, &fx, 1).await;
    fx.clock.advance(30);
    let me = caller(1);
    let code = code_at(&old, 1, fx.now());
    let new = secret_of(&v.enroll_begin(&me, Some(&code), None).await.unwrap());
    // Ten minutes later it is gone.
    fx.clock.advance(600);
    let r = v.enroll_confirm(&me, &code_at(&new, 1, fx.now())).await;
    assert_eq!(code_of(r), Code::NoPendingEnrollment);
    let code = code_at(&old, 1, fx.now());
    let new = secret_of(&v.enroll_begin(&me, Some(&code), None).await.unwrap());
    // Wrong confirmations count like wrong codes: the fifth locks.
    let wrong = wrong_at(&new, 1, fx.now());
    for _ in 0..5 {
        let r = v.enroll_confirm(&me, &wrong).await;
        assert_eq!(code_of(r), Code::VerificationFailed);
    }
    let r = v.enroll_confirm(&me, &code_at(&new, 1, fx.now())).await;
    assert_eq!(retry_after(r), 300);
    // The old secret is still the one in force.
    fx.clock.advance(300);
    check(&v, 1, Some(&code_at(&old, 1, fx.now())))
        .await
        .unwrap();
}
