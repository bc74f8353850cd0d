//! The documented answers to bad input, one bit flipped anywhere in a record, and a field
//! given twice.

use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Decrypted, Encrypted};
use serde_json::{json, Value};

use crate::{batch, code_of, daemon, healthy, ok, op, plaintext_of, record, rotate};

#[test]
fn bad_input_table_and_tampering() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let plain = "tamper with me";
    let ct1 = ok::<Encrypted>(&d, "encrypt", json!({ "plaintext": plain })).ciphertext;
    assert_eq!(rotate(&d), 2);
    let ct2 = ok::<Encrypted>(&d, "encrypt", json!({ "plaintext": plain })).ciphertext;
    let blob = STANDARD.decode(&ct1[2..]).unwrap();
    let flip = |byte: usize, bit: u8| {
        let mut b = blob.clone();
        b[byte] ^= 1 << bit;
        format!("2:{}", STANDARD.encode(&b))
    };
    let big = "x".repeat(1024 * 1024);

    // (operation, body, status, code) — the documented answers.
    let cases: Vec<(&str, String, u16, Code)> = vec![
        (
            "decrypt",
            json!({"ciphertext": flip(blob.len() - 1, 0), "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": flip(70, 3), "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "rewrap",
            json!({"ciphertext": flip(80, 7), "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": ct2, "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "rewrap",
            json!({"ciphertext": ct1, "version": 2}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": 99}).to_string(),
            404,
            Code::VersionNotFound,
        ),
        (
            "rewrap",
            json!({"ciphertext": ct1, "version": 99}).to_string(),
            404,
            Code::VersionNotFound,
        ),
        (
            "decrypt",
            json!({"ciphertext": &ct1[..ct1.len() - 3], "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": &ct1[..60], "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": "2:", "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": "2:***", "version": 1}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({"ciphertext": format!("1:{}", hex::encode(&blob)), "version": 1}).to_string(),
            400,
            Code::UnsupportedFormat,
        ),
        (
            "decrypt",
            json!({"ciphertext": format!("3{}", &ct1[1..]), "version": 1}).to_string(),
            400,
            Code::UnsupportedFormat,
        ),
        (
            "rewrap",
            json!({"ciphertext": &ct1[2..], "version": 1}).to_string(),
            400,
            Code::UnsupportedFormat,
        ),
        (
            "decrypt",
            json!({"ciphertext": "", "version": 1}).to_string(),
            400,
            Code::UnsupportedFormat,
        ),
        (
            "rewrap",
            json!({"ciphertext": "", "version": 1}).to_string(),
            400,
            Code::UnsupportedFormat,
        ),
        (
            "decrypt",
            json!({"ciphertext": "pt:***"}).to_string(),
            400,
            Code::DecryptionFailed,
        ),
        (
            "decrypt",
            json!({ "ciphertext": ct1 }).to_string(),
            400,
            Code::MissingVersion,
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": "1"}).to_string(),
            400,
            Code::InvalidRequest,
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": -1}).to_string(),
            400,
            Code::InvalidRequest,
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": 1, "key": "x"}).to_string(),
            400,
            Code::UnknownField,
        ),
        (
            "encrypt",
            json!({"plaintext": 42}).to_string(),
            400,
            Code::InvalidRequest,
        ),
        ("encrypt", json!({}).to_string(), 400, Code::InvalidRequest),
        (
            "encrypt",
            json!(["x"]).to_string(),
            400,
            Code::InvalidRequest,
        ),
        ("encrypt", String::new(), 400, Code::InvalidRequest),
        (
            "encrypt",
            "{\"plaintext\": \"x".into(),
            400,
            Code::MalformedJson,
        ),
        (
            "encrypt",
            json!({ "plaintext": big }).to_string(),
            413,
            Code::BodyTooLarge,
        ),
        (
            "encrypt",
            json!({"batch": vec![json!({"plaintext": "x"}); 1001]}).to_string(),
            400,
            Code::BatchTooLarge,
        ),
        (
            "encrypt",
            json!({"batch": {"plaintext": "x"}}).to_string(),
            400,
            Code::InvalidRequest,
        ),
        (
            "encrypt",
            json!({"batch": [], "plaintext": "x"}).to_string(),
            400,
            Code::UnknownField,
        ),
    ];
    let mut failed_messages = HashSet::new();
    for (name, body, status, code) in &cases {
        let r = d.request("POST", &format!("/v1/keys/prod/DE/{name}"), body);
        let shown: String = body.chars().take(80).collect();
        assert_eq!(r.status, *status, "{name} {shown}: {}", r.text());
        assert_eq!(r.code(), *code, "{name} {shown}");
        let message = r.message();
        if *code == Code::DecryptionFailed {
            failed_messages.insert(message);
        } else if *code == Code::UnsupportedFormat {
            assert!(
                message.contains("\"2:\"") && message.contains("\"pt:\""),
                "{message}"
            );
        }
    }
    // Every decryption failure says the same thing, with no position or cause in it.
    assert_eq!(failed_messages.len(), 1, "{failed_messages:?}");
    let message = failed_messages.into_iter().next().unwrap();
    assert!(!message.chars().any(|c| c.is_ascii_digit()), "{message}");
    assert!(!message.contains("tag"), "{message}");

    // The largest record (786,301 bytes of plaintext with the default server.max_body of
    // 1 MiB) encrypts, and decrypts even in a batch of one; one byte more is refused.
    let largest = "L".repeat(786_301);
    let rec: Encrypted = ok(&d, "encrypt", json!({ "plaintext": largest }));
    let back = batch::<Decrypted>(&d, "decrypt", vec![record(&rec.ciphertext, rec.version)]);
    assert_eq!(plaintext_of(&back[0]).map(str::len), Some(786_301));
    let r = op(&d, "encrypt", json!({ "plaintext": format!("{largest}L") }));
    assert_eq!((r.status, r.code()), (413, Code::BodyTooLarge));
    assert!(r.text().contains("786301"), "{}", r.text());

    // Unknown key, wrong method.
    let r = d.post("/v1/keys/prod/FR/encrypt", json!({"plaintext": "x"}));
    assert_eq!((r.status, r.code()), (404, Code::KeyNotFound));
    let r = d.get("/v1/keys/prod/DE/decrypt");
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    // One bit flipped anywhere in the record: every bit of the iv, ciphertext and tag fails
    // the same way; a flipped salt bit changes nothing (the salt is unused with raw keys, in
    // the SDKs as here), so it is never a different plaintext.
    let items: Vec<Value> = (0..blob.len())
        .flat_map(|byte| (0..8).map(move |bit| (byte, bit)))
        .map(|(byte, bit)| json!({"ciphertext": flip(byte, bit), "version": 1}))
        .collect();
    for (i, r) in batch::<Decrypted>(&d, "decrypt", items).iter().enumerate() {
        if i / 8 < 64 {
            assert_eq!(plaintext_of(r), Some(plain), "salt bit {i}");
        } else {
            let e = r.as_ref().err();
            assert_eq!(
                e.map(|e| (e.code, e.status, e.message.as_str())),
                Some((Code::DecryptionFailed, 400, message.as_str())),
                "bit {i}"
            );
        }
    }
    // And every bit (but the eighth) of every character of the record string.
    let items: Vec<Value> = (0..ct1.len())
        .flat_map(|i| (0..7).map(move |bit| (i, bit)))
        .map(|(i, bit)| {
            let mut s = ct1.clone().into_bytes();
            s[i] ^= 1 << bit;
            json!({"ciphertext": String::from_utf8(s).unwrap(), "version": 1})
        })
        .collect();
    let results = items
        .chunks(1000)
        .flat_map(|chunk| batch::<Decrypted>(&d, "decrypt", chunk.to_vec()));
    for r in results {
        let code = code_of(&r);
        assert!(
            plaintext_of(&r) == Some(plain)
                || matches!(code, Some(Code::DecryptionFailed | Code::UnsupportedFormat)),
            "{code:?}, or another plaintext"
        );
    }
    healthy(&d);
    assert!(!d.log_text().contains(plain), "plaintext in the daemon log");
}

#[test]
fn a_field_twice_is_refused() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let ct: Encrypted = ok(&d, "encrypt", json!({"plaintext": "a"}));
    let ciphertext = ct.ciphertext.as_str();
    let path = |op: &str| format!("/v1/keys/prod/DE/{op}");
    let cases = [
        (
            "encrypt",
            r#"{"plaintext":"a","plaintext":"b"}"#.to_string(),
        ),
        (
            "encrypt",
            r#"{"batch":[{"plaintext":"a"},{"plaintext":"a","plaintext":"b"}]}"#.to_string(),
        ),
        (
            "encrypt",
            r#"{"batch":[{"plaintext":"a"}],"batch":[{"plaintext":"b"}]}"#.to_string(),
        ),
        (
            "decrypt",
            format!(r#"{{"ciphertext":"{ciphertext}","version":1,"version":2}}"#),
        ),
        (
            "rewrap",
            format!(r#"{{"ciphertext":"pt:YQ==","ciphertext":"{ciphertext}","version":1}}"#),
        ),
    ];
    for (op, body) in &cases {
        let r = d.request("POST", &path(op), body);
        assert_eq!(r.status, 400, "{op} {body}: {}", r.text());
        assert_eq!(r.code(), Code::DuplicateField, "{op} {body}: {}", r.text());
        assert!(!r.text().contains(ciphertext), "{}", r.text());
    }
    // Nothing was encrypted by the refused requests.
    assert_eq!(d.version("prod", "DE", 1).records_encrypted, 1);
    // The admin routes' bodies refuse a field twice with the same code.
    for (method, p, body) in [
        (
            "POST",
            "/v1/keys/prod/FR",
            r#"{"type":"incountry-managed","rotation_period_days":30,"rotation_period_days":60}"#,
        ),
        (
            "PATCH",
            "/v1/keys/prod/DE",
            r#"{"rotation_period_days":60,"rotation_period_days":180}"#,
        ),
    ] {
        let r = d.request(method, p, body);
        assert_eq!(r.status, 400, "{method} {p}: {}", r.text());
        assert_eq!(r.code(), Code::DuplicateField, "{method} {p}: {}", r.text());
    }
    assert_eq!(d.get("/v1/keys/prod/FR").status, 404);
}
