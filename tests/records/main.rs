//! Record encryption, decryption and rewrap in the InCountry SDK format, against the real
//! daemon and the real InCountry Python SDK.
//!
//! - `sdk`: records both ways between the daemon and the SDK, across a rotation, rewrapped;
//! - `input`: the documented answers to bad input and to every bit flipped in a record;
//! - `batch`: batches of 1000 with bad items among them;
//! - `limits`: encryptions counted durably and limited per version;
//! - `cli`: `encrypt`, `decrypt` and `rewrap` on the command line.

mod batch;
mod cli;
mod input;
mod limits;
mod sdk;

use std::process::Command;

use harness::{repo, sdk_python, Daemon, Options, Reply};
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
