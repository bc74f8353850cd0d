//! Customer-supplied (aws) keys on two nodes: a refusal one node's KMS check sees is
//! recorded in the shared state, and the other node withdraws the version too, though its
//! own KMS calls only fail transiently (it would keep serving its cached key until
//! `aws.max_stale`). A success clears it; each node serves the key again once its own KMS
//! decrypt succeeds.
//!
//! Node B reaches KMS (moto) through a relay the test cuts. It learns the refusal in its
//! own revalidation passes (which read the recorded refusals) and at its start; once
//! change propagation (LISTEN/NOTIFY) is in, it also learns it at once from the refusal's
//! notification (`Keyring::learn_aws_state` at the key's reload): the test reads the same.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::moto::{kms_tool, KmsSetup, Moto};
use harness::{Daemon, Options, Postgres, Reply};
use incountry_keyd::domain::{AwsState, VersionStatus};
use incountry_keyd::proto::VersionDocument;
use serde::de::IgnoredAny;
use serde_json::json;

/// A TCP relay to `upstream` that can be cut (open connections shut, new ones closed at
/// once, as an unreachable endpoint) and restored.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn to(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            open: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::default(),
        };
        let (open, stop, conns) = (relay.open.clone(), relay.stop.clone(), relay.conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !open.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut held = conns.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        relay
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then ends.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies one direction until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// A node checking its aws versions every second, keeping a cached key an hour when KMS
/// (at `kms_url`) is out of reach.
fn options(kms_url: &str) -> Options {
    Options {
        versions_per_day: 10,
        log_level: "info",
        extra: format!(
            "[aws]\nendpoint_url = \"{kms_url}\"\nrevalidate_interval = \"1s\"\nmax_stale = \"1h\"\nrequest_timeout = \"3s\"\n"
        ),
        ..Options::default()
    }
}

fn v1(d: &Daemon) -> VersionDocument {
    d.version("prod", "DE", 1)
}

/// Polls `f` until it holds; fails after `secs` with both nodes' logs.
fn wait(what: &str, secs: u64, nodes: [&Daemon; 2], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nnode A:\n{}\nnode B:\n{}",
            nodes[0].log_text(),
            nodes[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_aws_key_disabled_in_kms_is_withdrawn_on_every_node_and_restored() {
    let moto = Moto::start();
    let kms: KmsSetup = kms_tool(&["setup", &moto.url]);
    let relay = Relay::to(moto.url.trim_start_matches("http://").parse().unwrap());
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let a = Daemon::prepare(options(&moto.url));
    a.use_postgres(&pg, &db);
    let a = a.launch();
    let r: Reply = a.post(
        "/v1/keys/prod/DE",
        json!({
            "type": "aws",
            "region": kms.region,
            "encrypted_key": kms.key32.blob,
            "cmk_arn": kms.cmk_a,
            "access_key_id": kms.access_key_id,
            "secret_access_key": kms.secret_access_key,
        }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // B: the same database and token; KMS through the relay.
    let b = a.another_node(options(&relay.url()), &pg, &db).launch();
    wait("B serves v1", 30, [&a, &b], || {
        v1(&b).status == VersionStatus::Active
    });
    assert_eq!(b.secrets("prod", "DE"), a.secrets("prod", "DE"));

    // B loses KMS: it keeps serving its cached key (a transient failure).
    relay.cut();
    wait("B cannot reach KMS", 30, [&a, &b], || {
        b.health()
            .aws
            .problems
            .iter()
            .any(|p| p.state == AwsState::Unreachable)
    });
    assert_eq!(v1(&b).status, VersionStatus::Active);

    // The customer disables the CMK: A's check sees it and records it; B withdraws the
    // version from what the state says.
    kms_tool::<IgnoredAny>(&[
        "disable",
        &moto.url,
        &kms.access_key_id,
        &kms.secret_access_key,
        &kms.cmk_a,
    ]);
    wait("A withdraws v1", 30, [&a, &b], || {
        v1(&a).status == VersionStatus::Unavailable
    });
    assert_eq!(
        pg.sql(&db, "SELECT aws_refused_code FROM versions"),
        "aws_key_disabled"
    );
    wait("B withdraws v1", 30, [&a, &b], || {
        v1(&b).status == VersionStatus::Unavailable
    });
    let why = v1(&b).error.unwrap();
    assert!(
        why.contains("disabled") && why.contains("recorded in the state"),
        "{why}"
    );
    assert_eq!(b.health().aws.problems[0].state, AwsState::Revoked);
    assert_eq!(b.get("/v1/keys/prod/DE/secrets").status, 503);
    // Started again while KMS is still out of its reach: withdrawn from the start.
    let b = b.restart();
    let why = v1(&b).error.unwrap();
    assert!(why.contains("recorded in the state"), "{why}");

    // Enabled again: A decrypts it and clears the record; B serves it again once its own
    // KMS decrypt succeeds.
    kms_tool::<IgnoredAny>(&[
        "enable",
        &moto.url,
        &kms.access_key_id,
        &kms.secret_access_key,
        &kms.cmk_a,
    ]);
    wait("A restores v1", 30, [&a, &b], || {
        v1(&a).status == VersionStatus::Active
    });
    wait("the record cleared", 30, [&a, &b], || {
        pg.sql(
            &db,
            "SELECT count(*) FROM versions WHERE aws_refused_code IS NOT NULL",
        ) == "0"
    });
    assert_eq!(v1(&b).status, VersionStatus::Unavailable);
    relay.restore();
    wait("B restores v1", 30, [&a, &b], || {
        v1(&b).status == VersionStatus::Active
    });
    assert_eq!(b.secrets("prod", "DE"), a.secrets("prod", "DE"));
    // Each node's own checks are audited in the one log: A's refusal and both restores.
    let entries: Vec<_> = a
        .audit(0)
        .entries
        .into_iter()
        .filter(|e| e.action == "kms-revalidate")
        .map(|e| e.detail)
        .collect();
    assert!(
        entries.iter().any(|d| d.contains("unavailable")),
        "{entries:?}"
    );
    assert!(
        entries.iter().filter(|d| d.contains("restored")).count() >= 2,
        "{entries:?}"
    );
}
