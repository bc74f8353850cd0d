//! Unit tests of the state: TOTP attempts, lockout and its survival across a reopen.

use super::{Store, TotpLimits};

const LIMITS: TotpLimits = TotpLimits {
    max_failures: 5,
    window: 300,
    lockout: 300,
};

fn wrong(s: &Store, uid: u32, now: i64) -> std::result::Result<Option<i64>, i64> {
    s.totp_attempt_begin(uid, now, LIMITS).unwrap()?;
    Ok(s.totp_attempt_failed(uid, now, LIMITS).unwrap())
}

#[test]
fn counts_before_the_check_locks_at_five_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let t = 1_000_000;
    for i in 0..4 {
        assert_eq!(wrong(&s, 7, t + i), Ok(None));
    }
    // The fifth wrong code locks the uid; another uid is not affected.
    assert_eq!(wrong(&s, 7, t + 4), Ok(Some(t + 4 + 300)));
    assert_eq!(wrong(&s, 7, t + 5), Err(t + 304));
    assert_eq!(wrong(&s, 8, t + 5), Ok(None));
    assert_eq!(s.totp_locked_until(7, t + 5).unwrap(), Some(t + 304));
    // A restart keeps the lock.
    drop(s);
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.totp_locked_until(7, t + 303).unwrap(), Some(t + 304));
    assert_eq!(wrong(&s, 7, t + 303), Err(t + 304));
    assert_eq!(s.totp_locked_until(7, t + 304).unwrap(), None);
    assert_eq!(wrong(&s, 7, t + 304), Ok(None));
}

#[test]
fn abandoned_checks_count_and_withdrawn_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
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
        assert_eq!(wrong(&s, 3, t + i), Ok(None));
    }
    assert_eq!(wrong(&s, 3, t + 300), Ok(None));
}
