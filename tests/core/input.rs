//! The documented answers to bad input: nothing made, the daemon healthy.

use harness::Daemon;
use serde_json::json;

#[test]
fn bad_input_table() {
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let big = format!(
        "{{\"type\":\"incountry-managed\",\"pad\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/v1/keys/bad$env/DE".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            "invalid_environment",
        ),
        (
            "GET",
            format!("/v1/keys/{}/DE", "e".repeat(65)),
            String::new(),
            400,
            "invalid_environment",
        ),
        (
            "POST",
            "/v1/keys/prod/XX".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            "invalid_country",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":45}).to_string(),
            400,
            "invalid_rotation_period",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":30,"colour":"red"})
                .to_string(),
            400,
            "unknown_field",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            "{\"type\":\"incountry-man".into(),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"rot13","rotation_period_days":30}).to_string(),
            400,
            "invalid_type",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            big,
            413,
            "body_too_large",
        ),
        (
            "DELETE",
            "/v1/keys/prod/DE".into(),
            String::new(),
            405,
            "method_not_allowed",
        ),
        (
            "GET",
            "/v1/keys/prod/PL".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        (
            "POST",
            "/v1/keys/prod/PL/rotate".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        (
            "GET",
            "/v1/keys/prod/PL/secrets".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        ("GET", "/v1/nothing".into(), String::new(), 404, "not_found"),
        (
            "PATCH",
            "/v1/keys/prod/DE".into(),
            json!({"rotation_period_days":7}).to_string(),
            400,
            "invalid_rotation_period",
        ),
        (
            "GET",
            "/v1/keys/prod/DE/secrets?wait=0".into(),
            String::new(),
            400,
            "invalid_wait",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = d.request(method, &path, &body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(r.error_code(), code, "{method} {path}");
        assert!(r.json()["error"]["message"].is_string());
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
    assert_eq!(
        d.get("/v1/keys").json()["keys"].as_array().unwrap().len(),
        1
    );
    let h = d.get("/v1/health").json();
    assert_eq!(h["hsm"], "ok");
    // Settings work and are shown.
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/DE",
        &json!({"rotation_period_days":180}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["rotation_period_months"], 6);
}
