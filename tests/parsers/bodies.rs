//! The body rules every route that reads JSON shares (`read_json`): empty is "no body"; a
//! body whose first non-whitespace byte is not `{` is refused with 400 before the route
//! sees it — malformed_json when it is not JSON, invalid_request ("request body must be a
//! JSON object") when it is (an array, string, number, true, false, null). Then the tests
//! of those rules, and of u32 numbers, across routes.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use incountry_keyd::domain::{crypto, Code};

use crate::admin_bodies::{rotate_key, settings_key};
use crate::daemon::{after, fresh_env, open_daemon, Reply};
use crate::json::is_json_text;
use crate::record_bodies::{record_key, REC_PATH};
use crate::strategies::config;

/// What a route gets of its body once the shared rules are through.
pub enum Read {
    /// Empty or ASCII whitespace only: the route's "no body" meaning.
    Empty,
    /// Refused before the route saw it, as checked.
    Refused,
    /// Starts as an object but is not JSON: the route's own parse refuses it.
    Broken,
    /// A JSON object.
    Object(Value),
}

/// Checks the shared rules on one exchange: no server error, a JSON answer, and a body
/// that does not start with `{` refused as the rules say.
pub fn read_body(body: &[u8], r: &Reply) -> Result<Read, TestCaseError> {
    prop_assert!(r.status < 500, "server error: {}", after(r, body));
    // Raw on purpose: any answer, served or refused, is JSON.
    prop_assert!(
        r.try_json().is_some(),
        "answer is not JSON: {}",
        after(r, body)
    );
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Ok(Read::Empty);
    };
    let parsed = serde_json::from_slice::<Value>(body).ok();
    // The oracle, held to the parser: whatever serde_json reads is a JSON text.
    prop_assert!(
        parsed.is_none() || is_json_text(body),
        "oracle: {:?}",
        String::from_utf8_lossy(body)
    );
    if *first != b'{' {
        let want = if is_json_text(body) {
            Code::InvalidRequest
        } else {
            Code::MalformedJson
        };
        prop_assert!(
            r.status == 400 && r.error_code() == Some(want),
            "want 400 {:?}: {}",
            want,
            after(r, body)
        );
        return Ok(Read::Refused);
    }
    Ok(match parsed {
        Some(v) => {
            prop_assert!(v.is_object());
            Read::Object(v)
        }
        None => Read::Broken,
    })
}

/// How a typed parse (serde's derived structs) refuses a body that is not JSON, or JSON of
/// the wrong shape: it reads as it goes, so an unknown or mistyped field met before a
/// syntax error is what it reports.
pub fn is_json_refusal(r: &Reply) -> bool {
    r.status == 400
        && matches!(
            r.error_code(),
            Some(Code::MalformedJson | Code::InvalidRequest | Code::UnknownField)
        )
}

/// JSON texts that are not objects, one of each kind and some edges: the empty and a
/// nested array, scalars, a number beyond f64 and nesting beyond serde_json's 128 levels
/// (JSON all the same), a lone surrogate escape, whitespace around.
fn not_objects() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "[]",
        "[{}]",
        "[[60]]",
        "null",
        "true",
        "false",
        "0",
        "-1.5e3",
        "1e400",
        "\"{}\"",
        "\"\\ud800\"",
        " \r\n\t[60] ",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push([b"[".repeat(200), b"]".repeat(200)].concat());
    v
}

/// The exchanges of `cases` not answered 400 `want`, described.
fn not_refused(cases: &[(&str, String, Vec<u8>)], want: Code) -> Vec<String> {
    let d = open_daemon();
    let _one_at_a_time = d.exclusive();
    cases
        .iter()
        .filter_map(|(method, path, body)| {
            let r = d.request(method, path, body);
            let hit = (r.status, r.error_code()) == (400, Some(want));
            (!hit).then(|| format!("{method} {path} {}", after(&r, body)))
        })
        .collect()
}

/// Each route with its positional array of fields (what serde's derived structs also read)
/// and every non-object JSON text.
fn with_not_objects(
    routes: Vec<(&'static str, String, &[u8])>,
) -> Vec<(&'static str, String, Vec<u8>)> {
    let mut cases = Vec::new();
    for (method, path, positional) in routes {
        cases.push((method, path.clone(), positional.to_vec()));
        for body in not_objects() {
            cases.push((method, path.clone(), body));
        }
    }
    cases
}

/// The admin routes that read a body; a create of a new key each call.
fn admin_routes() -> Vec<(&'static str, String, &'static [u8])> {
    let mut routes: Vec<(&str, String, &[u8])> = vec![
        (
            "POST",
            format!("/v1/keys/{}/DE", fresh_env("array")),
            br#"["incountry-managed",30,null,null,null,null,null]"#,
        ),
        ("PATCH", settings_key().to_string(), b"[60]"),
        ("POST", format!("{}/rotate", rotate_key()), b"[null]"),
        ("POST", "/v1/admin/totp/confirm".into(), br#"["123456"]"#),
    ];
    if cfg!(feature = "test-clock") {
        routes.push(("POST", "/v1/test/clock".into(), b"[60]"));
    }
    routes
}

/// The record routes, on the records key and on a key that does not exist.
fn record_routes() -> Vec<(&'static str, String, &'static [u8])> {
    record_key();
    let missing = format!("/v1/keys/{}/DE", fresh_env("nokey"));
    let mut routes: Vec<(&str, String, &[u8])> = Vec::new();
    for key in [REC_PATH, &missing] {
        routes.push(("POST", format!("{key}/encrypt"), br#"["x"]"#));
        routes.push(("POST", format!("{key}/decrypt"), br#"["pt:eA==",1]"#));
        routes.push(("POST", format!("{key}/rewrap"), br#"["pt:eA==",null]"#));
    }
    routes
}

/// Guards "an admin body is a JSON object" on create, settings, rotate, TOTP confirm (and
/// the test clock when built in): a positional array of the fields, and every other JSON
/// text that is not an object, is 400 invalid_request. Fails without the object check in
/// `read_json`: serde's derived `Deserialize` of CreateBody, PeriodBody, ConfirmBody and
/// the clock's Advance also reads a sequence, so each positional array would be accepted
/// and act (a key created, a period changed, a version made, a code checked, the clock
/// moved).
#[test]
fn admin_bodies_must_be_objects() {
    let wrong = not_refused(&with_not_objects(admin_routes()), Code::InvalidRequest);
    assert!(
        wrong.is_empty(),
        "non-object bodies not refused:\n{}",
        wrong.join("\n")
    );
}

/// Guards "a record body is a JSON object" before anything else: every JSON text that is
/// not an object is 400 invalid_request on encrypt, decrypt and rewrap, also on a key that
/// does not exist (the body is refused before the key is looked up), where an object body
/// is 404 key_not_found.
#[test]
fn record_bodies_must_be_objects() {
    let wrong = not_refused(&with_not_objects(record_routes()), Code::InvalidRequest);
    assert!(
        wrong.is_empty(),
        "non-object bodies not refused:\n{}",
        wrong.join("\n")
    );
    let missing = format!("/v1/keys/{}/DE/encrypt", fresh_env("nokey"));
    let r = open_daemon().request("POST", &missing, br#"{"plaintext":"x"}"#);
    assert_eq!((r.status, r.code()), (404, Code::KeyNotFound));
}

/// Guards "not JSON → malformed_json" for bodies that would be JSON but for invalid UTF-8
/// in a string (RFC 8259 8.1: a JSON text is UTF-8), on every body-reading route, as for
/// an object body with the same bytes. (serde's `IgnoredAny` alone skips strings without
/// checking their UTF-8: these were once called JSON and got invalid_request.)
#[test]
fn non_utf8_bodies_are_malformed_json() {
    let bodies: [&[u8]; 4] = [
        b"\"\x91\"",
        b"[\"\xff\"]",
        b"[60,\"\xc3\"]",
        b" \"\xed\xa0\x80\" ",
    ];
    let mut cases = Vec::new();
    for (method, path, _) in admin_routes().into_iter().chain(record_routes()) {
        for body in bodies {
            cases.push((method, path.clone(), body.to_vec()));
        }
        // The same bytes in an object (as a key, the first thing any parse reads):
        // malformed_json today.
        cases.push((method, path, b"{\"\x91\":1}".to_vec()));
    }
    let wrong = not_refused(&cases, Code::MalformedJson);
    assert!(
        wrong.is_empty(),
        "invalid UTF-8 not malformed_json:\n{}",
        wrong.join("\n")
    );
}

proptest! {
    #![proptest_config(config(96))]

    /// Guards "out-of-range numbers are refused" for every u32 field a body has (a record's
    /// version, rotation_period_days of create and settings), on the number as written:
    /// a decimal integer 0..=4294967295 parses (and then meets the field's own rules); a
    /// negative, fractional, exponent or larger number is 400 invalid_request; a number
    /// serde_json cannot read (1e400, leading zero, hex) is 400 malformed_json. Fails if a
    /// field wraps, saturates or rounds (e.g. 4294967296 read as 0, 30.0 or 3e1 as 30).
    #[test]
    fn numbers_out_of_range_are_refused(
        literal in prop_oneof![
            (0u64..=u32::MAX as u64).prop_map(|n| n.to_string()),
            prop::sample::select(vec![
                "-1", "-0", "4294967296", "18446744073709551615", "18446744073709551616",
                "30.0", "3e1", "1e400", "-30", "030", "0x1E", "30.5", "1E1", "-4294967295",
                "340282366920938463463374607431768211456", "0.0", "4294967295.0",
            ]).prop_map(str::to_string),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:?}")),
        ],
    ) {
        let d = open_daemon();
        let rk = record_key();
        // In range: a JSON integer without sign ("-0" is a float to serde_json) <= u32::MAX.
        let digits = literal.as_str();
        let is_json_uint = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        let in_range = is_json_uint && digits.parse::<u64>().is_ok_and(|n| n <= u32::MAX as u64);
        let readable = serde_json::from_str::<Value>(&literal).is_ok();
        let want_refusal = if in_range { None } else if readable { Some(Code::InvalidRequest) } else { Some(Code::MalformedJson) };
        let ctx = |what: &str, r: &Reply| format!("{what} {literal} -> {} {}", r.status, String::from_utf8_lossy(&r.body));

        // A record's version: in range → the version's own rules (unknown here → 404).
        let record = crypto::encrypt(&rk.keys[&1], b"n").unwrap();
        let body = format!("{{\"ciphertext\":\"{record}\",\"version\":{literal}}}");
        let r = d.request("POST", &format!("{REC_PATH}/decrypt"), body.as_bytes());
        match want_refusal {
            Some(code) => prop_assert_eq!((r.status, r.error_code()), (400, Some(code)), "{}", ctx("version", &r)),
            None => {
                let n: u64 = digits.parse().unwrap();
                match n {
                    1 => prop_assert_eq!(r.status, 200, "{}", ctx("version", &r)),
                    2 => prop_assert_eq!(r.error_code(), Some(Code::DecryptionFailed), "{}", ctx("version", &r)),
                    _ => prop_assert_eq!(r.error_code(), Some(Code::VersionNotFound), "{}", ctx("version", &r)),
                }
            }
        }

        // rotation_period_days of settings: in range → the allowed values only.
        let _one_at_a_time = d.exclusive();
        let body = format!("{{\"rotation_period_days\":{literal}}}");
        let r = d.request("PATCH", settings_key(), body.as_bytes());
        match want_refusal {
            Some(code) => prop_assert_eq!((r.status, r.error_code()), (400, Some(code)), "{}", ctx("settings", &r)),
            None => match digits.parse::<u64>().unwrap() {
                30 | 60 | 180 | 360 => prop_assert_eq!(r.status, 200, "{}", ctx("settings", &r)),
                _ => prop_assert_eq!(r.error_code(), Some(Code::InvalidRotationPeriod), "{}", ctx("settings", &r)),
            },
        }

        // rotation_period_days of create, with another field after it (so that a lenient
        // number parse cannot hide behind the end of the object).
        let body = format!("{{\"rotation_period_days\":{literal},\"type\":\"incountry-managed\"}}");
        let path = format!("/v1/keys/{}/FR", fresh_env("number"));
        let r = d.request("POST", &path, body.as_bytes());
        match want_refusal {
            Some(code) => prop_assert_eq!((r.status, r.error_code()), (400, Some(code)), "{}", ctx("create", &r)),
            None => match digits.parse::<u64>().unwrap() {
                30 | 60 | 180 | 360 => prop_assert_eq!(r.status, 201, "{}", ctx("create", &r)),
                _ => prop_assert_eq!(r.error_code(), Some(Code::InvalidRotationPeriod), "{}", ctx("create", &r)),
            },
        }
    }
}
