//! Revalidation: a revoked CMK makes its versions unavailable until it is enabled again; a
//! KMS outage keeps the cached keys served until `max_stale`.

use harness::moto::Moto;
use harness::needs_test_clock;
use incountry_keyd::domain::audit::AuditOutcome;
use incountry_keyd::domain::{AwsState, AwsStatus, Code, VersionStatus};
use incountry_keyd::proto::HealthStatus;
use serde_json::json;

use crate::{register, start, status_of, wait_for, Kms};

#[test]
fn revoked_cmk_makes_versions_unavailable_until_enabled_again() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "24h", 10);
    assert_eq!(
        register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a)).status,
        201
    );
    // A managed version on top: v1 (aws) is deprecated, v2 (managed) active.
    let r = d.post(
        "/v1/keys/prod/DE/rotate",
        json!({"rotation_period_days": 30}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let managed = d.secrets("prod", "DE").keys()[1].clone();

    kms.key_state("disable", &kms.cmk_a);
    wait_for(20, "v1 unavailable after DisableKey", &d, || {
        status_of(&d, "DE", 1) == VersionStatus::Unavailable
    });
    let why = d.versions("prod", "DE")[0].error.clone().unwrap();
    assert!(why.contains("disabled"), "{why}");
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc.current_version, 2);
    assert_eq!(doc.keys(), vec![managed.clone()]);
    let health = d.health();
    assert_eq!(health.status, HealthStatus::Degraded);
    assert_eq!(
        health.aws.problems[0].state,
        AwsState::Revoked,
        "{health:?}"
    );
    assert!(health
        .unavailable_versions
        .contains(&"prod/DE v1".to_string()));
    assert!(d.log_text().contains("no longer served"));

    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 restored after EnableKey", &d, || {
        status_of(&d, "DE", 1) == VersionStatus::Deprecated
    });
    assert_eq!(
        d.secrets("prod", "DE").keys(),
        vec![(1, kms.key32_plain.clone()), managed.clone()]
    );
    assert_eq!(d.health().aws.status, AwsStatus::Ok);
    let revalidations: Vec<(AuditOutcome, String)> = d
        .audit(0)
        .entries
        .into_iter()
        .filter(|e| e.action == "kms-revalidate" && e.version == Some(1))
        .map(|e| (e.outcome, e.detail))
        .collect();
    assert_eq!(revalidations.len(), 2, "{revalidations:?}");
    assert_eq!(revalidations[0].0, AuditOutcome::Failed);
    assert!(revalidations[0].1.contains("disabled"), "{revalidations:?}");
    assert_eq!(revalidations[1].0, AuditOutcome::Ok);

    // An active aws version whose CMK goes pending deletion: the document cannot be served
    // (its current version is gone), and says why.
    let keys = kms.data_keys(&kms.cmk_a, 1);
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    kms.key_state("schedule-deletion", &kms.cmk_a);
    wait_for(20, "v3 unavailable after ScheduleKeyDeletion", &d, || {
        status_of(&d, "DE", 3) == VersionStatus::Unavailable
            && status_of(&d, "DE", 1) == VersionStatus::Unavailable
    });
    let show = d.key("prod", "DE");
    assert!(
        show.versions[2]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("pending deletion")),
        "{show:?}"
    );
    let r = d.get("/v1/keys/prod/DE/secrets");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), Code::ActiveVersionUnavailable);

    kms.key_state("cancel-deletion", &kms.cmk_a);
    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 and v3 restored", &d, || {
        status_of(&d, "DE", 3) == VersionStatus::Active
            && status_of(&d, "DE", 1) == VersionStatus::Deprecated
    });
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc.current_version, 3);
    assert_eq!(doc.keys()[2], (3, keys[0].1.clone()));
}

#[test]
fn kms_outage_keeps_serving_until_max_stale() {
    needs_test_clock!();
    let mut moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "1h", 10);
    assert_eq!(
        register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a)).status,
        201
    );
    let keys = kms.data_keys(&kms.cmk_a, 1);
    moto.stop();

    wait_for(30, "health degraded while KMS is down", &d, || {
        d.health().aws.status == AwsStatus::Degraded
    });
    let health = d.health();
    assert_eq!(health.status, HealthStatus::Degraded);
    let problem = &health.aws.problems[0];
    assert_eq!(problem.state, AwsState::Unreachable, "{health:?}");
    assert!(problem.last_success.as_deref().unwrap().ends_with('Z'));
    // The cached key still serves.
    assert_eq!(status_of(&d, "DE", 1), VersionStatus::Active);
    assert_eq!(
        d.secrets("prod", "DE").keys(),
        vec![(1, kms.key32_plain.clone())]
    );
    // A registration cannot be checked: 503, nothing stored.
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), Code::KmsUnavailable);
    assert_eq!(d.versions("prod", "DE").len(), 1);

    // Past max_stale without a successful check: no longer served.
    d.advance(3_700);
    wait_for(30, "v1 unavailable past max_stale", &d, || {
        status_of(&d, "DE", 1) == VersionStatus::Unavailable
    });
    let show = d.key("prod", "DE");
    assert!(
        show.versions[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("max_stale")),
        "{show:?}"
    );
    assert_eq!(d.health().aws.problems[0].state, AwsState::Stale);
    assert_eq!(d.get("/v1/keys/prod/DE/secrets").status, 503);
}
