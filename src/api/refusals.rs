//! Refusals of peers that have no role for what they ask: logged and counted, but audited
//! at most once per uid per minute as a summary, so that any local process cannot bury the
//! audit log under its own attempts (each audit entry is a synced transaction). Refusals of
//! admins (a wrong code, a limit) are still audited one by one.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Peer;
use crate::api::App;
use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{Actor, AuditEntry};

/// Seconds between two audit entries for one uid's refusals.
pub const SUMMARY_SECONDS: i64 = 60;

#[derive(Default)]
pub struct Refusals {
    by_uid: Mutex<HashMap<u32, Window>>,
}

struct Window {
    gid: u32,
    /// Refusals not yet audited, and the time of the first of them.
    pending: u64,
    since: i64,
    last_audit: i64,
}

/// What an audit entry should say: `count` refusals since `since`.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub uid: u32,
    pub gid: u32,
    pub count: u64,
    pub since: i64,
}

impl Refusals {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Window>> {
        self.by_uid
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes one refusal of `uid` at `now`; returns the summary to audit now, if one is due.
    pub fn note(&self, uid: u32, gid: u32, now: i64) -> Option<Summary> {
        let mut map = self.map();
        let w = map.entry(uid).or_insert(Window {
            gid,
            pending: 0,
            since: now,
            last_audit: i64::MIN,
        });
        if w.pending == 0 {
            w.since = now;
        }
        w.pending += 1;
        if now.saturating_sub(w.last_audit) < SUMMARY_SECONDS {
            return None;
        }
        let summary = Summary {
            uid,
            gid: w.gid,
            count: w.pending,
            since: w.since,
        };
        w.pending = 0;
        w.last_audit = now;
        Some(summary)
    }

    /// Summaries of refusals that have waited a minute or more (a uid that stopped after a
    /// burst still gets its count audited); forgets quiet uids.
    pub fn due(&self, now: i64) -> Vec<Summary> {
        let mut map = self.map();
        let mut out = Vec::new();
        map.retain(|uid, w| {
            if w.pending > 0 && now.saturating_sub(w.last_audit) >= SUMMARY_SECONDS {
                out.push(Summary {
                    uid: *uid,
                    gid: w.gid,
                    count: w.pending,
                    since: w.since,
                });
                w.pending = 0;
                w.last_audit = now;
            }
            w.pending > 0 || now.saturating_sub(w.last_audit) < SUMMARY_SECONDS
        });
        out
    }
}

/// A peer without the role for an admin action: logged, counted (`keyd_requests` by route
/// and status 403), and audited at most once a minute per uid as a summary.
pub(super) async fn refused_without_role(app: &App, peer: &Peer, action: &str) {
    tracing::debug!(
        uid = peer.uid,
        pid = peer.pid,
        action,
        "refused: no admin role"
    );
    let now = app.keyring.now();
    if let Some(s) = app.refusals.note(peer.uid, peer.gid, now) {
        app.keyring.audit(refusal_summary(app, &s)).await;
    }
}

/// The audit entry of a refusal summary.
pub(crate) fn refusal_summary(app: &App, s: &Summary) -> AuditEntry {
    let actor = Actor::Peer {
        uid: s.uid,
        gid: s.gid,
        pid: None,
    };
    tracing::warn!(
        uid = s.uid,
        count = s.count,
        "admin requests refused: no admin role"
    );
    app.keyring
        .audit_entry(&actor, "refused-no-role", None)
        .outcome(
            AuditOutcome::Refused,
            format!(
                "forbidden: refused {} time(s) since {} (uid {} is not in access.admins)",
                s.count,
                crate::domain::clock::rfc3339(s.since),
                s.uid
            ),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_is_audited_then_one_summary_a_minute() {
        let r = Refusals::default();
        assert_eq!(
            r.note(7, 70, 1000),
            Some(Summary {
                uid: 7,
                gid: 70,
                count: 1,
                since: 1000
            })
        );
        for t in 1001..1060 {
            assert_eq!(r.note(7, 70, t), None);
        }
        // Another uid is not held back by the first.
        assert!(r.note(8, 80, 1030).is_some());
        assert_eq!(
            r.note(7, 70, 1060),
            Some(Summary {
                uid: 7,
                gid: 70,
                count: 60,
                since: 1001
            })
        );
    }

    #[test]
    fn a_quiet_uid_gets_its_pending_count_and_is_forgotten() {
        let r = Refusals::default();
        r.note(7, 70, 0);
        r.note(7, 70, 5);
        r.note(7, 70, 6);
        assert!(r.due(30).is_empty());
        assert_eq!(
            r.due(60),
            vec![Summary {
                uid: 7,
                gid: 70,
                count: 2,
                since: 5
            }]
        );
        assert!(r.due(200).is_empty());
        assert!(r.map().is_empty());
    }
}
