//! Record bodies of encrypt, decrypt and rewrap, single and `{"batch": [...]}`, against a
//! model of the contract, over HTTP.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{json, Value};

use incountry_keyd::domain::{crypto, Code};
use incountry_keyd::proto::{BatchAnswer, Encrypted, ItemResult, Rewrapped};

use crate::bodies::{read_body, Read};
use crate::daemon::{after, open_daemon, Reply};
use crate::json::{shape_faults, Ty};
use crate::strategies::{
    arb_body_bytes, arb_json, arb_key_name, arb_number, arb_record, config, one_field_changed,
};

fn status_of(code: Code) -> u16 {
    match code {
        Code::VersionNotFound | Code::KeyNotFound => 404,
        Code::VerificationOff => 409,
        Code::BodyTooLarge => 413,
        _ => 400,
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
}

impl Op {
    fn path(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
        }
    }
    fn fields(self) -> &'static [(&'static str, Ty)] {
        match self {
            Op::Encrypt => &[("plaintext", Ty::Str)],
            Op::Decrypt | Op::Rewrap => &[("ciphertext", Ty::Str), ("version", Ty::OptU32)],
        }
    }
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Encrypt), Just(Op::Decrypt), Just(Op::Rewrap)]
}

/// The key the record tests use: versions 1 and 2, 2 active.
pub struct RecordKey {
    pub keys: HashMap<u32, [u8; 32]>,
    active: u32,
}

pub const REC_PATH: &str = "/v1/keys/records/DE";

pub fn record_key() -> &'static RecordKey {
    static K: OnceLock<RecordKey> = OnceLock::new();
    K.get_or_init(|| {
        let d = open_daemon();
        d.create_managed(REC_PATH);
        d.post(&format!("{REC_PATH}/rotate"), &json!({}))
            .assert_status(201);
        RecordKey {
            keys: d.data_keys("records", "DE"),
            active: 2,
        }
    })
}

/// How a ciphertext item is made: from a real record (of a version, claimed as another or
/// none, maybe altered), a "pt:" record, or any string.
#[derive(Clone, Debug)]
enum CtRecipe {
    Real {
        plain: Vec<u8>,
        under: u32,
        claim: Value,
        flip: Option<(prop::sample::Index, u8)>,
    },
    Plain(Vec<u8>),
    Raw(String),
}

fn arb_ct_recipe() -> impl Strategy<Value = CtRecipe> {
    let claim = prop_oneof![
        4 => Just(Value::Null), // replaced by the real version
        1 => Just(json!("absent")),
        1 => (0u32..4).prop_map(Value::from),
        1 => arb_number(),
    ];
    let text = prop_oneof![
        ".{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    prop_oneof![
        3 => (
            text.clone(),
            1u32..=2,
            claim,
            prop::option::weighted(0.3, (any::<prop::sample::Index>(), 0u8..8)),
        )
            .prop_map(|(plain, under, claim, flip)| CtRecipe::Real { plain, under, claim, flip }),
        1 => text.prop_map(CtRecipe::Plain),
        1 => arb_record().prop_map(CtRecipe::Raw),
    ]
}

fn cipher_item(r: &CtRecipe, rk: &RecordKey) -> Value {
    match r {
        CtRecipe::Real {
            plain,
            under,
            claim,
            flip,
        } => {
            let record = crypto::encrypt(&rk.keys[under], plain).unwrap();
            let record = match flip {
                None => record,
                Some((at, bit)) => {
                    let mut blob = STANDARD.decode(&record[2..]).unwrap();
                    let i = at.index(blob.len());
                    blob[i] ^= 1 << bit;
                    format!("2:{}", STANDARD.encode(blob))
                }
            };
            match claim {
                Value::Null => json!({"ciphertext": record, "version": under}),
                Value::String(_) => json!({ "ciphertext": record }),
                n => json!({"ciphertext": record, "version": n}),
            }
        }
        CtRecipe::Plain(p) => json!({"ciphertext": format!("pt:{}", STANDARD.encode(p))}),
        CtRecipe::Raw(s) => json!({"ciphertext": s, "version": 1}),
    }
}

/// Items for a route: well-formed ones, well-formed ones with one field changed or added,
/// and arbitrary JSON.
fn arb_item(op: Op) -> impl Strategy<Value = Value> {
    let good = match op {
        Op::Encrypt => prop_oneof![".{0,60}", any::<String>()]
            .prop_map(|p| json!({ "plaintext": p }))
            .boxed(),
        Op::Decrypt | Op::Rewrap => arb_ct_recipe()
            .prop_map(|r| cipher_item(&r, record_key()))
            .boxed(),
    };
    prop_oneof![
        4 => good.clone(),
        2 => one_field_changed(good),
        1 => arb_json(),
    ]
}

/// What the contract says one record item gives.
enum Want {
    /// Encrypted to this plaintext, under the active version.
    Encrypted(String),
    /// Decrypted to these bytes (as text).
    Decrypted(String),
    /// Rewrapped: these plaintext bytes now under the active version, or the same record
    /// back when it already was.
    Rewrapped(Vec<u8>, Option<String>),
    /// Refused with one of these codes.
    Refused(Vec<Code>),
}

fn refused(code: Code) -> Want {
    Want::Refused(vec![code])
}

fn want_item(op: Op, item: &Value, rk: &RecordKey) -> Want {
    let faults = shape_faults(item, op.fields());
    if !faults.is_empty() {
        return Want::Refused(faults);
    }
    // The oracle reads the item it generated (raw on purpose: any JSON; the shape was
    // checked just above).
    if let Op::Encrypt = op {
        return Want::Encrypted(item["plaintext"].as_str().unwrap().to_string());
    }
    let ct = item["ciphertext"].as_str().unwrap();
    let version = item
        .get("version")
        .and_then(Value::as_u64)
        .map(|v| v as u32);
    let plain = if let Some(b64) = ct.strip_prefix("pt:") {
        match STANDARD.decode(b64) {
            Ok(p) => p,
            Err(_) => return refused(Code::DecryptionFailed),
        }
    } else if ct.starts_with("2:") {
        let Some(v) = version else {
            return refused(Code::MissingVersion);
        };
        let Some(key) = rk.keys.get(&v) else {
            return refused(Code::VersionNotFound);
        };
        match crypto::decrypt(key, ct) {
            Ok(p) => p.to_vec(),
            Err(_) => return refused(Code::DecryptionFailed),
        }
    } else {
        return refused(Code::UnsupportedFormat);
    };
    match op {
        Op::Decrypt => match String::from_utf8(plain) {
            Ok(s) => Want::Decrypted(s),
            Err(_) => refused(Code::PlaintextNotText),
        },
        _ => {
            let unchanged =
                (ct.starts_with("2:") && version == Some(rk.active)).then(|| ct.to_string());
            Want::Rewrapped(plain, unchanged)
        }
    }
}

/// One answer to check: a single request's, or one result of a batch.
enum Got {
    /// Served: the answer document (raw: the contract says which type it is).
    Served(Value),
    /// Refused: the error code, and the status (a batch result carries its own).
    Refused(Code, u16),
    /// An error status without an error document.
    Unreadable,
}

impl Got {
    /// A single request's answer.
    fn of(r: &Reply) -> Got {
        match (r.status, r.try_error()) {
            (200, _) => Got::Served(r.try_json().unwrap_or_default()),
            (status, Some(e)) => Got::Refused(e.error.code, status),
            (_, None) => Got::Unreadable,
        }
    }

    /// One result of a batch.
    fn of_item(result: ItemResult<Value>) -> Got {
        match result {
            ItemResult::Failed(e) => Got::Refused(e.error.code, e.error.status),
            ItemResult::Done(v) => Got::Served(v),
        }
    }
}

/// A served answer as the wire type the contract says it is.
fn served<T: DeserializeOwned>(got: &Value, ctx: &dyn Fn() -> String) -> Result<T, TestCaseError> {
    serde_json::from_value(got.clone()).map_err(|e| TestCaseError::fail(format!("{e}: {}", ctx())))
}

/// Checks one answer (status and document, or a batch result) against the contract.
fn check_item(
    op: Op,
    item: &Value,
    got: &Got,
    shown: &str,
    rk: &RecordKey,
) -> Result<(), TestCaseError> {
    let ctx = || format!("{op:?} {item} -> {shown}");
    let want = want_item(op, item, rk);
    let doc = match (want, got) {
        (Want::Refused(codes), Got::Refused(code, status)) => {
            prop_assert!(codes.contains(code), "want one of {:?}: {}", codes, ctx());
            prop_assert_eq!(*status, status_of(*code), "{}", ctx());
            return Ok(());
        }
        (Want::Refused(codes), _) => {
            return Err(TestCaseError::fail(format!(
                "want one of {codes:?}: {}",
                ctx()
            )));
        }
        (want, Got::Served(doc)) => (want, doc),
        (_, _) => return Err(TestCaseError::fail(format!("want 200: {}", ctx()))),
    };
    match doc {
        (Want::Encrypted(p), got) => {
            let got: Encrypted = served(got, &ctx)?;
            prop_assert_eq!(got.version, rk.active, "{}", ctx());
            let back = crypto::decrypt(&rk.keys[&rk.active], &got.ciphertext)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", ctx())))?;
            prop_assert_eq!(&back[..], p.as_bytes(), "{}", ctx());
        }
        (Want::Decrypted(p), got) => {
            // Raw on purpose: the answer is the plaintext and nothing else.
            prop_assert_eq!(got, &json!({ "plaintext": p }), "{}", ctx());
        }
        (Want::Rewrapped(p, unchanged), got) => {
            let got: Rewrapped = served(got, &ctx)?;
            prop_assert_eq!(got.version, rk.active, "{}", ctx());
            prop_assert_eq!(got.rewrapped, unchanged.is_none(), "{}", ctx());
            if let Some(same) = unchanged {
                prop_assert_eq!(got.ciphertext.as_str(), same.as_str(), "{}", ctx());
            }
            let back = crypto::decrypt(&rk.keys[&rk.active], &got.ciphertext)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", ctx())))?;
            prop_assert_eq!(&back[..], &p[..], "{}", ctx());
        }
        (Want::Refused(_), _) => unreachable!("refusals are checked above"),
    }
    Ok(())
}

/// Sends `body` to the route of `op` on the records key and checks the answer.
fn send_record_body(op: Op, body: &[u8]) -> Result<(), TestCaseError> {
    let rk = record_key();
    let r = open_daemon().request("POST", &format!("{REC_PATH}/{}", op.path()), body);
    check_record_body(op, body, &r, rk)
}

/// Checks a whole record request: the body-level rules, then the batch or the item.
fn check_record_body(op: Op, body: &[u8], r: &Reply, rk: &RecordKey) -> Result<(), TestCaseError> {
    let refusal = match read_body(body, r)? {
        Read::Refused => return Ok(()),
        Read::Empty => Code::InvalidRequest,
        Read::Broken => Code::MalformedJson,
        Read::Object(value) => {
            let obj = value.as_object().unwrap();
            let Some(batch) = obj.get("batch") else {
                let shown = format!("{} {}", r.status, r.text());
                return check_item(op, &value, &Got::of(r), &shown, rk);
            };
            match batch.as_array() {
                _ if obj.len() != 1 => Code::UnknownField,
                None => Code::InvalidRequest,
                Some(items) if items.len() > 1000 => Code::BatchTooLarge,
                Some(items) => return check_batch(op, items, body, r, rk),
            }
        }
    };
    let ctx = || format!("{op:?} {}", after(r, body));
    prop_assert_eq!(
        (r.status, r.error_code()),
        (400, Some(refusal)),
        "{}",
        ctx()
    );
    Ok(())
}

/// A batch is served: one result per item, in order, each what the item alone would give.
fn check_batch(
    op: Op,
    items: &[Value],
    body: &[u8],
    r: &Reply,
    rk: &RecordKey,
) -> Result<(), TestCaseError> {
    let ctx = || format!("{op:?} {}", after(r, body));
    prop_assert_eq!(r.status, 200, "{}", ctx());
    let answer: BatchAnswer<Value> = serde_json::from_slice(&r.body)
        .map_err(|e| TestCaseError::fail(format!("{e}: {}", ctx())))?;
    prop_assert_eq!(answer.results.len(), items.len(), "{}", ctx());
    let results: Vec<Got> = answer.results.into_iter().map(Got::of_item).collect();
    let failed = results
        .iter()
        .filter(|g| matches!(g, Got::Refused(..)))
        .count();
    prop_assert_eq!(answer.failed, failed, "{}", ctx());
    prop_assert_eq!(answer.succeeded, items.len() - failed, "{}", ctx());
    for (i, (item, result)) in items.iter().zip(&results).enumerate() {
        check_item(
            op,
            item,
            result,
            &format!("result {i} of {}", after(r, body)),
            rk,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Guards the single-item record bodies (encrypt, decrypt, rewrap) end to end: for
    /// well-formed items, altered ones and arbitrary JSON, the daemon answers what the
    /// contract says — encrypt gives a record of the active version that decrypts to the
    /// plaintext written; decrypt gives the plaintext of a record of any kept version (or of
    /// "pt:"); rewrap moves a record to the active version (unchanged when it is there);
    /// and every refusal has the documented code and status (unknown_field, invalid_request
    /// for a wrong type or a version outside u32, missing_version, version_not_found,
    /// unsupported_format, decryption_failed, plaintext_not_text). Fails on a panic (no
    /// answer), a 5xx, a wrong code, or a parse that changes what was written.
    #[test]
    fn record_bodies_follow_the_contract(
        (op, item) in arb_op().prop_flat_map(|op| {
            // Mostly items for the route, sometimes another route's.
            (Just(op), prop_oneof![4 => arb_item(op), 1 => arb_op().prop_flat_map(arb_item)])
        }),
    ) {
        send_record_body(op, &serde_json::to_vec(&item).unwrap())?;
    }

    /// Guards the batch form: `{"batch": [...]}` with up to a few items of every kind
    /// answers 200 with one result per item, in order, each what the same item alone would
    /// give (so one bad item never fails the others), and `succeeded`/`failed` count them;
    /// "batch" beside another field, or not an array, is refused.
    #[test]
    fn record_batches_follow_the_contract(
        (op, items) in arb_op().prop_flat_map(|op| (Just(op), prop::collection::vec(arb_item(op), 0..8))),
        extra in prop::option::weighted(0.1, (arb_key_name(), arb_json())),
        not_array in prop::option::weighted(0.05, arb_json()),
    ) {
        // The request, built raw on purpose: "batch" may be any JSON.
        let mut body = json!({ "batch": items });
        if let Some(v) = not_array {
            body["batch"] = v;
        }
        if let Some((k, v)) = extra {
            body[k] = v;
        }
        send_record_body(op, &serde_json::to_vec(&body).unwrap())?;
    }

    /// Guards the record routes against arbitrary bytes: bodies near valid JSON (one byte
    /// changed, added, removed, cut short), random bytes, deep nesting, a BOM, numbers out
    /// of range. Not JSON → 400 malformed_json; JSON that is not an object (an array, a
    /// scalar, deep nesting) → 400 invalid_request; never a panic or 5xx; what does parse
    /// still follows the contract.
    #[test]
    fn record_routes_take_any_bytes(
        (op, body) in arb_op().prop_flat_map(|op| {
            let json = prop_oneof![
                arb_item(op),
                prop::collection::vec(arb_item(op), 0..3).prop_map(|b| json!({ "batch": b })),
            ];
            (Just(op), arb_body_bytes(json))
        }),
    ) {
        send_record_body(op, &body)?;
    }
}

/// Guards the batch size limit at its edge: 1000 items are served, 1001 refused with
/// `batch_too_large` (one case each; the items are the cheapest refusal).
#[test]
fn batch_size_edge() {
    let d = open_daemon();
    record_key();
    for (n, want) in [(1000usize, 200u16), (1001, 400)] {
        let body = json!({ "batch": vec![json!({"ciphertext": "x"}); n] });
        let r = d.post(&format!("{REC_PATH}/decrypt"), &body);
        assert_eq!(r.status, want, "{n} items");
        if want == 400 {
            assert_eq!(r.code(), Code::BatchTooLarge);
        } else {
            assert_eq!(r.read::<BatchAnswer<IgnoredAny>>().failed, n);
        }
    }
}
