//! The contract of what `state migrate` relies on: aws refusals recorded, kept and cleared,
//! and a whole state copied into an empty one as it is (`export`, `import`).

use std::sync::Arc;

use super::{add, entry, id, managed, open, walk, Backend, LIMITS};
use crate::domain::audit::AuditRecord;
use crate::domain::{Code, KeyId, VersionType};
use crate::store::{AwsRefusal, SealedCheck, Store, StoredAws, StoredTotp, StoredVersion};

fn aws(version: u32) -> StoredVersion {
    StoredVersion {
        kind: VersionType::Aws,
        aws: Some(StoredAws {
            region: "eu-central-1".into(),
            encrypted_key: vec![7; 20],
            cmk_arn: "arn:aws:kms:eu-central-1:111122223333:key/k".into(),
            access_key_id: "AKIAEXAMPLE".into(),
            check: Some(SealedCheck {
                iv: [9; 12],
                sealed: vec![8; 24],
            }),
            refusal: None,
        }),
        ..managed(version)
    }
}

fn refusal(code: Code, why: &str) -> AwsRefusal {
    AwsRefusal {
        code,
        why: why.into(),
        at: 5_000,
    }
}

/// The refusal `load_key` returns for a version.
fn loaded(s: &dyn Store, key: &KeyId, version: u32) -> Option<AwsRefusal> {
    let k = s.load_key(key).unwrap().unwrap();
    let v = k.versions.iter().find(|v| v.version == version).unwrap();
    v.aws.as_ref().unwrap().refusal.clone()
}

pub fn aws_refusals_are_recorded_kept_and_cleared(b: &dyn Backend) {
    let s = open(b);
    let de = id("DE");
    s.add_version(&de, None, &aws(1), &entry("create", Some(&de)))
        .unwrap();
    add(s.as_ref(), &de, 2).unwrap();
    assert!(s.aws_refusals().unwrap().is_empty());
    assert!(loaded(s.as_ref(), &de, 1).is_none());
    let disabled = refusal(Code::AwsKeyDisabled, "the CMK is disabled");
    assert!(s.set_aws_refusal(&de, 1, Some(&disabled)).unwrap());
    // A refusal already recorded stays as the first node wrote it.
    let other = refusal(Code::AwsAccessDenied, "denied");
    assert!(!s.set_aws_refusal(&de, 1, Some(&other)).unwrap());
    assert!(loaded(s.as_ref(), &de, 1) == Some(disabled.clone()));
    let all = s.aws_refusals().unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].0 == de && all[0].1 == 1 && all[0].2 == disabled);
    // Managed versions and versions the state lacks have nothing to refuse.
    for v in [2, 3] {
        let e = s.set_aws_refusal(&de, v, Some(&disabled)).unwrap_err();
        assert_eq!(e.code(), Code::VersionNotFound, "version {v}");
    }
    // Kept across a reopen, in load_all too; cleared once, then nothing to clear.
    drop(s);
    let s = open(b);
    let all = s.load_all().unwrap();
    let v1 = all[0].versions[0].aws.as_ref().unwrap();
    assert!(v1.refusal == Some(disabled));
    assert!(s.set_aws_refusal(&de, 1, None).unwrap());
    assert!(!s.set_aws_refusal(&de, 1, None).unwrap());
    assert!(loaded(s.as_ref(), &de, 1).is_none());
    assert!(s.aws_refusals().unwrap().is_empty());
    // None of it is audited: the node's revalidation audits what its checks saw.
    assert_eq!(walk(s.as_ref()), 2);
}

/// Every audit record, as JSON (records compare field by field, MACs included).
fn log(s: &dyn Store) -> Vec<String> {
    let records: Vec<AuditRecord> = s.audit_since(0, 100_000).unwrap();
    records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect()
}

/// A state with keys, an aws version with a refusal, encryption counts, TOTP secrets and
/// attempts, and audit entries.
fn fill(s: &dyn Store) {
    let (de, fr) = (id("DE"), id("FR"));
    add(s, &de, 1).unwrap();
    add(s, &de, 2).unwrap();
    s.set_rotation_period(&de, Some(180), &entry("settings", Some(&de)))
        .unwrap();
    s.add_version(&fr, None, &aws(1), &entry("create", Some(&fr)))
        .unwrap();
    s.set_aws_refusal(&fr, 1, Some(&refusal(Code::AwsKeyDisabled, "disabled")))
        .unwrap();
    assert_eq!(s.reserve_encryptions(&de, 2, 65_536).unwrap(), 65_536);
    let secret = StoredTotp {
        iv: [4; 12],
        sealed: vec![5; 36],
        last_step: 0,
    };
    s.totp_put(7, &secret, 3_000, &entry("totp-enroll", None))
        .unwrap();
    s.totp_attempt_begin(7, 3_000, LIMITS).unwrap().unwrap();
    assert!(s.totp_attempt_passed(7, 99).unwrap());
    s.totp_attempt_begin(8, 3_001, LIMITS).unwrap().unwrap();
    s.audit(&entry("refused", None)).unwrap();
}

/// `from` filled, copied into `to` (both fresh states): the same state, and `to` goes on
/// from where `from` was.
pub fn a_state_copies_whole_into_an_empty_one(from: &dyn Backend, to: &dyn Backend) {
    let source = open(from);
    fill(source.as_ref());
    let copy = source.export().unwrap();
    assert_eq!((copy.keys.len(), copy.versions()), (2, 3));
    assert_eq!((copy.totp.len(), copy.attempts.len()), (1, 2));
    let target: Arc<dyn Store> = open(to);
    let empty = target.export().unwrap();
    assert!(empty.is_empty());
    let mut read = |since, limit| source.audit_since(since, limit);
    target.import(&copy, &mut read).unwrap();

    let copied = target.export().unwrap();
    assert_eq!(copied.fingerprint(), copy.fingerprint());
    assert_ne!(copied.fingerprint(), empty.fingerprint());
    assert_eq!(log(target.as_ref()), log(source.as_ref()));
    assert_eq!(target.head().unwrap(), source.head().unwrap());
    assert_eq!(target.encryptions(&id("DE"), 2).unwrap(), 65_536);
    assert_eq!(target.totp_get(7).unwrap().unwrap().last_step, 99);
    assert!(!target.totp_attempt_passed(7, 99).unwrap());
    assert_eq!(target.aws_refusals().unwrap().len(), 1);

    // A second copy into it is refused, and changes nothing.
    let mut read = |since, limit| source.audit_since(since, limit);
    let e = target.import(&copy, &mut read).unwrap_err();
    assert_eq!(e.code(), Code::VersionConflict);
    assert_eq!(log(target.as_ref()).len(), log(source.as_ref()).len());

    // The target numbers versions and chains entries on from the copy.
    add(target.as_ref(), &id("DE"), 3).unwrap();
    assert_eq!(
        add(target.as_ref(), &id("DE"), 3).unwrap_err().code(),
        Code::VersionConflict
    );
    assert_eq!(walk(target.as_ref()), log(source.as_ref()).len() + 1);
    assert_ne!(target.export().unwrap().fingerprint(), copy.fingerprint());
}
