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

use harness::{repo, sdk_python, Daemon, Options, Reply, Secrets};
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{BatchAnswer, Condition, Decrypted, Encrypted, ItemErrorBody};
use serde::de::DeserializeOwned;
use serde::Deserialize;
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

/// A single-form request that must succeed: its answer (`Encrypted`, `Decrypted`,
/// `Rewrapped`).
fn ok<T: DeserializeOwned>(d: &Daemon, name: &str, body: Value) -> T {
    let r = op(d, name, body);
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    r.read()
}

/// The request that decrypts or rewraps a record made under `version`.
fn record(ciphertext: &str, version: u32) -> Value {
    json!({ "ciphertext": ciphertext, "version": version })
}

/// One batch item: its answer, or its error.
type Item<T> = Result<T, ItemErrorBody>;

/// A batch request: its per-item results.
fn batch<T: DeserializeOwned>(d: &Daemon, name: &str, items: Vec<Value>) -> Vec<Item<T>> {
    let n = items.len();
    let r = op(d, name, json!({ "batch": items }));
    assert_eq!(r.status, 200, "{name} batch: {}", r.text());
    let results = items_of(&r);
    assert_eq!(results.len(), n);
    results
}

/// The per-item results of a batch answer.
fn items_of<T: DeserializeOwned>(r: &Reply) -> Vec<Item<T>> {
    let answer: BatchAnswer<T> = r.read();
    answer
        .results
        .into_iter()
        .map(|item| item.into_result())
        .collect()
}

/// The error code of a batch item; `None` when it succeeded.
fn code_of<T>(item: &Item<T>) -> Option<Code> {
    item.as_ref().err().map(|e| e.code)
}

/// The plaintext of a decrypted batch item; `None` when it failed.
fn plaintext_of(item: &Item<Decrypted>) -> Option<&str> {
    item.as_ref().ok().map(|d| d.plaintext.as_str())
}

fn encrypt_all(d: &Daemon, plaintexts: &[String]) -> Vec<(String, u32)> {
    plaintexts
        .chunks(1000)
        .flat_map(|chunk| {
            batch::<Encrypted>(
                d,
                "encrypt",
                chunk.iter().map(|p| json!({ "plaintext": p })).collect(),
            )
        })
        .map(|r| {
            let e = r.unwrap_or_else(|e| panic!("encrypt: {e:?}"));
            (e.ciphertext, e.version)
        })
        .collect()
}

fn rotate(d: &Daemon) -> u32 {
    d.rotate_key("prod", "DE").version
}

/// What the SDK made of one op of tests/sdk/sdk_batch.py: the answers read as the
/// daemon's, or the SDK's refusal.
#[derive(Deserialize)]
#[serde(untagged)]
enum SdkResult {
    Encrypted(Encrypted),
    Decrypted(Decrypted),
    Refused { error: String },
}

impl SdkResult {
    fn encrypted(&self) -> &Encrypted {
        match self {
            SdkResult::Encrypted(e) => e,
            other => panic!("not an SDK encryption: {}", other.describe()),
        }
    }

    fn plaintext(&self) -> &str {
        match self {
            SdkResult::Decrypted(d) => &d.plaintext,
            other => panic!("not an SDK decryption: {}", other.describe()),
        }
    }

    fn describe(&self) -> String {
        match self {
            SdkResult::Encrypted(e) => format!("encrypted under version {}", e.version),
            SdkResult::Decrypted(_) => "a plaintext".into(),
            SdkResult::Refused { error } => format!("the SDK refused: {error}"),
        }
    }
}

/// Many SDK operations in one Python process (tests/sdk/sdk_batch.py).
fn sdk_batch(doc: &Secrets, ops: &[Value]) -> Vec<SdkResult> {
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("doc.json");
    let ops_file = dir.path().join("ops.json");
    std::fs::write(&doc_file, &doc.body).unwrap();
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
    let results: Vec<SdkResult> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "SDK batch answer: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(results.len(), ops.len());
    results
}

fn healthy(d: &Daemon) {
    assert_eq!(d.health().hsm, Condition::Ok);
    let ct: Encrypted = ok(d, "encrypt", json!({"plaintext": "still fine"}));
    let back: Decrypted = ok(d, "decrypt", record(&ct.ciphertext, ct.version));
    assert_eq!(*back.plaintext, "still fine");
}
