//! Unit tests of verification codes over the fake HSM, a real state and a manual clock:
//! replays, the lockout (also under concurrent guesses and across a restart), and attempts
//! that are never checked.

mod enroll;

use std::sync::Arc;

use totp_rs::Secret;

use super::{totp, Enrollment, Verifier, SYSTEM_ROOT};
use crate::config::VerificationMode;
use crate::domain::audit::Actor;
use crate::domain::{Caller, Code, Error};
use crate::keyring::fixture::Fixture;

fn verifier(fx: &Fixture) -> Verifier {
    Verifier::new(
        VerificationMode::Totp,
        fx.store.clone(),
        fx.worker.clone(),
        fx.clock.clone(),
    )
}

fn caller(uid: u32) -> Caller {
    Caller {
        uid,
        gid: uid,
        pid: None,
    }
}

fn secret_of(e: &Enrollment) -> Vec<u8> {
    Secret::try_from_base32(e.secret_base32.as_str())
        .unwrap()
        .as_bytes()
        .to_vec()
}

/// The code of `secret` at `unix`.
fn code_at(secret: &[u8], uid: u32, unix: i64) -> String {
    totp(secret, uid).unwrap().generate(unix as u64).to_string()
}

/// A code no step around `unix` accepts.
fn wrong_at(secret: &[u8], uid: u32, unix: i64) -> String {
    let right: Vec<String> = [-30, 0, 30]
        .iter()
        .map(|d| code_at(secret, uid, unix + d))
        .collect();
    (0..)
        .map(|n| format!("{n:06}"))
        .find(|c| !right.contains(c))
        .unwrap()
}

/// Enrolls `uid` offline (the bootstrap); returns its secret. Its step now is used.
async fn enroll(v: &Verifier, fx: &Fixture, uid: u32) -> Vec<u8> {
    let secret = secret_of(&v.offline_enroll_begin(uid).await.unwrap());
    let root = Actor::Peer {
        uid: 0,
        gid: 0,
        pid: None,
    };
    let code = code_at(&secret, uid, fx.now());
    v.offline_enroll_confirm(uid, &code, &root).await.unwrap();
    secret
}

async fn check(v: &Verifier, uid: u32, code: Option<&str>) -> crate::domain::Result<()> {
    v.check(&caller(uid), code, "rotate").await
}

fn code_of(r: crate::domain::Result<()>) -> Code {
    r.expect_err("expected a refusal").code()
}

fn retry_after(r: crate::domain::Result<()>) -> u64 {
    match r {
        Err(Error::RateLimited {
            code: Code::VerificationLocked,
            retry_after,
            ..
        }) => retry_after,
        other => panic!("expected verification_locked, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_right_code_passes_once_and_its_replay_is_refused() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    assert_eq!(
        code_of(check(&v, 1, None).await),
        Code::VerificationRequired
    );
    assert_eq!(
        code_of(check(&v, 1, Some("123456")).await),
        Code::TotpNotEnrolled
    );
    let secret = enroll(&v, &fx, 1).await;
    // The step the enrollment used is spent.
    let enrolled = code_at(&secret, 1, fx.now());
    let replayed = check(&v, 1, Some(&enrolled)).await;
    assert_eq!(code_of(replayed), Code::VerificationReplayed);
    fx.clock.advance(30);
    let code = code_at(&secret, 1, fx.now());
    check(&v, 1, Some(&code)).await.unwrap();
    let again = check(&v, 1, Some(&code)).await;
    assert_eq!(code_of(again), Code::VerificationReplayed);
    // The next step's code, early (within the skew), passes once too; then the one before
    // it no longer does, though still within the skew.
    let next = code_at(&secret, 1, fx.now() + 30);
    check(&v, 1, Some(&next)).await.unwrap();
    assert_eq!(
        code_of(check(&v, 1, Some(&code)).await),
        Code::VerificationReplayed
    );
    let wrong = wrong_at(&secret, 1, fx.now());
    assert_eq!(
        code_of(check(&v, 1, Some(&wrong)).await),
        Code::VerificationFailed
    );
}

#[tokio::test]
async fn five_wrong_codes_lock_the_uid_and_the_lock_survives_a_restart() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let secret = enroll(&v, &fx, 1).await;
    let other = enroll(&v, &fx, 2).await;
    fx.clock.advance(30);
    let wrong = wrong_at(&secret, 1, fx.now());
    // A replay is a wrong code too.
    let spent = code_at(&secret, 1, fx.now() - 30);
    assert_eq!(
        code_of(check(&v, 1, Some(&spent)).await),
        Code::VerificationReplayed
    );
    for _ in 0..4 {
        let r = check(&v, 1, Some(&wrong)).await;
        assert_eq!(code_of(r), Code::VerificationFailed);
    }
    // Locked for five minutes from the fifth: even the right code, and no code, is
    // refused (429).
    fx.clock.advance(10);
    let right = code_at(&secret, 1, fx.now());
    assert_eq!(retry_after(check(&v, 1, Some(&right)).await), 290);
    assert_eq!(retry_after(check(&v, 1, None).await), 290);
    // Another uid is not locked.
    check(&v, 2, Some(&code_at(&other, 2, fx.now())))
        .await
        .unwrap();
    // A new verifier, and a restart, keep the lock.
    fx.clock.advance(200);
    drop(v);
    let v = verifier(&fx);
    assert_eq!(retry_after(check(&v, 1, Some(&right)).await), 90);
    drop(v);
    let fx = fx.restart().await;
    let v = verifier(&fx);
    fx.clock.advance(89);
    let right = code_at(&secret, 1, fx.now());
    assert_eq!(retry_after(check(&v, 1, Some(&right)).await), 1);
    fx.clock.advance(1);
    check(&v, 1, Some(&right)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_guesses_are_all_counted() {
    let fx = Fixture::new().await;
    let v = Arc::new(verifier(&fx));
    let secret = enroll(&v, &fx, 1).await;
    fx.clock.advance(30);
    let wrong = wrong_at(&secret, 1, fx.now());
    let opened = fx.hsm.opens(SYSTEM_ROOT);
    let guesses: Vec<_> = (0..12)
        .map(|_| {
            let (v, wrong) = (v.clone(), wrong.clone());
            tokio::spawn(async move { check(&v, 1, Some(&wrong)).await })
        })
        .collect();
    let mut codes = Vec::new();
    for g in guesses {
        codes.push(code_of(g.await.unwrap()));
    }
    let failed = codes
        .iter()
        .filter(|c| **c == Code::VerificationFailed)
        .count();
    let locked = codes
        .iter()
        .filter(|c| **c == Code::VerificationLocked)
        .count();
    assert_eq!((failed, locked), (5, 7), "{codes:?}");
    // Only five codes were checked against the secret.
    assert_eq!(fx.hsm.opens(SYSTEM_ROOT) - opened, 5);
}

#[tokio::test]
async fn attempts_that_were_never_checked_do_not_count() {
    let fx = Fixture::new().await;
    let v = verifier(&fx);
    let secret = enroll(&v, &fx, 1).await;
    fx.clock.advance(30);
    // The system root key gone: the secret cannot be unsealed, the code is not judged.
    fx.hsm.hide_root(SYSTEM_ROOT, true);
    let wrong = wrong_at(&secret, 1, fx.now());
    for _ in 0..10 {
        let r = check(&v, 1, Some(&wrong)).await;
        assert_eq!(code_of(r), Code::RootKeyMissing);
    }
    fx.hsm.hide_root(SYSTEM_ROOT, false);
    let right = code_at(&secret, 1, fx.now());
    check(&v, 1, Some(&right)).await.unwrap();
    // Right codes are taken back too: four wrong ones after many right ones do not lock.
    for _ in 0..6 {
        fx.clock.advance(30);
        let code = code_at(&secret, 1, fx.now());
        check(&v, 1, Some(&code)).await.unwrap();
    }
    for _ in 0..4 {
        let wrong = wrong_at(&secret, 1, fx.now());
        assert_eq!(
            code_of(check(&v, 1, Some(&wrong)).await),
            Code::VerificationFailed
        );
    }
    let right = code_at(&secret, 1, fx.now() + 30);
    check(&v, 1, Some(&right)).await.unwrap();
}
