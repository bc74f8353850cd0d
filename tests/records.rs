//! Record encryption, decryption and rewrap in the InCountry SDK format, against the real
//! daemon and the real InCountry Python SDK.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};

fn daemon() -> Daemon {
    // Rotations in these tests need no day to pass.
    Daemon::start_with(Options {
        versions_per_day: 10,
        ..Options::default()
    })
}

fn op(d: &Daemon, op: &str, body: Value) -> Reply {
    d.post(&format!("/v1/keys/prod/DE/{op}"), body)
}

/// A single-form request that must succeed.
fn ok(d: &Daemon, name: &str, body: Value) -> Value {
    let r = op(d, name, body);
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    r.json()
}

/// A batch request: its per-item results.
fn batch(d: &Daemon, name: &str, items: Vec<Value>) -> Vec<Value> {
    let n = items.len();
    let r = op(d, name, json!({ "batch": items }));
    assert_eq!(r.status, 200, "{name} batch: {}", r.text());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), n);
    results
}

fn encrypt_all(d: &Daemon, plaintexts: &[String]) -> Vec<(String, u64)> {
    plaintexts
        .chunks(1000)
        .flat_map(|chunk| {
            batch(
                d,
                "encrypt",
                chunk.iter().map(|p| json!({ "plaintext": p })).collect(),
            )
        })
        .map(|r| {
            (
                r["ciphertext"].as_str().unwrap().to_string(),
                r["version"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn rotate(d: &Daemon) -> u64 {
    let r = d.rotate("prod", "DE");
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["version"].as_u64().unwrap()
}

/// Many SDK operations in one Python process (tests/sdk/sdk_batch.py).
fn sdk_batch(doc: &Value, ops: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("doc.json");
    let ops_file = dir.path().join("ops.json");
    std::fs::write(&doc_file, doc.to_string()).unwrap();
    std::fs::write(&ops_file, Value::from(ops.to_vec()).to_string()).unwrap();
    let out = Command::new(sdk_python())
        .arg(repo().join("tests/sdk/sdk_batch.py"))
        .arg(&doc_file)
        .arg(&ops_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), ops.len());
    results
}

fn sdk_plaintext(result: &Value) -> &str {
    result["plaintext"]
        .as_str()
        .unwrap_or_else(|| panic!("the SDK refused: {result}"))
}

fn healthy(d: &Daemon) {
    let r = d.get("/v1/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["hsm"], "ok");
    let ct = ok(d, "encrypt", json!({"plaintext": "still fine"}));
    let back = ok(d, "decrypt", ct);
    assert_eq!(back["plaintext"], "still fine");
}

fn version_doc(d: &Daemon, version: u64) -> Value {
    let key = d.get("/v1/keys/prod/DE").json();
    key["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == version)
        .unwrap()
        .clone()
}

#[test]
fn sdk_interop_active_deprecated_and_rewrap() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let doc1 = d.secrets("prod", "DE");

    // Daemon and SDK records under version 1, which then becomes deprecated.
    let text_d1 = "daemon v1: Grüße, 東京 ✓";
    let d1 = ok(&d, "encrypt", json!({ "plaintext": text_d1 }));
    assert_eq!(d1["version"], 1);
    assert!(d1["ciphertext"].as_str().unwrap().starts_with("2:"));
    let s1 = &sdk_batch(&doc1, &[json!(["encrypt", "sdk v1"])])[0];
    assert_eq!(s1["version"], 1);

    assert_eq!(rotate(&d), 2);
    let doc2 = d.secrets("prod", "DE");
    let d2 = ok(&d, "encrypt", json!({"plaintext": "daemon v2"}));
    assert_eq!(d2["version"], 2);

    // The daemon decrypts the SDK's deprecated-version record.
    let r = ok(
        &d,
        "decrypt",
        json!({"ciphertext": s1["ciphertext"], "version": 1}),
    );
    assert_eq!(r["plaintext"], "sdk v1");

    // Rewrap: a deprecated SDK record and a deprecated daemon record move to version 2; an
    // active one comes back unchanged; an unencrypted SDK record gets encrypted.
    let rw_s1 = ok(
        &d,
        "rewrap",
        json!({"ciphertext": s1["ciphertext"], "version": 1}),
    );
    assert_eq!(rw_s1["version"], 2);
    assert_eq!(rw_s1["rewrapped"], true);
    assert_ne!(rw_s1["ciphertext"], s1["ciphertext"]);
    let rw_d1 = ok(&d, "rewrap", d1.clone());
    assert_eq!(rw_d1["version"], 2);
    let same = ok(&d, "rewrap", d2.clone());
    assert_eq!(same["rewrapped"], false);
    assert_eq!(same["ciphertext"], d2["ciphertext"]);
    let pt = format!("pt:{}", STANDARD.encode("plain record"));
    let r = ok(&d, "decrypt", json!({ "ciphertext": pt }));
    assert_eq!(r["plaintext"], "plain record");
    let rw_pt = ok(&d, "rewrap", json!({"ciphertext": pt, "version": 0}));
    assert_eq!(rw_pt["version"], 2);
    assert!(rw_pt["ciphertext"].as_str().unwrap().starts_with("2:"));

    // The SDK, with the current secrets document: decrypts the daemon's records under the
    // deprecated and the active version and the rewrapped ones with the new version, and
    // encrypts one under the active version.
    let res = sdk_batch(
        &doc2,
        &[
            json!(["encrypt", "sdk v2"]),
            json!(["decrypt", d1["ciphertext"], 1]),
            json!(["decrypt", d2["ciphertext"], 2]),
            json!(["decrypt", rw_s1["ciphertext"], 2]),
            json!(["decrypt", rw_d1["ciphertext"], 2]),
            json!(["decrypt", rw_pt["ciphertext"], 2]),
            // And it refuses the rewrapped record under the old version.
            json!(["decrypt", rw_s1["ciphertext"], 1]),
        ],
    );
    assert_eq!(res[0]["version"], 2);
    assert_eq!(sdk_plaintext(&res[1]), text_d1);
    assert_eq!(sdk_plaintext(&res[2]), "daemon v2");
    assert_eq!(sdk_plaintext(&res[3]), "sdk v1");
    assert_eq!(sdk_plaintext(&res[4]), text_d1);
    assert_eq!(sdk_plaintext(&res[5]), "plain record");
    assert!(res[6]["error"].is_string(), "{}", res[6]);
    // The daemon decrypts the SDK's active-version record.
    let r = ok(
        &d,
        "decrypt",
        json!({"ciphertext": res[0]["ciphertext"], "version": 2}),
    );
    assert_eq!(r["plaintext"], "sdk v2");

    // Counters per version, since start.
    let v1 = version_doc(&d, 1);
    let v2 = version_doc(&d, 2);
    assert_eq!(v1["records_encrypted"], 1);
    assert_eq!(v1["records_rewrapped_away"], 2);
    assert_eq!(v1["records_decrypted"], 1);
    assert_eq!(v2["records_encrypted"], 1);
    assert_eq!(v2["records_rewrapped"], 3);
    assert_eq!(v2["records_decrypted"], 1);
    // Nothing of the records reached the log.
    let log = d.log_text();
    for secret in [text_d1, "sdk v1", "plain record", "daemon v2"] {
        assert!(!log.contains(secret), "plaintext in the daemon log");
    }
}

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

/// Runs the CLI with `stdin` piped in.
fn cli_with_stdin(d: &Daemon, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

#[test]
fn cli_encrypt_decrypt_and_rewrap_failures() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let text = "two lines\nof text, ünïcode\n";
    let out = cli_with_stdin(&d, &["encrypt", "prod", "DE"], text.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ct = String::from_utf8(out.stdout).unwrap();
    assert!(ct.starts_with("2:") && ct.ends_with('\n'));
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 1"));
    let out = cli_with_stdin(
        &d,
        &["decrypt", "prod", "DE", "--version", "1"],
        ct.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, text.as_bytes());
    let out = cli_with_stdin(
        &d,
        &["decrypt", "prod", "DE", "--version", "9"],
        ct.as_bytes(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("version_not_found"));
    let out = cli_with_stdin(&d, &["--json", "encrypt", "prod", "DE"], b"x");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["version"], 1);

    // A file with good, current, unencrypted and bad records.
    let v1 = ct.trim();
    assert_eq!(rotate(&d), 2);
    let v2 = ok(&d, "encrypt", json!({"plaintext": "current"}));
    let lines = [
        json!({"record_key": "a", "body": v1, "version": 1}).to_string(),
        "not json at all".to_string(),
        json!({"record_key": "b", "body": "2:AAAA", "version": 1}).to_string(),
        String::new(),
        json!({"record_key": "c", "body": "x:abc", "version": 1}).to_string(),
        json!({"record_key": "d", "version": 1}).to_string(),
        json!({"record_key": "e", "body": format!("pt:{}", STANDARD.encode("plain")), "version": 0}).to_string(),
        json!({"record_key": "f", "body": v2["ciphertext"], "version": 2}).to_string(),
        json!({"record_key": "g", "body": v1, "version": 5}).to_string(),
    ];
    let dir = d.tmp.path();
    let input = dir.join("mixed.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap(); // no final newline
    let output = dir.join("mixed.out.jsonl");
    let args = |i: &Path, o: &Path| {
        vec![
            "--json".to_string(),
            "rewrap".into(),
            "prod".into(),
            "DE".into(),
            "--input".into(),
            i.display().to_string(),
            "--output".into(),
            o.display().to_string(),
        ]
    };
    let a = args(&input, &output);
    let out = d.cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "no progress bar off a terminal");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], 8);
    assert_eq!(summary["rewrapped"], 2);
    assert_eq!(summary["already_current"], 1);
    assert_eq!(summary["failed"], 5);
    let reasons: Vec<String> = summary["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| format!("{} {}", f["reason"].as_str().unwrap(), f["lines"]))
        .collect();
    let all = reasons.join("\n");
    for want in [
        "not a JSON object [2]",
        "body: decryption_failed",
        "body: unsupported_format",
        "no \"body\" field [6]",
        "body: version_not_found",
    ] {
        assert!(all.contains(want), "{want} not in {all}");
    }
    let written = std::fs::read_to_string(&output).unwrap();
    let out_lines: Vec<&str> = written.split('\n').collect();
    assert_eq!(out_lines.len(), lines.len());
    for i in [1, 2, 3, 4, 5, 7, 8] {
        assert_eq!(out_lines[i], lines[i], "line {} unchanged", i + 1);
    }
    for i in [0, 6] {
        let rec: Value = serde_json::from_str(out_lines[i]).unwrap();
        assert_eq!(rec["version"], 2);
        let back = ok(
            &d,
            "decrypt",
            json!({"ciphertext": rec["body"], "version": 2}),
        );
        assert_eq!(back["plaintext"], if i == 0 { text } else { "plain" });
    }
    assert!(leftovers(dir).is_empty());

    // An unknown key: an error, and no output and no temporary file left behind.
    let missing = dir.join("never.jsonl");
    let mut a = args(&input, &missing);
    a[3] = "FR".into();
    let out = d.cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_not_found"));
    assert!(!missing.exists());
    assert!(leftovers(dir).is_empty());
}

#[test]
fn rewrap_cli_10000_records_across_two_old_versions() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    // 5,000 records under version 1 and 5,000 under version 2; every 50th also has a
    // precommit_body. Then version 3 becomes active.
    let mut records = Vec::new();
    for (version, range) in [(1u64, 0..5000), (2, 5000..10_000)] {
        if version == 2 {
            assert_eq!(rotate(&d), 2);
        }
        let mut plaintexts = Vec::new();
        for i in range.clone() {
            plaintexts.push(format!("{{\"payload\":\"body of record {i}\"}}"));
            if i % 50 == 0 {
                plaintexts.push(format!("precommit {i}"));
            }
        }
        let mut cts = encrypt_all(&d, &plaintexts).into_iter();
        for i in range {
            let (body, v) = cts.next().unwrap();
            assert_eq!(v, version);
            let pre = if i % 50 == 0 {
                Value::String(cts.next().unwrap().0)
            } else {
                Value::Null
            };
            records.push(format!(
                "{{\"record_key\":\"rk-{i:05}\",\"version\":{version},\"body\":{},\"precommit_body\":{pre},\"key2\":\"k2-{i}\",\"range_key1\":{i},\"weight\":1.50,\"profile_key\":null}}",
                Value::String(body)
            ));
        }
    }
    assert_eq!(rotate(&d), 3);
    let dir = d.tmp.path();
    let input = dir.join("records.jsonl");
    std::fs::write(&input, records.join("\n") + "\n").unwrap();
    let output = dir.join("rewrapped.jsonl");
    let run = |i: &Path, o: &Path| -> Value {
        let out = d.cli(&[
            "--json",
            "rewrap",
            "prod",
            "DE",
            "--input",
            i.to_str().unwrap(),
            "--output",
            o.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let started = Instant::now();
    let summary = run(&input, &output);
    let took = started.elapsed();
    eprintln!(
        "rewrap of 10,000 records: {took:?} ({:.0} records/s, {} requests)",
        10_000.0 / took.as_secs_f64(),
        summary["requests"]
    );
    assert_eq!(summary["records"], 10_000);
    assert_eq!(summary["rewrapped"], 10_000);
    assert_eq!(summary["already_current"], 0);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["active_version"], 3);

    // All at version 3; every other field, and the field order, as it was.
    let written = std::fs::read_to_string(&output).unwrap();
    let out_lines: Vec<&str> = written.lines().collect();
    assert_eq!(out_lines.len(), 10_000);
    let mut to_decrypt = Vec::new();
    for (old, new) in records.iter().zip(&out_lines) {
        let (old, new): (Value, Value) = (
            serde_json::from_str(old).unwrap(),
            serde_json::from_str(new).unwrap(),
        );
        assert_eq!(new["version"], 3);
        let (mut o, mut n) = (
            old.as_object().unwrap().clone(),
            new.as_object().unwrap().clone(),
        );
        to_decrypt.push(json!({"ciphertext": n["body"], "version": 3}));
        if !n["precommit_body"].is_null() {
            to_decrypt.push(json!({"ciphertext": n["precommit_body"], "version": 3}));
        }
        assert_ne!(o["body"], n["body"]);
        for f in ["body", "precommit_body", "version"] {
            o.remove(f);
            n.remove(f);
        }
        assert_eq!(o, n);
    }
    assert!(out_lines[0].contains("\"weight\":1.50"), "{}", out_lines[0]);
    assert!(out_lines[0].starts_with("{\"record_key\":\"rk-00000\",\"version\":3,\"body\":\"2:"));

    // The daemon decrypts every rewrapped record to its original plaintext.
    let mut plain = Vec::new();
    for chunk in to_decrypt.chunks(1000) {
        for r in batch(&d, "decrypt", chunk.to_vec()) {
            plain.push(r["plaintext"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(plain.len(), 10_200);
    assert_eq!(plain[0], "{\"payload\":\"body of record 0\"}");
    assert_eq!(plain[1], "precommit 0");
    assert_eq!(plain[10_199], "{\"payload\":\"body of record 9999\"}");

    // The SDK decrypts a sample with the new version.
    let doc3 = d.secrets("prod", "DE");
    let sample: Vec<usize> = (0..10_000).step_by(499).collect();
    let ops: Vec<Value> = sample
        .iter()
        .map(|&i| {
            let rec: Value = serde_json::from_str(out_lines[i]).unwrap();
            json!(["decrypt", rec["body"], rec["version"]])
        })
        .collect();
    for (&i, r) in sample.iter().zip(sdk_batch(&doc3, &ops)) {
        assert_eq!(
            sdk_plaintext(&r),
            format!("{{\"payload\":\"body of record {i}\"}}")
        );
    }

    // A second run on its own output changes nothing, also in place.
    let again = dir.join("again.jsonl");
    let summary = run(&output, &again);
    assert_eq!(summary["rewrapped"], 0);
    assert_eq!(summary["already_current"], 10_000);
    assert_eq!(summary["requests"], 0);
    assert_eq!(std::fs::read(&again).unwrap(), written.as_bytes());
    let summary = run(&again, &again);
    assert_eq!(summary["rewrapped"], 0);
    assert_eq!(std::fs::read(&again).unwrap(), written.as_bytes());
    assert!(leftovers(dir).is_empty());

    // The counters: 10,200 record strings rewrapped into version 3.
    assert_eq!(version_doc(&d, 3)["records_rewrapped"], 10_200);
    assert_eq!(version_doc(&d, 1)["records_rewrapped_away"], 5_100);
    assert_eq!(version_doc(&d, 2)["records_encrypted"], 5_100);
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

/// The stored count of encryptions under `version` of prod/DE.
fn stored_encryptions(d: &Daemon, version: u32) -> u64 {
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.query_row(
        "SELECT encryptions FROM versions WHERE version = ?1 AND key_id = (SELECT id FROM keys WHERE environment = 'prod' AND country = 'DE')",
        [version],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

#[test]
fn encryptions_are_counted_durably_and_limited_per_version() {
    const LIMIT: u64 = 1 << 31;
    const BLOCK: u64 = 1 << 16;
    let mut d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let first = ok(&d, "encrypt", json!({"plaintext": "one"}));
    let texts: Vec<String> = (0..5).map(|i| format!("record {i}")).collect();
    encrypt_all(&d, &texts);
    // Reserved ahead in the state while running: never behind what was made.
    let reserved = stored_encryptions(&d, 1);
    assert!((6..=6 + BLOCK).contains(&reserved), "{reserved}");
    assert_eq!(rotate(&d), 2);
    let r = ok(&d, "rewrap", first.clone());
    assert_eq!(r["rewrapped"], true);
    // A clean stop stores the exact counts.
    assert!(d.stop().success());
    assert_eq!(stored_encryptions(&d, 1), 6);
    assert_eq!(stored_encryptions(&d, 2), 1);

    // A crash: the stored count is ahead of what was made, by at most a block.
    let mut d = d.launch();
    ok(&d, "encrypt", json!({"plaintext": "two"}));
    d.signal("KILL");
    d.stop();
    let after_crash = stored_encryptions(&d, 2);
    assert!((2..=2 + BLOCK).contains(&after_crash), "{after_crash}");

    // Near the limit (as a long-lived version would be): the last ones, then 409.
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.execute(
        "UPDATE versions SET encryptions = ?1 WHERE version = 2",
        [(LIMIT - 2) as i64],
    )
    .unwrap();
    drop(db);
    let d = d.launch();
    let items = vec![json!({"plaintext": "a"}); 3];
    let results = batch(&d, "encrypt", items);
    assert_eq!(results[0]["version"], 2);
    assert_eq!(results[1]["version"], 2);
    assert_eq!(
        results[2]["error"]["code"], "encryption_limit",
        "{results:?}"
    );
    assert_eq!(results[2]["error"]["status"], 409);
    let r = op(&d, "encrypt", json!({"plaintext": "b"}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code(), "encryption_limit");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("prod/DE version 2") && msg.contains("rotate"),
        "{msg}"
    );
    // Rewrap into the spent version is refused too; decryption goes on.
    let r = op(&d, "rewrap", first.clone());
    assert_eq!(r.status, 409, "{}", r.text());
    let back = ok(&d, "decrypt", results[0].clone());
    assert_eq!(back["plaintext"], "a");
    // A new version encrypts again.
    assert_eq!(rotate(&d), 3);
    let r = ok(&d, "encrypt", json!({"plaintext": "c"}));
    assert_eq!(r["version"], 3);
    let mut d = d;
    assert!(d.stop().success());
    assert_eq!(stored_encryptions(&d, 2), LIMIT);
    assert_eq!(stored_encryptions(&d, 3), 1);
}
