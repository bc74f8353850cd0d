//! What the crash test knows about the keys across all cycles, and what it checks after
//! every restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use harness::{try_request, Daemon, Reply, Secrets};
use incountry_keyd::domain::{Code, VersionStatus};
use incountry_keyd::proto::{KeyDocument, KeyList};

use crate::support::{audit_verify, secret_fingerprints};

use super::{Answer, Change, Op, Outcome, COUNTRIES, ENV};

/// What the test knows about one key across all cycles.
#[derive(Default)]
pub struct KeyModel {
    /// An acknowledged create, or seen after a restart: must exist from now on.
    must_exist: bool,
    /// Versions that must be present from now on (acknowledged, or seen served).
    durable: BTreeSet<u32>,
    /// The rotation periods the key may have now: the last acknowledged value plus those
    /// of later requests that were not acknowledged (a create sets 30). Empty: no key yet.
    periods: BTreeSet<u32>,
}

#[derive(Default)]
pub struct Totals {
    pub acked_changes: usize,
    pub acked_reads: usize,
    pub lost: usize,
    pub refused_404: usize,
    pub versions_checked: usize,
    /// Versions that appeared after a restart without an acknowledgement (committed, but
    /// the answer was lost to the kill).
    pub unacked_applied: usize,
    /// Why the last request of a cycle failed, by its innermost cause.
    pub lost_by: BTreeMap<String, usize>,
    pub audit_entries: u64,
}

/// (country, version) -> fingerprint of the material, over the whole run.
pub type Fingerprints = HashMap<(&'static str, u32), String>;

fn remember_fingerprint(fps: &mut Fingerprints, country: &'static str, v: u32, fp: String) {
    match fps.get(&(country, v)) {
        Some(old) => assert_eq!(
            old, &fp,
            "{ENV}/{country} version {v} was served with two different key materials"
        ),
        None => {
            fps.insert((country, v), fp);
        }
    }
}

/// Folds one cycle's operations (in the order they were made) into the model.
pub fn apply_ops(
    ops: &[Op],
    keys: &mut BTreeMap<&'static str, KeyModel>,
    fps: &mut Fingerprints,
    totals: &mut Totals,
) {
    for op in ops {
        let k = keys.entry(op.country).or_default();
        match (&op.outcome, op.change) {
            (Outcome::Acked(Answer::Secrets(doc)), Change::Read) => {
                totals.acked_reads += 1;
                for (v, fp) in secret_fingerprints(doc) {
                    k.durable.insert(v);
                    remember_fingerprint(fps, op.country, v, fp);
                }
                k.must_exist = true;
            }
            (Outcome::Acked(Answer::Added(added)), Change::Create | Change::Rotate) => {
                totals.acked_changes += 1;
                let v = added.version;
                if let Some(&max) = k.durable.last() {
                    assert!(
                        v > max,
                        "{ENV}/{} acknowledged version {v}, but version {max} already existed",
                        op.country
                    );
                }
                k.durable.insert(v);
                k.must_exist = true;
                if matches!(op.change, Change::Create) {
                    k.periods = BTreeSet::from([30]);
                }
            }
            (Outcome::Acked(Answer::Settings(doc)), Change::Settings(days)) => {
                totals.acked_changes += 1;
                assert_eq!(
                    doc.rotation_period_days,
                    Some(days),
                    "settings answer for {ENV}/{}",
                    op.country
                );
                k.periods = BTreeSet::from([days]);
            }
            (Outcome::Acked(answer), change) => {
                unreachable!("{change:?} answered as another change: {answer:?}")
            }
            (Outcome::Lost(why), change) => {
                totals.lost += 1;
                // The innermost cause: the last of the error chain, without its os error.
                let kind = why
                    .rsplit(": ")
                    .next()
                    .and_then(|cause| cause.split('(').next())
                    .unwrap_or(why)
                    .trim()
                    .to_string();
                *totals.lost_by.entry(kind).or_default() += 1;
                match change {
                    Change::Create => {
                        k.periods.insert(30);
                    }
                    Change::Settings(days) => {
                        k.periods.insert(days);
                    }
                    Change::Rotate | Change::Read => {}
                }
            }
            (Outcome::Refused(status, code, text), change) => {
                // Only "no such key yet" is expected, and only for keys never seen.
                let not_found = *status == 404 && *code == Some(Code::KeyNotFound);
                assert!(
                    not_found && !k.must_exist && !matches!(change, Change::Create),
                    "{change:?} {ENV}/{} refused: {status} {text}",
                    op.country
                );
                totals.refused_404 += 1;
            }
        }
    }
}

/// Everything that must hold after a restart.
pub fn check_state(
    d: &Daemon,
    keys: &mut BTreeMap<&'static str, KeyModel>,
    fps: &mut Fingerprints,
    totals: &mut Totals,
) {
    let get = |path: &str| -> Reply {
        let a = try_request(&d.socket, "GET", path, &[], b"", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(a.status, 200, "GET {path}: {}", a.text());
        a
    };

    // The audit chain, read from the state (read-only) while the daemon runs.
    let count = audit_verify(d);
    assert!(
        count >= totals.audit_entries,
        "audit entries went from {} to {count}",
        totals.audit_entries
    );
    assert!(
        count >= totals.acked_changes as u64,
        "{count} audit entries for {} acknowledged changes",
        totals.acked_changes
    );
    totals.audit_entries = count;

    let list: KeyList = get("/v1/keys").read();
    let present: BTreeSet<String> = list
        .keys
        .into_iter()
        .map(|k| {
            assert_eq!(k.environment, ENV, "unexpected key {k:?}");
            k.country
        })
        .collect();
    for &country in &COUNTRIES {
        let k = keys.entry(country).or_default();
        if !present.contains(country) {
            assert!(
                !k.must_exist && k.durable.is_empty(),
                "{ENV}/{country} is gone after a restart"
            );
            continue;
        }
        assert!(
            !k.periods.is_empty(),
            "{ENV}/{country} exists but no create for it was ever sent"
        );
        let doc: KeyDocument = get(&format!("/v1/keys/{ENV}/{country}")).read();
        let versions: Vec<u32> = doc
            .versions
            .iter()
            .map(|v| {
                assert_ne!(
                    v.status,
                    VersionStatus::Unavailable,
                    "{ENV}/{country} after a restart: {v:?}"
                );
                v.version
            })
            .collect();
        let n = versions.len() as u32;
        assert_eq!(
            versions,
            (1..=n).collect::<Vec<_>>(),
            "{ENV}/{country} versions are not 1..=n"
        );
        let missing: Vec<u32> = k.durable.range(n + 1..).copied().collect();
        assert!(
            missing.is_empty(),
            "{ENV}/{country}: versions {missing:?} were acknowledged or served, but the key \
             has only 1..={n} after a restart"
        );
        assert_eq!(doc.active_version, Some(n));
        let period = doc
            .rotation_period_days
            .unwrap_or_else(|| panic!("{ENV}/{country} without a rotation period"));
        assert!(
            k.periods.contains(&period),
            "{ENV}/{country} has rotation_period_days {period}; possible after the acknowledged \
             and later unacknowledged settings: {:?}",
            k.periods
        );

        let secrets = Secrets::parse(get(&format!("/v1/keys/{ENV}/{country}/secrets")).body);
        assert_eq!(secrets.current_version, n);
        let served = secret_fingerprints(&secrets);
        assert_eq!(
            served.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            versions,
            "{ENV}/{country}: served versions differ from the listed ones"
        );
        for (v, fp) in served {
            remember_fingerprint(fps, country, v, fp);
        }
        totals.versions_checked += n as usize;
        totals.unacked_applied += versions.iter().filter(|v| !k.durable.contains(v)).count();

        k.must_exist = true;
        k.durable = versions.into_iter().collect();
        k.periods = BTreeSet::from([period]);
    }
}
