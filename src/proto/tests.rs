//! Unit tests of the wire protocol: each answer's bytes are those the daemon has always
//! sent (a `json!` map, whose keys serde_json sorts, or a struct in declaration order), and
//! what the daemon writes, a client reads back.

use serde_json::json;

use super::*;
use crate::domain::audit::AuditOutcome;
use crate::domain::{AwsHealth, AwsProblem, AwsState, AwsStatus, Code, VerificationMode};
use crate::domain::{VersionStatus, VersionType};

/// The typed value's JSON is exactly the map's (keys in the map's sorted order).
fn same_bytes<T: Serialize>(typed: &T, map: serde_json::Value) {
    assert_eq!(serde_json::to_string(typed).unwrap(), map.to_string());
}

#[test]
fn errors() {
    same_bytes(
        &ErrorDocument::new(Code::KeyNotFound, "no key p/DE"),
        json!({"error": {"code": "key_not_found", "message": "no key p/DE"}}),
    );
    let item = ItemError {
        error: ItemErrorBody {
            code: Code::EncryptionLimit,
            message: "m".into(),
            status: 409,
        },
    };
    same_bytes(
        &item,
        json!({"error": {"code": "encryption_limit", "status": 409, "message": "m"}}),
    );
}

fn version_doc(error: Option<&str>) -> VersionDocument {
    VersionDocument {
        created: "2024-01-01T00:00:00Z".into(),
        error: error.map(str::to_string),
        records_decrypted: 1,
        records_encrypted: 2,
        records_rewrapped: 3,
        records_rewrapped_away: 4,
        rotation_period_months: Some(1),
        status: VersionStatus::Active,
        kind: VersionType::Managed,
        version: 7,
    }
}

#[test]
fn keys() {
    let list = KeyList {
        keys: vec![KeySummary {
            active_version: Some(2),
            available_versions: 2,
            country: "DE".into(),
            environment: "p".into(),
            problem: None,
            rotation_period_months: Some(1),
            versions: 2,
        }],
    };
    same_bytes(
        &list,
        json!({"keys": [{
            "environment": "p", "country": "DE", "active_version": 2, "versions": 2,
            "available_versions": 2, "rotation_period_months": 1, "problem": null,
        }]}),
    );
    let key = KeyDocument {
        active_version: Some(7),
        country: "DE".into(),
        created: "2024-01-01T00:00:00Z".into(),
        environment: "p".into(),
        next_rotation: None,
        problem: None,
        rotation_period_days: Some(30),
        rotation_period_months: Some(1),
        versions: vec![version_doc(None), version_doc(Some("gone"))],
    };
    let version = |error: Option<&str>| {
        let mut v = json!({
            "version": 7, "type": "incountry-managed", "rotation_period_months": 1,
            "created": "2024-01-01T00:00:00Z", "status": "active", "records_encrypted": 2,
            "records_rewrapped": 3, "records_decrypted": 1, "records_rewrapped_away": 4,
        });
        if let Some(e) = error {
            v["error"] = json!(e);
        }
        v
    };
    same_bytes(
        &key,
        json!({
            "environment": "p", "country": "DE", "created": "2024-01-01T00:00:00Z",
            "rotation_period_days": 30, "rotation_period_months": 1, "active_version": 7,
            "next_rotation": null, "problem": null,
            "versions": [version(None), version(Some("gone"))],
        }),
    );
    let back: KeyDocument = serde_json::from_str(&serde_json::to_string(&key).unwrap()).unwrap();
    assert_eq!(back, key);
}

#[test]
fn admin_answers() {
    let made = VersionAdded {
        environment: "p".into(),
        country: "DE".into(),
        version: 1,
        kind: VersionType::Aws,
        created: "2024-01-01T00:00:00Z".into(),
        key_created: true,
    };
    // A struct on the wire from the start: declaration order.
    assert_eq!(
        serde_json::to_string(&made).unwrap(),
        r#"{"environment":"p","country":"DE","version":1,"type":"aws","created":"2024-01-01T00:00:00Z","key_created":true}"#
    );
    let enrollment = Enrollment {
        otpauth_uri: "otpauth://totp/x".to_string().into(),
        secret_base32: "AAAA".to_string().into(),
        expires_in_seconds: 600,
    };
    assert_eq!(
        serde_json::to_string(&enrollment).unwrap(),
        r#"{"otpauth_uri":"otpauth://totp/x","secret_base32":"AAAA","expires_in_seconds":600}"#
    );
    same_bytes(
        &Enrolled {
            enrolled: true,
            uid: 1000,
        },
        json!({"enrolled": true, "uid": 1000}),
    );
    same_bytes(
        &ClockAnswer {
            now: "x".into(),
            unix: 5,
        },
        json!({"now": "x", "unix": 5}),
    );
}

#[test]
fn audit_page() {
    let entry = AuditEntryDocument {
        action: "create".into(),
        actor: "uid:0".into(),
        country: Some("DE".into()),
        detail: "new incountry-managed version".into(),
        environment: Some("p".into()),
        gid: Some(0),
        hash: "h".into(),
        mac: None,
        outcome: AuditOutcome::Ok,
        pid: Some(1),
        prev_hash: "p".into(),
        seq: 3,
        time: 10,
        uid: Some(0),
        version: Some(1),
    };
    let mut with_mac = entry.clone();
    with_mac.mac = Some("m".into());
    let map = |mac: Option<&str>| {
        let mut m = json!({
            "seq": 3, "time": 10, "actor": "uid:0", "uid": 0, "gid": 0, "pid": 1,
            "action": "create", "environment": "p", "country": "DE", "version": 1,
            "outcome": "ok", "detail": "new incountry-managed version", "prev_hash": "p",
            "hash": "h",
        });
        if let Some(mac) = mac {
            m["mac"] = json!(mac);
        }
        m
    };
    same_bytes(
        &AuditPage {
            entries: vec![entry, with_mac],
            next: 3,
        },
        json!({"entries": [map(None), map(Some("m"))], "next": 3}),
    );
}

#[test]
fn health() {
    let aws = AwsHealth {
        problems: vec![AwsProblem {
            code: Code::KmsUnavailable,
            error: "e".into(),
            failures: 2,
            key: "p/DE".into(),
            last_success: None,
            state: AwsState::Unreachable,
            version: 3,
        }],
        status: AwsStatus::Degraded,
        versions: 1,
    };
    let doc = HealthDocument {
        aws,
        cluster: None,
        hsm: Condition::Ok,
        hsm_error: None,
        hsm_reconnects: 0,
        keys: 1,
        propagation: None,
        rotation: RotationHealth {
            checks: 4,
            failing: vec![RotationFailure {
                attempts: 1,
                error: "e".into(),
                key: "p/DE".into(),
                retry_in_seconds: 5,
            }],
            last_check: Some("t".into()),
        },
        state: Condition::Unavailable,
        state_error: Some("disk".into()),
        status: HealthStatus::Degraded,
        unavailable_versions: vec!["p/DE v3".into()],
        verification: VerificationMode::Totp,
        versions: 3,
    };
    // A node of a shared state says how other nodes' changes reach it.
    let mut shared = doc.clone();
    shared.propagation = Some(PropagationHealth {
        last_delay_ms: Some(12),
        last_reload: None,
    });
    let text = serde_json::to_string(&shared).unwrap();
    assert!(
        text.contains(
            r#""keys":1,"propagation":{"last_delay_ms":12,"last_reload":null},"rotation""#
        ),
        "{text}"
    );
    // A node of a cluster adds its name and role; one without a cluster (SQLite) nothing.
    let mut in_cluster = doc.clone();
    in_cluster.cluster = Some(ClusterHealth {
        node: "a".into(),
        role: NodeRole::Follower,
    });
    let wire = serde_json::to_value(&in_cluster).unwrap();
    assert_eq!(wire["cluster"], json!({"node": "a", "role": "follower"}));
    let full = Health::Full(Box::new(doc));
    same_bytes(
        &full,
        json!({
            "status": "degraded", "hsm": "ok", "hsm_reconnects": 0, "state": "unavailable",
            "keys": 1, "versions": 3, "unavailable_versions": ["p/DE v3"],
            "verification": "totp",
            "rotation": {"checks": 4, "last_check": "t", "failing": [
                {"key": "p/DE", "attempts": 1, "error": "e", "retry_in_seconds": 5}
            ]},
            "aws": {"status": "degraded", "versions": 1, "problems": [{
                "key": "p/DE", "version": 3, "state": "unreachable", "code": "kms_unavailable",
                "error": "e", "last_success": null, "failures": 2,
            }]},
            "state_error": "disk",
        }),
    );
    let bare = Health::Bare(BareHealth {
        status: HealthStatus::Ok,
    });
    same_bytes(&bare, json!({"status": "ok"}));
    // A client reads whichever it got.
    let read = |h: &Health| -> Health {
        serde_json::from_str(&serde_json::to_string(h).unwrap()).unwrap()
    };
    assert!(matches!(read(&full), Health::Full(_)));
    assert!(matches!(read(&bare), Health::Bare(_)));
    assert_eq!(read(&full).status(), HealthStatus::Degraded);
}

#[test]
fn records() {
    same_bytes(
        &RecordAnswer::Encrypted(Encrypted {
            ciphertext: "2:x".into(),
            version: 2,
        }),
        json!({"ciphertext": "2:x", "version": 2}),
    );
    same_bytes(
        &RecordAnswer::Decrypted(Decrypted {
            plaintext: "hi".to_string().into(),
        }),
        json!({"plaintext": "hi"}),
    );
    let rewrapped = Rewrapped {
        ciphertext: "2:y".into(),
        rewrapped: true,
        version: 3,
    };
    same_bytes(
        &rewrapped,
        json!({"ciphertext": "2:y", "version": 3, "rewrapped": true}),
    );
    let error = ItemError {
        error: ItemErrorBody {
            code: Code::DecryptionFailed,
            message: "m".into(),
            status: 400,
        },
    };
    let batch = BatchAnswer {
        failed: 1,
        results: vec![
            ItemResult::Done(RecordAnswer::Rewrapped(rewrapped.clone())),
            ItemResult::Failed(error.clone()),
        ],
        succeeded: 1,
    };
    same_bytes(
        &batch,
        json!({"succeeded": 1, "failed": 1, "results": [
            {"ciphertext": "2:y", "version": 3, "rewrapped": true},
            {"error": {"code": "decryption_failed", "status": 400, "message": "m"}},
        ]}),
    );
    // A client reads each item as its answer or its error.
    let back: BatchAnswer<Rewrapped> =
        serde_json::from_str(&serde_json::to_string(&batch).unwrap()).unwrap();
    assert!(matches!(&back.results[0], ItemResult::Done(r) if *r == rewrapped));
    assert!(matches!(&back.results[1], ItemResult::Failed(e) if *e == error));
    let items: Vec<_> = back
        .results
        .into_iter()
        .map(ItemResult::into_result)
        .collect();
    assert_eq!(items, vec![Ok(rewrapped.clone()), Err(error.error.clone())]);

    // Requests: a decrypt of a `pt:` record sends its null version, as the CLI always has.
    let req = CipherRequest {
        ciphertext: "pt:eA==".into(),
        version: None,
    };
    same_bytes(&req, json!({"ciphertext": "pt:eA==", "version": null}));
    same_bytes(
        &BatchRequest {
            batch: vec![EncryptRequest {
                plaintext: "a".into(),
            }],
        },
        json!({"batch": [{"plaintext": "a"}]}),
    );
    assert!(serde_json::from_str::<EncryptRequest>(r#"{"plaintext":"a","x":1}"#).is_err());
}

#[test]
fn requests_leave_out_what_is_not_given() {
    let create = CreateKeyRequest {
        kind: "incountry-managed".into(),
        rotation_period_days: Some(30),
        region: None,
        encrypted_key: None,
        cmk_arn: None,
        access_key_id: None,
        secret_access_key: None,
    };
    assert_eq!(
        serde_json::to_string(&create).unwrap(),
        r#"{"type":"incountry-managed","rotation_period_days":30}"#
    );
    assert_eq!(
        serde_json::to_string(&PeriodRequest::default()).unwrap(),
        "{}"
    );
    assert!(serde_json::from_str::<PeriodRequest>(r#"{"colour":1}"#).is_err());
}

#[test]
fn largest_record_fits_a_batch_of_one() {
    let max_body = 1024 * 1024;
    let n = max_plaintext(max_body);
    assert_eq!(n, 786_301);
    let request = |ct: String| {
        serde_json::to_string(&BatchRequest {
            batch: vec![CipherRequest {
                ciphertext: ct,
                version: Some(u32::MAX),
            }],
        })
        .unwrap()
    };
    let ct = crate::domain::crypto::encrypt(&[3u8; 32], &vec![b'a'; n]).unwrap();
    assert!(request(ct).len() <= max_body);
    let ct = crate::domain::crypto::encrypt(&[3u8; 32], &vec![b'a'; n + 3]).unwrap();
    assert!(request(ct).len() > max_body);
    assert_eq!(max_plaintext(10), 0);
}

#[test]
fn the_secrets_document_reads() {
    let text = r#"{"currentVersion":2,"secrets":[{"secret":"AAAA","version":1,"isKey":true},{"secret":"BBBB","version":2,"isKey":true}]}"#;
    let doc: SecretsDocument = serde_json::from_str(text).unwrap();
    assert_eq!(doc.current_version, 2);
    assert_eq!(doc.secrets.len(), 2);
    assert!(doc.secrets[1].is_key);
    assert_eq!(doc.secrets[1].secret.as_str(), "BBBB");
}
