//! Admin bodies over HTTP: create, settings, rotate and TOTP confirm, against a model of
//! the contract.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

use incountry_keyd::domain::{Code, VersionType};
use incountry_keyd::proto::KeyDocument;

use crate::bodies::{is_json_refusal, read_body, Read};
use crate::daemon::{after, fresh_env, open_daemon, Reply};
use crate::json::{has_duplicate_keys, shape_faults, Ty};
use crate::strategies::{arb_body_bytes, arb_json, arb_number, config, one_field_changed};

const CREATE_FIELDS: &[(&str, Ty)] = &[
    ("type", Ty::Str),
    ("rotation_period_days", Ty::OptU32),
    ("region", Ty::OptStr),
    ("encrypted_key", Ty::OptStr),
    ("cmk_arn", Ty::OptStr),
    ("access_key_id", Ty::OptStr),
    ("secret_access_key", Ty::OptStr),
];

const PERIOD_FIELDS: &[(&str, Ty)] = &[("rotation_period_days", Ty::OptU32)];

const AWS_FIELDS: [&str; 5] = [
    "region",
    "encrypted_key",
    "cmk_arn",
    "access_key_id",
    "secret_access_key",
];

/// What `aws_source` may refuse with (its shape checks; this KMS accepts the rest).
const AWS_CODES: &[Code] = &[
    Code::InvalidRotationPeriod,
    Code::MissingField,
    Code::InvalidRegion,
    Code::InvalidCmkArn,
    Code::InvalidEncryptedKey,
    Code::InvalidAccessKeyId,
    Code::InvalidSecretAccessKey,
];

fn arb_period() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(30),
            json!(60),
            json!(180),
            json!(360),
            Value::Null
        ]),
        arb_number(),
        arb_json(),
    ]
}

/// A well-formed aws registration (every field inside the shape rules).
fn arb_aws_fields() -> impl Strategy<Value = Value> {
    (
        "[a-z]{2}-[a-z]{4,9}-[1-9]",
        "[0-9]{12}",
        "(key/[0-9a-f-]{1,36})|(alias/[A-Za-z0-9_-]{1,20})",
        prop::collection::vec(any::<u8>(), 1..200),
        "[A-Z0-9]{16,40}",
        "[!-~]{1,60}",
    )
        .prop_map(|(region, account, key, blob, id, secret)| {
            json!({
                "type": "aws",
                "region": region,
                "cmk_arn": format!("arn:aws:kms:{region}:{account}:{key}"),
                "encrypted_key": STANDARD.encode(blob),
                "access_key_id": id,
                "secret_access_key": secret,
            })
        })
}

fn arb_create_body() -> impl Strategy<Value = Value> {
    let managed = arb_period()
        .prop_map(|p| json!({"type": "incountry-managed", "rotation_period_days": p}))
        .boxed();
    prop_oneof![
        3 => managed.clone(),
        2 => arb_aws_fields(),
        // One field changed or added.
        3 => one_field_changed(prop_oneof![managed, arb_aws_fields()].boxed()),
        1 => arb_json(),
    ]
}

/// What an admin route's body turned out to be.
enum Parsed {
    /// Empty or whitespace: the route's "no body" meaning.
    NoBody,
    /// Refused for not being a JSON object or for its shape, as checked.
    Refused,
    /// Parses into the route's struct; the checks of its values are the caller's.
    Body(Value),
}

/// Guards an admin route's body: the rules every body shares (`read_body`: no server
/// error, a JSON answer, a body that is not an object refused), then an object that does
/// not parse, or is of the wrong shape (or has a key twice, which serde's typed parse
/// refuses), is refused with a code of its kind.
fn check_admin_body(
    body: &[u8],
    r: &Reply,
    fields: &[(&str, Ty)],
) -> Result<Parsed, TestCaseError> {
    let v = match read_body(body, r)? {
        Read::Empty => return Ok(Parsed::NoBody),
        Read::Refused => return Ok(Parsed::Refused),
        Read::Broken => {
            prop_assert!(is_json_refusal(r), "{}", after(r, body));
            return Ok(Parsed::Refused);
        }
        Read::Object(v) => v,
    };
    let faults = shape_faults(&v, fields);
    let duplicates = has_duplicate_keys(body);
    if faults.is_empty() && !duplicates {
        return Ok(Parsed::Body(v));
    }
    prop_assert!(is_json_refusal(r), "{}", after(r, body));
    if !duplicates {
        prop_assert!(
            r.error_code().is_some_and(|c| faults.contains(&c)),
            "want {:?}: {}",
            faults,
            after(r, body)
        );
    }
    Ok(Parsed::Refused)
}

/// Bodies for settings and rotate: `{"rotation_period_days": ...}` or any JSON, as bytes.
fn arb_period_body() -> impl Strategy<Value = Vec<u8>> {
    arb_body_bytes(prop_oneof![
        arb_period().prop_map(|p| json!({ "rotation_period_days": p })),
        arb_json(),
    ])
}

proptest! {
    #![proptest_config(config(96))]

    /// Guards the create body (`POST /v1/keys/{env}/{country}`, each case on a new key):
    /// no body → missing_body; not JSON, not an object or the wrong shape (unknown field,
    /// `type` missing or not a string, a string field of another type, rotation_period_days
    /// negative, fractional or over u32) → the 400 of its kind; a managed key needs a period
    /// of 30/60/180/360 and no aws field, and is created with exactly the period written; an
    /// aws key with well-formed fields is registered as type aws; any other type is
    /// invalid_type. Fails on a panic, a 5xx, or a key created with other values than the
    /// body's.
    #[test]
    fn create_bodies_follow_the_contract(
        body in arb_body_bytes(arb_create_body()),
    ) {
        let d = open_daemon();
        let path = format!("/v1/keys/{}/DE", fresh_env("create"));
        let r = d.request("POST", &path, &body);
        let ctx = || after(&r, &body);
        let v = match check_admin_body(&body, &r, CREATE_FIELDS)? {
            Parsed::Refused => return Ok(()),
            Parsed::NoBody => {
                prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::MissingBody)), "{}", ctx());
                return Ok(());
            }
            Parsed::Body(v) => v,
        };
        // The oracle reads the body it generated (raw on purpose: any JSON).
        let aws_given = AWS_FIELDS.iter().any(|f| !v.get(*f).unwrap_or(&Value::Null).is_null());
        let period = v.get("rotation_period_days").and_then(Value::as_u64);
        match v["type"].as_str().unwrap() {
            "incountry-managed" => {
                let want = if aws_given {
                    Some(Code::InvalidRequest)
                } else {
                    match period {
                        None => Some(Code::MissingRotationPeriod),
                        Some(30 | 60 | 180 | 360) => None,
                        Some(_) => Some(Code::InvalidRotationPeriod),
                    }
                };
                match want {
                    Some(code) => prop_assert_eq!((r.status, r.error_code()), (400, Some(code)), "{}", ctx()),
                    None => {
                        prop_assert_eq!(r.status, 201, "{}", ctx());
                        let doc = d.key_doc(&path);
                        prop_assert_eq!(doc.rotation_period_days.map(u64::from), period, "{}", ctx());
                        prop_assert_eq!(doc.versions[0].kind, VersionType::Managed, "{}", ctx());
                    }
                }
            }
            "aws" => {
                if r.status == 201 {
                    let doc = d.key_doc(&path);
                    prop_assert_eq!(doc.versions[0].kind, VersionType::Aws, "{}", ctx());
                    prop_assert!(period.is_none(), "{}", ctx());
                } else {
                    prop_assert!(r.status == 400 && r.error_code().is_some_and(|c| AWS_CODES.contains(&c)), "{}", ctx());
                }
            }
            _ => prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::InvalidType)), "{}", ctx()),
        }
    }

    /// Guards well-formed aws registrations: every body inside the shape rules (region,
    /// ARN in that region, base64 blob of 1-6144 bytes, access key id, printable secret)
    /// is accepted and registered as an aws version. Fails if a shape rule refuses valid
    /// input.
    #[test]
    fn well_formed_aws_bodies_register(body in arb_aws_fields()) {
        let d = open_daemon();
        let path = format!("/v1/keys/{}/DE", fresh_env("aws"));
        let r = d.post(&path, &body);
        prop_assert_eq!(r.status, 201, "{} -> {}", body, String::from_utf8_lossy(&r.body));
        prop_assert_eq!(d.key_doc(&path).versions[0].kind, VersionType::Aws);
    }

    /// Guards the settings body (`PATCH /v1/keys/{env}/{country}`): no body, `{}` or a null
    /// period → missing_rotation_period; wrong shape or a number outside u32 → 400
    /// invalid_request / unknown_field; a u32 not in 30/60/180/360 → invalid_rotation_period;
    /// an allowed period is stored exactly as written.
    #[test]
    fn settings_bodies_follow_the_contract(
        body in arb_period_body(),
    ) {
        let d = open_daemon();
        let path = settings_key();
        let _one_at_a_time = d.exclusive();
        let r = d.request("PATCH", path, &body);
        let ctx = || after(&r, &body);
        let period = match check_admin_body(&body, &r, PERIOD_FIELDS)? {
            Parsed::Refused => return Ok(()),
            Parsed::NoBody => None,
            // The oracle reads the body it generated.
            Parsed::Body(v) => v["rotation_period_days"].as_u64(),
        };
        match period {
            None => prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::MissingRotationPeriod)), "{}", ctx()),
            Some(p @ (30 | 60 | 180 | 360)) => {
                prop_assert_eq!(r.status, 200, "{}", ctx());
                let answer = serde_json::from_slice::<KeyDocument>(&r.body).map_err(|e| TestCaseError::fail(format!("{e}: {}", ctx())))?;
                prop_assert_eq!(answer.rotation_period_days.map(u64::from), Some(p), "{}", ctx());
                prop_assert_eq!(d.key_doc(path).rotation_period_days.map(u64::from), Some(p));
            }
            Some(_) => prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::InvalidRotationPeriod)), "{}", ctx()),
        }
    }

    /// Guards the rotate body (`POST .../rotate`): no body or `{}` → a new version with the
    /// period kept; an allowed period → a new version and that period; otherwise refused
    /// like settings, with no version made.
    #[test]
    fn rotate_bodies_follow_the_contract(
        body in arb_period_body(),
    ) {
        let d = open_daemon();
        let path = rotate_key();
        // A new UTC day per case: limits.versions_per_day never ends a long run.
        d.clock.advance(86_400);
        let before = d.key_doc(path);
        let r = d.request("POST", &format!("{path}/rotate"), &body);
        let ctx = || after(&r, &body);
        let after = d.key_doc(path);
        let versions = |doc: &KeyDocument| doc.versions.len();
        let period = match check_admin_body(&body, &r, PERIOD_FIELDS)? {
            Parsed::Refused => {
                prop_assert_eq!(versions(&after), versions(&before), "refused but rotated: {}", ctx());
                return Ok(());
            }
            Parsed::NoBody => None,
            // The oracle reads the body it generated.
            Parsed::Body(v) => v["rotation_period_days"].as_u64(),
        };
        match period {
            None | Some(30 | 60 | 180 | 360) => {
                prop_assert_eq!(r.status, 201, "{}", ctx());
                prop_assert_eq!(versions(&after), versions(&before) + 1, "{}", ctx());
                let kept = before.rotation_period_days.map(u64::from);
                prop_assert_eq!(after.rotation_period_days.map(u64::from), period.or(kept), "{}", ctx());
            }
            Some(_) => {
                prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::InvalidRotationPeriod)), "{}", ctx());
                prop_assert_eq!(versions(&after), versions(&before), "{}", ctx());
            }
        }
    }

    /// Guards the TOTP confirmation body (`POST /v1/admin/totp/confirm`): with verification
    /// off, a body that parses as `{"code": string}` reaches the verifier (409
    /// verification_off); no body → missing_body; anything else → the 400 of its kind.
    #[test]
    fn confirm_bodies_follow_the_contract(
        body in arb_body_bytes(prop_oneof![
            any::<String>().prop_map(|c| json!({ "code": c })),
            arb_json().prop_map(|c| json!({ "code": c })),
            arb_json(),
        ]),
    ) {
        let d = open_daemon();
        let r = d.request("POST", "/v1/admin/totp/confirm", &body);
        let ctx = || after(&r, &body);
        match check_admin_body(&body, &r, &[("code", Ty::Str)])? {
            Parsed::Refused => {}
            Parsed::NoBody => prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::MissingBody)), "{}", ctx()),
            Parsed::Body(_) => prop_assert_eq!((r.status, r.error_code()), (409, Some(Code::VerificationOff)), "{}", ctx()),
        }
    }
}

/// The key the settings tests change.
pub fn settings_key() -> &'static str {
    static K: OnceLock<()> = OnceLock::new();
    K.get_or_init(|| open_daemon().create_managed("/v1/keys/settings/DE"));
    "/v1/keys/settings/DE"
}

/// The key the rotate tests rotate.
pub fn rotate_key() -> &'static str {
    static K: OnceLock<()> = OnceLock::new();
    K.get_or_init(|| open_daemon().create_managed("/v1/keys/rotate/DE"));
    "/v1/keys/rotate/DE"
}
