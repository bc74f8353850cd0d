//! Revalidation: a revoked CMK makes its versions unavailable until it is enabled again; a
//! KMS outage keeps the cached keys served until `max_stale`.

use harness::moto::Moto;
use harness::needs_test_clock;
use serde_json::json;

use crate::{register, secrets_map, start, status_of, wait_for, Kms};

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
    let managed = secrets_map(&d.secrets("prod", "DE"))[1].clone();

    kms.key_state("disable", &kms.cmk_a);
    wait_for(20, "v1 unavailable after DisableKey", &d, || {
        status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    let why = show["versions"][0]["error"].as_str().unwrap();
    assert!(why.contains("disabled"), "{why}");
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 2);
    assert_eq!(secrets_map(&doc), vec![managed.clone()]);
    let health = d.get("/v1/health").json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["aws"]["problems"][0]["state"], "revoked", "{health}");
    assert!(health["unavailable_versions"]
        .as_array()
        .unwrap()
        .contains(&json!("prod/DE v1")));
    assert!(d.log_text().contains("no longer served"));

    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 restored after EnableKey", &d, || {
        status_of(&d, "DE", 1) == "deprecated"
    });
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone()), managed.clone()]
    );
    assert_eq!(d.get("/v1/health").json()["aws"]["status"], "ok");
    let audit = d.get("/v1/audit?since=0").json()["entries"].clone();
    let revalidations: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "kms-revalidate" && e["version"] == 1)
        .map(|e| {
            (
                e["outcome"].as_str().unwrap().into(),
                e["detail"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(revalidations.len(), 2, "{revalidations:?}");
    assert_eq!(revalidations[0].0, "failed");
    assert!(revalidations[0].1.contains("disabled"), "{revalidations:?}");
    assert_eq!(revalidations[1].0, "ok");

    // An active aws version whose CMK goes pending deletion: the document cannot be served
    // (its current version is gone), and says why.
    let keys = kms.data_keys(&kms.cmk_a, 1);
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    kms.key_state("schedule-deletion", &kms.cmk_a);
    wait_for(20, "v3 unavailable after ScheduleKeyDeletion", &d, || {
        status_of(&d, "DE", 3) == "unavailable" && status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    assert!(
        show["versions"][2]["error"]
            .as_str()
            .unwrap()
            .contains("pending deletion"),
        "{show}"
    );
    let r = d.get("/v1/keys/prod/DE/secrets");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "active_version_unavailable");

    kms.key_state("cancel-deletion", &kms.cmk_a);
    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 and v3 restored", &d, || {
        status_of(&d, "DE", 3) == "active" && status_of(&d, "DE", 1) == "deprecated"
    });
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 3);
    assert_eq!(secrets_map(&doc)[2], (3, keys[0].1.clone()));
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
        d.get("/v1/health").json()["aws"]["status"] == "degraded"
    });
    let health = d.get("/v1/health").json();
    assert_eq!(health["status"], "degraded");
    let problem = &health["aws"]["problems"][0];
    assert_eq!(problem["state"], "unreachable", "{health}");
    assert!(problem["last_success"].as_str().unwrap().ends_with('Z'));
    // The cached key still serves.
    assert_eq!(status_of(&d, "DE", 1), "active");
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone())]
    );
    // A registration cannot be checked: 503, nothing stored.
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "kms_unavailable");
    assert_eq!(
        d.get("/v1/keys/prod/DE").json()["versions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Past max_stale without a successful check: no longer served.
    d.advance(3_700);
    wait_for(30, "v1 unavailable past max_stale", &d, || {
        status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    assert!(
        show["versions"][0]["error"]
            .as_str()
            .unwrap()
            .contains("max_stale"),
        "{show}"
    );
    assert_eq!(
        d.get("/v1/health").json()["aws"]["problems"][0]["state"],
        "stale"
    );
    assert_eq!(d.get("/v1/keys/prod/DE/secrets").status, 503);
}
