//! Batches of 1000 records with bad items among them: each bad item fails alone.

use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::{batch, daemon, encrypt_all, healthy, op, rotate, version_doc};

#[test]
fn batch_of_1000_with_bad_items() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let plaintexts: Vec<String> = (0..1000).map(|i| format!("record {i} ü")).collect();

    // Encrypt: three bad items among 1000 fail alone.
    let items: Vec<Value> = plaintexts
        .iter()
        .enumerate()
        .map(|(i, p)| match i {
            5 => json!({"plaintext": 5}),
            7 => json!({"text": p}),
            9 => json!(p),
            _ => json!({ "plaintext": p }),
        })
        .collect();
    let r = op(&d, "encrypt", json!({ "batch": items }));
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(
        (doc["succeeded"].as_u64(), doc["failed"].as_u64()),
        (Some(997), Some(3))
    );
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results[5]["error"]["code"], "invalid_request");
    assert_eq!(results[7]["error"]["code"], "unknown_field");
    assert_eq!(results[9]["error"]["code"], "invalid_request");
    let cts = encrypt_all(&d, &plaintexts);
    assert!(cts.iter().all(|(_, v)| *v == 1));
    assert_eq!(rotate(&d), 2);

    // Decrypt and rewrap 1000 records, every tenth one bad in its own way.
    let expect = |i: usize| -> Option<&'static str> {
        if i % 10 != 3 {
            return None;
        }
        Some(match (i / 10) % 5 {
            0 => "decryption_failed",
            1 => "version_not_found",
            2 => "unsupported_format",
            3 => "missing_version",
            _ => "decryption_failed",
        })
    };
    let items: Vec<Value> = cts
        .iter()
        .enumerate()
        .map(|(i, (ct, v))| match expect(i).map(|_| (i / 10) % 5) {
            None => json!({"ciphertext": ct, "version": v}),
            Some(0) => {
                let mut b = STANDARD.decode(&ct[2..]).unwrap();
                let last = b.len() - 1;
                b[last] ^= 0x10;
                json!({"ciphertext": format!("2:{}", STANDARD.encode(&b)), "version": v})
            }
            Some(1) => json!({"ciphertext": ct, "version": 7}),
            Some(2) => json!({"ciphertext": format!("x{ct}"), "version": v}),
            Some(3) => json!({ "ciphertext": ct }),
            _ => json!({"ciphertext": &ct[..ct.len() / 2], "version": v}),
        })
        .collect();
    let started = Instant::now();
    let decrypted = batch(&d, "decrypt", items.clone());
    let decrypt_time = started.elapsed();
    let started = Instant::now();
    let rewrapped = batch(&d, "rewrap", items);
    let rewrap_time = started.elapsed();
    eprintln!("batch of 1000: decrypt {decrypt_time:?}, rewrap {rewrap_time:?}");
    let mut again = Vec::new();
    for i in 0..1000 {
        match expect(i) {
            Some(code) => {
                assert_eq!(decrypted[i]["error"]["code"], code, "item {i}");
                assert_eq!(rewrapped[i]["error"]["code"], code, "item {i}");
                assert!(decrypted[i].get("plaintext").is_none());
            }
            None => {
                assert_eq!(
                    decrypted[i]["plaintext"],
                    plaintexts[i].as_str(),
                    "item {i}"
                );
                assert_eq!(rewrapped[i]["version"], 2);
                assert_eq!(rewrapped[i]["rewrapped"], true);
                again.push((i, rewrapped[i].clone()));
            }
        }
    }
    assert_eq!(again.len(), 900);
    // The rewrapped records decrypt under version 2 to the same plaintexts.
    let back = batch(
        &d,
        "decrypt",
        again
            .iter()
            .map(|(_, r)| json!({"ciphertext": r["ciphertext"], "version": r["version"]}))
            .collect(),
    );
    for ((i, _), r) in again.iter().zip(&back) {
        assert_eq!(r["plaintext"], plaintexts[*i].as_str());
    }
    assert_eq!(version_doc(&d, 2)["records_rewrapped"], 900);
    assert_eq!(version_doc(&d, 1)["records_encrypted"], 997 + 1000);
    healthy(&d);
}
