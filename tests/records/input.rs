//! The documented answers to bad input, one bit flipped anywhere in a record, and a field
//! given twice.

use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::{batch, daemon, healthy, ok, op, rotate, version_doc};

#[test]
fn bad_input_table_and_tampering() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let plain = "tamper with me";
    let c1 = ok(&d, "encrypt", json!({ "plaintext": plain }));
    let ct1 = c1["ciphertext"].as_str().unwrap().to_string();
    assert_eq!(rotate(&d), 2);
    let ct2 = ok(&d, "encrypt", json!({ "plaintext": plain }))["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = STANDARD.decode(&ct1[2..]).unwrap();
    let flip = |byte: usize, bit: u8| {
        let mut b = blob.clone();
        b[byte] ^= 1 << bit;
        format!("2:{}", STANDARD.encode(&b))
    };
    let big = "x".repeat(1024 * 1024);

    // (operation, body, status, code) — the documented answers.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "decrypt",
            json!({"ciphertext": flip(blob.len() - 1, 0), "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": flip(70, 3), "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "rewrap",
            json!({"ciphertext": flip(80, 7), "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": ct2, "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "rewrap",
            json!({"ciphertext": ct1, "version": 2}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": 99}).to_string(),
            404,
            "version_not_found",
        ),
        (
            "rewrap",
            json!({"ciphertext": ct1, "version": 99}).to_string(),
            404,
            "version_not_found",
        ),
        (
            "decrypt",
            json!({"ciphertext": &ct1[..ct1.len() - 3], "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": &ct1[..60], "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": "2:", "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": "2:***", "version": 1}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({"ciphertext": format!("1:{}", hex::encode(&blob)), "version": 1}).to_string(),
            400,
            "unsupported_format",
        ),
        (
            "decrypt",
            json!({"ciphertext": format!("3{}", &ct1[1..]), "version": 1}).to_string(),
            400,
            "unsupported_format",
        ),
        (
            "rewrap",
            json!({"ciphertext": &ct1[2..], "version": 1}).to_string(),
            400,
            "unsupported_format",
        ),
        (
            "decrypt",
            json!({"ciphertext": "", "version": 1}).to_string(),
            400,
            "unsupported_format",
        ),
        (
            "rewrap",
            json!({"ciphertext": "", "version": 1}).to_string(),
            400,
            "unsupported_format",
        ),
        (
            "decrypt",
            json!({"ciphertext": "pt:***"}).to_string(),
            400,
            "decryption_failed",
        ),
        (
            "decrypt",
            json!({ "ciphertext": ct1 }).to_string(),
            400,
            "missing_version",
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": "1"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": -1}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "decrypt",
            json!({"ciphertext": ct1, "version": 1, "key": "x"}).to_string(),
            400,
            "unknown_field",
        ),
        (
            "encrypt",
            json!({"plaintext": 42}).to_string(),
            400,
            "invalid_request",
        ),
        ("encrypt", json!({}).to_string(), 400, "invalid_request"),
        ("encrypt", json!(["x"]).to_string(), 400, "invalid_request"),
        ("encrypt", String::new(), 400, "invalid_request"),
        (
            "encrypt",
            "{\"plaintext\": \"x".into(),
            400,
            "malformed_json",
        ),
        (
            "encrypt",
            json!({ "plaintext": big }).to_string(),
            413,
            "body_too_large",
        ),
        (
            "encrypt",
            json!({"batch": vec![json!({"plaintext": "x"}); 1001]}).to_string(),
            400,
            "batch_too_large",
        ),
        (
            "encrypt",
            json!({"batch": {"plaintext": "x"}}).to_string(),
            400,
            "invalid_request",
        ),
        (
            "encrypt",
            json!({"batch": [], "plaintext": "x"}).to_string(),
            400,
            "unknown_field",
        ),
    ];
    let mut failed_messages = HashSet::new();
    for (name, body, status, code) in &cases {
        let r = d.request("POST", &format!("/v1/keys/prod/DE/{name}"), body);
        let shown: String = body.chars().take(80).collect();
        assert_eq!(r.status, *status, "{name} {shown}: {}", r.text());
        assert_eq!(r.error_code(), *code, "{name} {shown}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        if *code == "decryption_failed" {
            failed_messages.insert(message);
        } else if *code == "unsupported_format" {
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
    let rec = ok(&d, "encrypt", json!({ "plaintext": largest }));
    let back = batch(&d, "decrypt", vec![rec]);
    assert_eq!(back[0]["plaintext"].as_str().map(str::len), Some(786_301));
    let r = op(&d, "encrypt", json!({ "plaintext": format!("{largest}L") }));
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));
    assert!(r.text().contains("786301"), "{}", r.text());

    // Unknown key, wrong method.
    let r = d.post("/v1/keys/prod/FR/encrypt", json!({"plaintext": "x"}));
    assert_eq!((r.status, r.error_code().as_str()), (404, "key_not_found"));
    let r = d.get("/v1/keys/prod/DE/decrypt");
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    // One bit flipped anywhere in the record: every bit of the iv, ciphertext and tag fails
    // the same way; a flipped salt bit changes nothing (the salt is unused with raw keys, in
    // the SDKs as here), so it is never a different plaintext.
    let items: Vec<Value> = (0..blob.len())
        .flat_map(|byte| (0..8).map(move |bit| (byte, bit)))
        .map(|(byte, bit)| json!({"ciphertext": flip(byte, bit), "version": 1}))
        .collect();
    for (i, r) in batch(&d, "decrypt", items).iter().enumerate() {
        if i / 8 < 64 {
            assert_eq!(r["plaintext"], plain, "salt bit {i}");
        } else {
            assert_eq!(r["error"]["code"], "decryption_failed", "bit {i}: {r}");
            assert_eq!(r["error"]["status"], 400);
            assert_eq!(r["error"]["message"], message.as_str());
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
        .flat_map(|chunk| batch(&d, "decrypt", chunk.to_vec()));
    for r in results {
        let code = r["error"]["code"].as_str();
        assert!(
            r["plaintext"] == plain
                || matches!(code, Some("decryption_failed" | "unsupported_format")),
            "{r}"
        );
    }
    healthy(&d);
    assert!(!d.log_text().contains(plain), "plaintext in the daemon log");
}

#[test]
fn a_field_twice_is_refused() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let ct = ok(&d, "encrypt", json!({"plaintext": "a"}));
    let ciphertext = ct["ciphertext"].as_str().unwrap();
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
        assert_eq!(
            r.error_code(),
            "duplicate_field",
            "{op} {body}: {}",
            r.text()
        );
        assert!(!r.text().contains(ciphertext), "{}", r.text());
    }
    // Nothing was encrypted by the refused requests.
    assert_eq!(version_doc(&d, 1)["records_encrypted"], 1);
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
        assert_eq!(
            r.error_code(),
            "duplicate_field",
            "{method} {p}: {}",
            r.text()
        );
    }
    assert_eq!(d.get("/v1/keys/prod/FR").status, 404);
}
