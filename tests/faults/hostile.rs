//! Hostile clients: malformed HTTP and JSON from many threads (the requests are made in
//! `head`, `framing` and `json`). The daemon stays up, answers well-formed requests
//! correctly, does not panic, and its memory stays bounded.

mod framing;
mod head;
mod json;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use incountry_keyd::proto::{Decrypted, Encrypted, KeyDocument};
use serde_json::json;

use harness::{try_request, Daemon, Reply, Secrets};

use crate::support::{alive, audit_verify, secret_fingerprints, seed, tail, Rng};

const HENV: &str = "hostile";
/// Malformed requests to send (each counted once, whether alone on its connection or a
/// pipelined batch).
const MALFORMED: usize = 10_000;
const ATTACKERS: usize = 8;
/// A well-formed probe after every this many malformed requests.
const PROBE_EVERY: usize = 100;
/// The daemon's RSS bound under this load. Measured (debug build, 8 attackers, 2 cores):
/// 27 MiB before, 40 to 48 MiB peak, 39 to 47 MiB after (12 runs). The bound, about twice the
/// peak, leaves room for allocator noise while still catching buffers that are kept per
/// connection or grow with the input (10,000 requests of up to 1.2 MiB each).
const RSS_BOUND_KIB: u64 = 96 * 1024;

/// What the attacker does after writing.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Read the answer's status line (short timeout).
    Read,
    /// Shut down our write side, then read the answer's status line (short timeout): for
    /// requests the server may consider incomplete.
    HalfClose,
    /// Vanish: close without reading.
    Close,
}

struct Attack {
    kind: &'static str,
    bytes: Vec<u8>,
    mode: Mode,
}

/// A malformed request: its kind, its bytes, and what to do after writing them.
type Malformed = (&'static str, Vec<u8>, Mode);

/// A request with `Host` and `Connection: close`, the given header lines and body as is.
pub fn raw_request(method: &str, path: &[u8], headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(path);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        r.extend_from_slice(h.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// A request with a correct Content-Length for `body`.
pub fn with_body(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    raw_request(
        method,
        path.as_bytes(),
        &[
            "Content-Type: application/json",
            &format!("Content-Length: {}", body.len()),
        ],
        body,
    )
}

pub fn probe_path(op: &str) -> String {
    format!("/v1/keys/{HENV}/DE/{op}")
}

/// Admin routes are attacked on their own key (FR), with bodies that must all be refused;
/// the test checks at the end that FR did not change.
pub fn target_key() -> String {
    format!("/v1/keys/{HENV}/FR")
}

fn malformed(rng: &mut Rng) -> Attack {
    let (kind, bytes, mode) = match rng.below(28) {
        0 => head::bad_request_line(rng),
        1 => head::huge_request_line(rng),
        2 => head::huge_header(rng),
        3 => head::thousands_of_headers(rng),
        4 => framing::bad_chunked(rng),
        5 => head::bad_paths(rng),
        6 => json::invalid_utf8(rng),
        7 => json::deeply_nested(rng),
        8 | 9 => json::out_of_range_numbers(rng),
        10 | 11 => json::wrong_types(rng),
        12 => framing::partial_body(rng),
        13 => framing::vanish_mid_request(rng),
        14 => framing::content_length_mismatch(rng),
        15 => framing::bad_content_length(rng),
        16 => framing::transfer_encoding(rng),
        17 => head::http09(rng),
        18 => head::http2(rng),
        19 => head::null_bytes(rng),
        20 => head::bad_header_syntax(rng),
        21 => framing::pipelined_junk(rng),
        22 => framing::expect_continue(),
        23 => framing::over_max_body(rng),
        24 => framing::random_bytes(rng),
        25 => json::random_json(rng),
        26 => head::odd_methods(rng),
        _ => json::garbage_batches(rng),
    };
    Attack { kind, bytes, mode }
}

/// Sends one attack on its own connection; the status of the answer when one was read.
fn send_attack(socket: &Path, a: &Attack) -> Option<u16> {
    let mut s = UnixStream::connect(socket).expect("the daemon still accepts connections");
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server may answer (and close) before it has read everything: errors are fine.
    let _ = s.write_all(&a.bytes);
    match a.mode {
        Mode::Close => return None,
        Mode::HalfClose => {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        Mode::Read => {}
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()
}

/// A well-formed read and an encrypt/decrypt round trip on the probe key, answered right.
fn probe(socket: &Path, fp_v1: &str, n: usize) {
    // One request on the probe key (`body`: a POST), answered 200.
    let call = |op: &str, body: Option<&[u8]>| -> Reply {
        let method = if body.is_some() { "POST" } else { "GET" };
        let a = try_request(
            socket,
            method,
            &probe_path(op),
            &[],
            body.unwrap_or_default(),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("probe {n}: {op}: {e}"));
        assert_eq!(a.status, 200, "probe {n}: {op}: {}", a.text());
        a
    };
    let doc = Secrets::parse(call("secrets", None).body);
    assert_eq!(doc.current_version, 1, "probe {n}");
    assert_eq!(
        secret_fingerprints(&doc),
        vec![(1, fp_v1.to_string())],
        "probe {n}: the served key changed"
    );
    let text = format!("probe {n}: {}", "é".repeat(n % 7));
    let body = json!({ "plaintext": text }).to_string();
    let record: Encrypted = call("encrypt", Some(body.as_bytes())).read();
    assert_eq!(record.version, 1, "probe {n}");
    let ciphertext = record.ciphertext.as_str();
    assert!(ciphertext.starts_with("2:"), "probe {n}");
    let body = json!({ "ciphertext": ciphertext, "version": 1 }).to_string();
    let plain: Decrypted = call("decrypt", Some(body.as_bytes())).read();
    assert_eq!(*plain.plaintext, text, "probe {n}");
}

/// `MALFORMED` malformed requests of many kinds from `ATTACKERS` threads, with a
/// well-formed read and encrypt/decrypt round trip after every `PROBE_EVERY`. Afterwards
/// the daemon runs, never panicked, never answered 5xx, changed nothing, and its RSS stayed
/// under `RSS_BOUND_KIB`.
#[test]
fn hostile_clients() {
    let started = Instant::now();
    let seed = seed("hostile_clients");
    let d = Daemon::start();
    for c in ["DE", "FR"] {
        let r = d.create_managed(HENV, c, 30);
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let fp_v1 = secret_fingerprints(&d.secrets(HENV, "DE"))[0].1.clone();
    let pid = d.pid();
    let rss_start = d.rss_kib();

    let sent = AtomicUsize::new(0);
    let probes = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(rss_start);
    let statuses: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
    let server_errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let kinds: Mutex<BTreeMap<&'static str, BTreeMap<String, usize>>> = Mutex::new(BTreeMap::new());

    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(d.rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let attackers: Vec<_> = (0..ATTACKERS)
            .map(|t| {
                let (socket, sent, probes, statuses, server_errors, kinds, fp_v1) = (
                    &d.socket,
                    &sent,
                    &probes,
                    &statuses,
                    &server_errors,
                    &kinds,
                    &fp_v1,
                );
                scope.spawn(move || {
                    let mut rng = Rng(seed ^ (t as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                    loop {
                        let i = sent.fetch_add(1, Ordering::Relaxed);
                        if i >= MALFORMED {
                            break;
                        }
                        let attack = malformed(&mut rng);
                        let answer = send_attack(socket, &attack);
                        *kinds
                            .lock()
                            .unwrap()
                            .entry(attack.kind)
                            .or_default()
                            .entry(answer.map_or("none".to_string(), |s| s.to_string()))
                            .or_default() += 1;
                        if let Some(status) = answer {
                            *statuses.lock().unwrap().entry(status).or_default() += 1;
                            if status >= 500 {
                                server_errors.lock().unwrap().push(format!(
                                    "{status} for {}: {:?}",
                                    attack.kind,
                                    String::from_utf8_lossy(
                                        &attack.bytes[..attack.bytes.len().min(300)]
                                    )
                                ));
                            }
                        }
                        if i % PROBE_EVERY == PROBE_EVERY - 1 {
                            probe(socket, fp_v1, i);
                            probes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let results: Vec<_> = attackers.into_iter().map(|h| h.join()).collect();
        done.store(true, Ordering::Relaxed);
        for r in results {
            if let Err(e) = r {
                std::panic::resume_unwind(e);
            }
        }
    });
    let load_secs = started.elapsed().as_secs_f64();

    // Still up, still right.
    assert!(
        alive(pid),
        "the daemon died; log tail:\n{}",
        tail(&d.log_text(), 80)
    );
    probe(&d.socket, &fp_v1, MALFORMED);
    assert_eq!(d.get("/v1/health").status, 200);
    let fr: KeyDocument = d.get(&target_key()).ok(200);
    assert_eq!(
        fr.versions.len(),
        1,
        "a malformed request changed {HENV}/FR: {fr:?}"
    );
    assert_eq!(fr.rotation_period_days, Some(30), "{fr:?}");
    assert_eq!(d.versions(HENV, "DE").len(), 1);
    audit_verify(&d);
    let rss_after = d.rss_kib();
    let rss_peak = peak.load(Ordering::Relaxed).max(rss_after);

    let log = d.log_text();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(
        panics.is_empty(),
        "the daemon panicked:\n{}",
        panics.join("\n")
    );
    let server_errors = server_errors.into_inner().unwrap();
    for (kind, answers) in kinds.lock().unwrap().iter() {
        println!("  {kind}: {answers:?}");
    }
    assert!(
        server_errors.is_empty(),
        "{} malformed requests got a 5xx answer, e.g.:\n{}",
        server_errors.len(),
        server_errors[..server_errors.len().min(10)].join("\n")
    );
    println!(
        "hostile_clients: {} malformed requests ({} kinds) from {ATTACKERS} threads, {} \
         well-formed probes answered right; statuses read: {:?}; RSS start {} KiB, peak {} KiB, \
         after {} KiB (bound {} KiB); load {load_secs:.1} s, total {:.1} s",
        MALFORMED,
        kinds.lock().unwrap().len(),
        probes.load(Ordering::Relaxed) + 1,
        statuses.lock().unwrap(),
        rss_start,
        rss_peak,
        rss_after,
        RSS_BOUND_KIB,
        started.elapsed().as_secs_f64()
    );
    assert!(
        rss_peak < RSS_BOUND_KIB,
        "peak RSS {rss_peak} KiB over the bound {RSS_BOUND_KIB} KiB"
    );
    assert!(
        rss_after < RSS_BOUND_KIB,
        "RSS after the load {rss_after} KiB over the bound {RSS_BOUND_KIB} KiB"
    );
}
