//! The documented answers to bad input: nothing made, the daemon healthy.

use harness::Daemon;
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Condition, KeyDocument};
use serde_json::json;

#[test]
fn bad_input_table() {
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let big = format!(
        "{{\"type\":\"incountry-managed\",\"pad\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let cases: Vec<(&str, String, String, u16, Code)> = vec![
        (
            "POST",
            "/v1/keys/bad$env/DE".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            Code::InvalidEnvironment,
        ),
        (
            "GET",
            format!("/v1/keys/{}/DE", "e".repeat(65)),
            String::new(),
            400,
            Code::InvalidEnvironment,
        ),
        (
            "POST",
            "/v1/keys/prod/XX".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            Code::InvalidCountry,
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":45}).to_string(),
            400,
            Code::InvalidRotationPeriod,
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":30,"colour":"red"})
                .to_string(),
            400,
            Code::UnknownField,
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            "{\"type\":\"incountry-man".into(),
            400,
            Code::MalformedJson,
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"rot13","rotation_period_days":30}).to_string(),
            400,
            Code::InvalidType,
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            big,
            413,
            Code::BodyTooLarge,
        ),
        (
            "DELETE",
            "/v1/keys/prod/DE".into(),
            String::new(),
            405,
            Code::MethodNotAllowed,
        ),
        (
            "GET",
            "/v1/keys/prod/PL".into(),
            String::new(),
            404,
            Code::KeyNotFound,
        ),
        (
            "POST",
            "/v1/keys/prod/PL/rotate".into(),
            String::new(),
            404,
            Code::KeyNotFound,
        ),
        (
            "GET",
            "/v1/keys/prod/PL/secrets".into(),
            String::new(),
            404,
            Code::KeyNotFound,
        ),
        (
            "GET",
            "/v1/nothing".into(),
            String::new(),
            404,
            Code::NotFound,
        ),
        (
            "PATCH",
            "/v1/keys/prod/DE".into(),
            json!({"rotation_period_days":7}).to_string(),
            400,
            Code::InvalidRotationPeriod,
        ),
        (
            "GET",
            "/v1/keys/prod/DE/secrets?wait=0".into(),
            String::new(),
            400,
            Code::InvalidWait,
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = d.request(method, &path, &body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        // An error document, with a message.
        assert_eq!(r.code(), code, "{method} {path}");
    }
    let r = d.request("DELETE", "/v1/keys/prod/DE", "");
    assert_eq!(r.header("allow"), Some("GET, POST, PATCH"));
    // The unknown field is named.
    let r = d.post(
        "/v1/keys/prod/ES",
        json!({"type":"incountry-managed","colour":"red"}),
    );
    assert!(r.text().contains("colour"), "{}", r.text());
    // Nothing was made by the bad requests; the daemon is healthy.
    assert_eq!(d.keys().keys.len(), 1);
    assert_eq!(d.health().hsm, Condition::Ok);
    // Settings work and are shown.
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/DE",
        &json!({"rotation_period_days":180}).to_string(),
    );
    assert_eq!(r.ok::<KeyDocument>(200).rotation_period_months, Some(6));
}
