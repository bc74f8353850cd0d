//! Batches of 1000 records with bad items among them: each bad item fails alone.

use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{BatchAnswer, Decrypted, Encrypted, Rewrapped};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A batch answer's items as sent, by field name: raw on purpose, to see that a failed item
/// carries its error and nothing beside it.
#[derive(Deserialize)]
struct RawItems {
    results: Vec<Map<String, Value>>,
}

use crate::{
    batch, code_of, daemon, encrypt_all, healthy, items_of, op, plaintext_of, record, rotate,
};

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
    let doc: BatchAnswer<Encrypted> = op(&d, "encrypt", json!({ "batch": items })).ok(200);
    assert_eq!((doc.succeeded, doc.failed), (997, 3));
    let results: Vec<_> = doc.results.into_iter().map(|r| r.into_result()).collect();
    assert_eq!(code_of(&results[5]), Some(Code::InvalidRequest));
    assert_eq!(code_of(&results[7]), Some(Code::UnknownField));
    assert_eq!(code_of(&results[9]), Some(Code::InvalidRequest));
    let cts = encrypt_all(&d, &plaintexts);
    assert!(cts.iter().all(|(_, v)| *v == 1));
    assert_eq!(rotate(&d), 2);

    // Decrypt and rewrap 1000 records, every tenth one bad in its own way.
    let expect = |i: usize| -> Option<Code> {
        if i % 10 != 3 {
            return None;
        }
        Some(match (i / 10) % 5 {
            0 => Code::DecryptionFailed,
            1 => Code::VersionNotFound,
            2 => Code::UnsupportedFormat,
            3 => Code::MissingVersion,
            _ => Code::DecryptionFailed,
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
    let r = op(&d, "decrypt", json!({ "batch": items.clone() }));
    let decrypt_time = started.elapsed();
    assert_eq!(r.status, 200, "decrypt batch: {}", r.text());
    let decrypted = items_of::<Decrypted>(&r);
    assert_eq!(decrypted.len(), 1000);
    let raw: RawItems = r.read();
    let started = Instant::now();
    let rewrapped = batch::<Rewrapped>(&d, "rewrap", items);
    let rewrap_time = started.elapsed();
    eprintln!("batch of 1000: decrypt {decrypt_time:?}, rewrap {rewrap_time:?}");
    let mut again = Vec::new();
    for i in 0..1000 {
        match expect(i) {
            Some(code) => {
                assert_eq!(code_of(&decrypted[i]), Some(code), "item {i}");
                assert_eq!(code_of(&rewrapped[i]), Some(code), "item {i}");
                // An error, and no plaintext beside it.
                let fields: Vec<&String> = raw.results[i].keys().collect();
                assert_eq!(fields, ["error"], "item {i}");
            }
            None => {
                assert_eq!(
                    plaintext_of(&decrypted[i]),
                    Some(plaintexts[i].as_str()),
                    "item {i}"
                );
                let r = rewrapped[i]
                    .clone()
                    .unwrap_or_else(|e| panic!("item {i}: {e:?}"));
                assert_eq!((r.version, r.rewrapped), (2, true), "item {i}");
                again.push((i, r));
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
            .map(|(_, r)| record(&r.ciphertext, r.version))
            .collect(),
    );
    for ((i, _), r) in again.iter().zip(&back) {
        assert_eq!(plaintext_of(r), Some(plaintexts[*i].as_str()));
    }
    assert_eq!(d.version("prod", "DE", 2).records_rewrapped, 900);
    assert_eq!(d.version("prod", "DE", 1).records_encrypted, 997 + 1000);
    healthy(&d);
}
