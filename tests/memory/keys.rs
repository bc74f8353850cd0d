//! Data keys: served, used for records, rotated, loaded again after a restart.

use base64::Engine;
use harness::{request, Daemon, Options, Secrets};
use incountry_keyd::proto::{BatchAnswer, Decrypted, Encrypted, Rewrapped};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::scan::{self, check, wait_connections_closed, Needle};

fn options() -> Options {
    Options {
        versions_per_day: 1000,
        log_level: "info",
        ..Options::default()
    }
}

/// Each served version's raw key, from a secrets document.
fn keys_of(doc: &Secrets) -> Vec<(u32, Vec<u8>)> {
    doc.secrets
        .iter()
        .map(|s| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(s.secret.as_bytes())
                .unwrap();
            (s.version, raw)
        })
        .collect()
}

fn record<T: DeserializeOwned>(d: &Daemon, op: &str, body: Value) -> T {
    let r = d.post(&format!("/v1/keys/prod/DE/{op}"), body);
    assert_eq!(r.status, 200, "{op}: {}", r.text());
    r.read()
}

/// The request that decrypts or rewraps a record.
fn cipher(e: &Encrypted) -> Value {
    json!({ "ciphertext": e.ciphertext, "version": e.version })
}

/// Serves the documents and records of one key around a rotation: plain fetches, a long poll
/// woken by the rotation, single and batch records on both versions.
fn serve_and_rotate(d: &Daemon) -> Secrets {
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    for _ in 0..5 {
        d.secrets("prod", "DE");
    }
    let v1: Encrypted = record(d, "encrypt", json!({"plaintext": "record under version 1"}));
    record::<Decrypted>(d, "decrypt", cipher(&v1));
    let batch: Vec<_> = (0..20)
        .map(|i| json!({"plaintext": format!("batch {i}")}))
        .collect();
    record::<BatchAnswer<Encrypted>>(d, "encrypt", json!({ "batch": batch }));
    // A long poll held across the rotation.
    let etag = d
        .get("/v1/keys/prod/DE/secrets")
        .header("etag")
        .unwrap()
        .to_string();
    let socket = d.socket.clone();
    let poll = std::thread::spawn(move || {
        request(
            &socket,
            "GET",
            "/v1/keys/prod/DE/secrets?wait=30",
            &[("If-None-Match", &etag)],
            b"",
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The harness sees the held connection (it waits for none before scanning).
    assert_eq!(scan::connections(d.pid()), 1);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    let polled = poll.join().unwrap();
    assert_eq!(polled.status, 200, "{}", polled.text());
    for _ in 0..5 {
        d.secrets("prod", "DE");
    }
    let v2: Encrypted = record(d, "encrypt", json!({"plaintext": "record under version 2"}));
    record::<Decrypted>(d, "decrypt", cipher(&v1));
    record::<Decrypted>(d, "decrypt", cipher(&v2));
    assert!(record::<Rewrapped>(d, "rewrap", cipher(&v1)).rewrapped);
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc.current_version, 2);
    doc
}

/// After a restart (keys unwrapped by the HSM at load): documents and records again.
fn serve_loaded(d: &Daemon) {
    for _ in 0..3 {
        d.secrets("prod", "DE");
    }
    let ct: Encrypted = record(d, "encrypt", json!({"plaintext": "after a restart"}));
    record::<Decrypted>(d, "decrypt", cipher(&ct));
}

/// Each live version: the raw key exactly once, in a locked page; its base64 nowhere.
fn needles(keys: &[(u32, Vec<u8>)]) -> Vec<Needle> {
    let mut out = Vec::new();
    for (version, raw) in keys {
        let text = base64::engine::general_purpose::STANDARD.encode(raw);
        out.extend(Needle::with_halves(
            &format!("version {version} raw key"),
            raw,
            1,
        ));
        out.extend(Needle::with_halves(
            &format!("version {version} base64"),
            text.as_bytes(),
            0,
        ));
    }
    out
}

#[test]
fn served_and_rotated_keys_leave_no_copies_in_memory() {
    if !scan::can_read_memory() {
        eprintln!("skipped: reading the daemon's memory needs root");
        return;
    }
    let d = Daemon::start_with(options());
    let doc = serve_and_rotate(&d);
    let keys = keys_of(&doc);
    assert_eq!(keys.len(), 2);
    wait_connections_closed(d.pid());
    let mut failures = check(d.pid(), "served and rotated", &needles(&keys));

    let d = d.restart();
    serve_loaded(&d);
    wait_connections_closed(d.pid());
    failures.extend(check(d.pid(), "after a restart", &needles(&keys)));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
