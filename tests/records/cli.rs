//! `encrypt`, `decrypt` and `rewrap` on the command line: stdin and stdout, a file of mixed
//! records, and 10,000 records across two old versions.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use harness::{bin, Daemon};
use incountry_keyd::proto::{Decrypted, Encrypted};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{batch, daemon, encrypt_all, ok, plaintext_of, record, rotate, sdk_batch};

/// What `rewrap --json` prints, the fields the tests check (the CLI's
/// `cli::rewrap::Summary`: not a wire type, it only serializes).
#[derive(Deserialize)]
struct Summary {
    active_version: u32,
    records: u64,
    rewrapped: u64,
    already_current: u64,
    failed: u64,
    failures: Vec<Failure>,
    requests: u64,
}

#[derive(Deserialize)]
struct Failure {
    reason: String,
    lines: Vec<u64>,
}

/// The fields of an SDK record line that rewrap changes (the others pass through as they
/// are, which the tests check on the raw line).
#[derive(Deserialize)]
struct RecordLine {
    body: String,
    #[serde(default)]
    precommit_body: Option<String>,
    version: u32,
}

fn summary_of(out: &Output) -> Summary {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "rewrap --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs the CLI with `stdin` piped in.
fn cli_with_stdin(d: &Daemon, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(bin())
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
    let doc: Encrypted = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc.version, 1);

    // A file with good, current, unencrypted and bad records.
    let v1 = ct.trim();
    assert_eq!(rotate(&d), 2);
    let v2: Encrypted = ok(&d, "encrypt", json!({"plaintext": "current"}));
    let lines = [
        json!({"record_key": "a", "body": v1, "version": 1}).to_string(),
        "not json at all".to_string(),
        json!({"record_key": "b", "body": "2:AAAA", "version": 1}).to_string(),
        String::new(),
        json!({"record_key": "c", "body": "x:abc", "version": 1}).to_string(),
        json!({"record_key": "d", "version": 1}).to_string(),
        json!({"record_key": "e", "body": format!("pt:{}", STANDARD.encode("plain")), "version": 0}).to_string(),
        json!({"record_key": "f", "body": v2.ciphertext, "version": 2}).to_string(),
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
    let summary = summary_of(&out);
    assert_eq!(summary.records, 8);
    assert_eq!(summary.rewrapped, 2);
    assert_eq!(summary.already_current, 1);
    assert_eq!(summary.failed, 5);
    let reasons: Vec<String> = summary
        .failures
        .iter()
        .map(|f| format!("{} {}", f.reason, json!(f.lines)))
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
        let rec: RecordLine = serde_json::from_str(out_lines[i]).unwrap();
        assert_eq!(rec.version, 2);
        let back: Decrypted = ok(&d, "decrypt", record(&rec.body, 2));
        assert_eq!(*back.plaintext, if i == 0 { text } else { "plain" });
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
    for (version, range) in [(1u32, 0..5000), (2, 5000..10_000)] {
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
    let run = |i: &Path, o: &Path| -> Summary {
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
        summary_of(&out)
    };

    let started = Instant::now();
    let summary = run(&input, &output);
    let took = started.elapsed();
    eprintln!(
        "rewrap of 10,000 records: {took:?} ({:.0} records/s, {} requests)",
        10_000.0 / took.as_secs_f64(),
        summary.requests
    );
    assert_eq!(summary.records, 10_000);
    assert_eq!(summary.rewrapped, 10_000);
    assert_eq!(summary.already_current, 0);
    assert_eq!(summary.failed, 0);
    assert_eq!(summary.active_version, 3);

    // All at version 3; every other field, and the field order, as it was.
    let written = std::fs::read_to_string(&output).unwrap();
    let out_lines: Vec<&str> = written.lines().collect();
    assert_eq!(out_lines.len(), 10_000);
    let mut to_decrypt = Vec::new();
    for (old, new) in records.iter().zip(&out_lines) {
        let (old_rec, new_rec): (RecordLine, RecordLine) = (
            serde_json::from_str(old).unwrap(),
            serde_json::from_str(new).unwrap(),
        );
        assert_eq!(new_rec.version, 3);
        to_decrypt.push(record(&new_rec.body, 3));
        if let Some(pre) = &new_rec.precommit_body {
            to_decrypt.push(record(pre, 3));
        }
        assert_ne!(old_rec.body, new_rec.body);
        // Raw on purpose: every other field passes through as it was.
        let (mut o, mut n): (Map<String, Value>, Map<String, Value>) = (
            serde_json::from_str(old).unwrap(),
            serde_json::from_str(new).unwrap(),
        );
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
        for r in batch::<Decrypted>(&d, "decrypt", chunk.to_vec()) {
            plain.push(plaintext_of(&r).unwrap().to_string());
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
            let rec: RecordLine = serde_json::from_str(out_lines[i]).unwrap();
            json!(["decrypt", rec.body, rec.version])
        })
        .collect();
    for (&i, r) in sample.iter().zip(sdk_batch(&doc3, &ops)) {
        assert_eq!(
            r.plaintext(),
            format!("{{\"payload\":\"body of record {i}\"}}")
        );
    }

    // A second run on its own output changes nothing, also in place.
    let again = dir.join("again.jsonl");
    let summary = run(&output, &again);
    assert_eq!(summary.rewrapped, 0);
    assert_eq!(summary.already_current, 10_000);
    assert_eq!(summary.requests, 0);
    assert_eq!(std::fs::read(&again).unwrap(), written.as_bytes());
    let summary = run(&again, &again);
    assert_eq!(summary.rewrapped, 0);
    assert_eq!(std::fs::read(&again).unwrap(), written.as_bytes());
    assert!(leftovers(dir).is_empty());

    // The counters: 10,200 record strings rewrapped into version 3.
    assert_eq!(d.version("prod", "DE", 3).records_rewrapped, 10_200);
    assert_eq!(d.version("prod", "DE", 1).records_rewrapped_away, 5_100);
    assert_eq!(d.version("prod", "DE", 2).records_encrypted, 5_100);
}
