//! What several modules share: the case-count config, the one error check, and the
//! strategies for record strings, JSON values and bytes near JSON.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use serde_json::{json, Value};

use incountry_keyd::domain::crypto::OVERHEAD;
use incountry_keyd::domain::error::Error;

/// `cases` cases, or `PROPTEST_CASES` when set (a longer hunt).
pub fn config(cases: u32) -> ProptestConfig {
    let from_env = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    ProptestConfig {
        cases: from_env.unwrap_or(cases),
        ..ProptestConfig::default()
    }
}

/// A 400 of the daemon's own input checks, with this code.
pub fn is_bad_input(e: &Error, code: &str) -> bool {
    matches!(e, Error::BadInput { .. }) && e.code().as_str() == code
}

/// Record-like strings: anything, the two prefixes (and near misses) before base64-ish
/// text, and base64 of blobs around the minimum length.
pub fn arb_record() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        (
            prop::sample::select(vec!["2:", "pt:", "", "2", "3:", "PT:", "p:", " 2:", "2::"]),
            "[A-Za-z0-9+/=]{0,200}",
        )
            .prop_map(|(p, b)| format!("{p}{b}")),
        (
            prop::sample::select(vec!["2:", "pt:"]),
            prop::collection::vec(any::<u8>(), 0..(OVERHEAD + 40)),
        )
            .prop_map(|(p, b)| format!("{p}{}", STANDARD.encode(b))),
    ]
}

/// Field names the daemon knows, plus near misses.
const FIELDS: &[&str] = &[
    "plaintext",
    "ciphertext",
    "version",
    "batch",
    "type",
    "rotation_period_days",
    "region",
    "encrypted_key",
    "cmk_arn",
    "access_key_id",
    "secret_access_key",
    "code",
    "Plaintext",
    "versions",
    "",
];

pub fn arb_key_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_string),
        1 => ".{0,6}",
    ]
}

/// JSON numbers at the edges of u32 and beyond, and arbitrary ones.
pub fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(2),
            json!(30),
            json!(60),
            json!(180),
            json!(360),
            json!(-1),
            json!(u32::MAX),
            json!(u32::MAX as u64 + 1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(30.0),
            json!(0.5),
            json!(1e300),
            json!(-0.0),
        ]),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u32..400).prop_map(Value::from),
    ]
}

pub fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        arb_number(),
        any::<String>().prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "incountry-managed",
            "aws",
            "2:",
            "pt:",
            "pt:SW5Db3VudHJ5",
            "pt:/w==",
            "123456",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_key_name(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `good` as it is, or with one field (a known name or a near miss) set to any JSON.
pub fn one_field_changed(good: BoxedStrategy<Value>) -> impl Strategy<Value = Value> {
    (good, arb_key_name(), arb_json()).prop_map(|(mut v, k, x)| {
        v[k] = x;
        v
    })
}

/// Bytes near a JSON text of `json`: the text with one byte replaced, inserted or removed,
/// cut short, or arbitrary bytes.
pub fn arb_body_bytes(
    json: impl Strategy<Value = Value> + 'static,
) -> impl Strategy<Value = Vec<u8>> {
    let text = json.prop_map(|v| serde_json::to_vec(&v).unwrap()).boxed();
    prop_oneof![
        text.clone(),
        (text.clone(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut t, i, b)| {
            if !t.is_empty() {
                let i = i.index(t.len());
                t[i] = b;
            }
            t
        }),
        (text.clone(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut t, i, b)| {
            let i = i.index(t.len() + 1);
            t.insert(i, b);
            t
        }),
        (text, any::<prop::sample::Index>()).prop_map(|(mut t, i)| {
            t.truncate(i.index(t.len() + 1));
            t
        }),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::sample::select(vec![
            b"".to_vec(),
            b" \n\t".to_vec(),
            b"null".to_vec(),
            b"[]".to_vec(),
            b"{}".to_vec(),
            b"{\"batch\":[]}".to_vec(),
            b"\xef\xbb\xbf{}".to_vec(),
            [b"[".repeat(200), b"]".repeat(200)].concat(),
            b"{\"version\":1e400,\"ciphertext\":\"2:\"}".to_vec(),
        ]),
    ]
}
