//! Unit tests of routing: every path and method to its route, and the 404 and 405 cases.

use super::*;

fn route(method: Method, path: &str) -> std::result::Result<Route<'_>, Miss> {
    resolve(&method, path)
}

#[test]
fn every_route_by_method_and_path() {
    let cases = [
        (Method::GET, "/v1/health", Route::Health),
        (Method::GET, "/metrics", Route::Metrics),
        (Method::GET, "/v1/keys", Route::ListKeys),
        (Method::GET, "/v1/keys/", Route::ListKeys),
        (
            Method::GET,
            "/v1/keys/prod/DE",
            Route::ShowKey("prod", "DE"),
        ),
        (
            Method::POST,
            "/v1/keys/prod/DE",
            Route::CreateKey("prod", "DE"),
        ),
        (
            Method::PATCH,
            "/v1/keys/prod/DE",
            Route::ChangeSettings("prod", "DE"),
        ),
        (
            Method::POST,
            "/v1/keys/prod/DE/rotate",
            Route::Rotate("prod", "DE"),
        ),
        (
            Method::GET,
            "/v1/keys/prod/de/secrets",
            Route::Secrets("prod", "de"),
        ),
        (
            Method::POST,
            "/v1/keys/prod/DE/encrypt",
            Route::Records("prod", "DE", Op::Encrypt),
        ),
        (
            Method::POST,
            "/v1/keys/prod/DE/decrypt",
            Route::Records("prod", "DE", Op::Decrypt),
        ),
        (
            Method::POST,
            "/v1/keys/prod/DE/rewrap/",
            Route::Records("prod", "DE", Op::Rewrap),
        ),
        (Method::GET, "/v1/audit", Route::ReadAudit),
        (Method::POST, "/v1/admin/totp/enroll", Route::TotpEnroll),
        (Method::POST, "/v1/admin/totp/confirm", Route::TotpConfirm),
        #[cfg(feature = "test-clock")]
        (Method::POST, "/v1/test/clock", Route::AdvanceClock),
    ];
    for (method, path, want) in cases {
        assert_eq!(route(method.clone(), path), Ok(want), "{method} {path}");
    }
}

#[test]
fn unknown_paths_are_404() {
    for path in [
        "/",
        "",
        "/v1",
        "/v2/keys",
        "/v1/keys/prod",
        "/v1/keys/prod/DE/secrets/x",
        "/v1/keys/prod/DE/sign",
        "/v1/admin/totp",
        "/V1/health",
        "/v1//health",
        "/metrics/x",
    ] {
        assert_eq!(route(Method::GET, path), Err(Miss::NoSuchPath), "{path}");
    }
}

#[test]
fn other_methods_are_405_with_allow() {
    for (method, path, allow) in [
        (Method::POST, "/v1/health", "GET"),
        (Method::HEAD, "/v1/keys", "GET"),
        (Method::DELETE, "/v1/keys/prod/DE", "GET, POST, PATCH"),
        (Method::PUT, "/v1/keys/prod/DE", "GET, POST, PATCH"),
        (Method::GET, "/v1/keys/prod/DE/rotate", "POST"),
        (Method::POST, "/v1/keys/prod/DE/secrets", "GET"),
        (Method::GET, "/v1/keys/prod/DE/encrypt", "POST"),
        (Method::PATCH, "/v1/admin/totp/enroll", "POST"),
        (Method::DELETE, "/v1/audit", "GET"),
        (Method::POST, "/metrics", "GET"),
    ] {
        assert_eq!(
            route(method.clone(), path),
            Err(Miss::MethodNotAllowed(allow)),
            "{method} {path}"
        );
    }
}

#[test]
fn every_allowed_method_has_a_route() {
    let paths = [
        "/v1/health",
        "/metrics",
        "/v1/keys",
        "/v1/keys/p/DE",
        "/v1/keys/p/DE/secrets",
        "/v1/keys/p/DE/rotate",
        "/v1/keys/p/DE/encrypt",
        "/v1/keys/p/DE/decrypt",
        "/v1/keys/p/DE/rewrap",
        "/v1/audit",
        "/v1/admin/totp/enroll",
        "/v1/admin/totp/confirm",
    ];
    for path in paths {
        let resource = Resource::parse(path).unwrap();
        for m in resource.allow().split(", ") {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            assert!(resource.route(&method).is_some(), "{m} {path}");
        }
    }
}

#[test]
fn metrics_names_are_bounded() {
    assert_eq!(Resource::parse("/v1/keys/a/DE").unwrap().name(), "key");
    assert_eq!(Resource::parse("/v1/keys/b/FR").unwrap().name(), "key");
    assert_eq!(
        Resource::parse("/v1/keys/b/FR/rewrap").unwrap().name(),
        "rewrap"
    );
    assert_eq!(
        Resource::parse("/v1/admin/totp/enroll").unwrap().name(),
        "totp_enroll"
    );
}
