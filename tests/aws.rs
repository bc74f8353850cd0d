//! Customer-supplied (aws) keys against a real KMS API: moto's server on 127.0.0.1, started
//! by each test (tests/aws/moto_server.py), set up with boto3 (tests/aws/kms_tool.py).

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// moto's server on a free loopback port; killed on drop.
struct Moto {
    child: Option<Child>,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(moto_python())
            .arg(repo().join("tests/aws/moto_server.py"))
            .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start moto server (pip install \"moto[server]\" into the test venv)");
        let mut moto = Moto {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = moto.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto exited ({status}): {}", moto.log_text());
            }
            assert!(Instant::now() < deadline, "moto did not listen in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `kms_tool.py setup` made.
struct Kms {
    url: String,
    region: String,
    access_key_id: String,
    secret: String,
    cmk_a: String,
    cmk_b: String,
    key32_blob: String,
    key32_plain: String,
    key16_blob: String,
}

fn tool(args: &[&str]) -> Value {
    let out = Command::new(moto_python())
        .arg(repo().join("tests/aws/kms_tool.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kms_tool {:?} failed: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

impl Kms {
    fn setup(moto: &Moto) -> Kms {
        let v = tool(&["setup", &moto.url]);
        let s = |k: &str| v[k].as_str().unwrap().to_string();
        Kms {
            url: moto.url.clone(),
            region: s("region"),
            access_key_id: s("access_key_id"),
            secret: s("secret_access_key"),
            cmk_a: s("cmk_a"),
            cmk_b: s("cmk_b"),
            key32_blob: v["key32"]["blob"].as_str().unwrap().into(),
            key32_plain: v["key32"]["plaintext"].as_str().unwrap().into(),
            key16_blob: v["key16"]["blob"].as_str().unwrap().into(),
        }
    }

    /// Changes the CMK's state: disable, enable, schedule-deletion, cancel-deletion.
    fn key_state(&self, action: &str, cmk: &str) {
        tool(&[action, &self.url, &self.access_key_id, &self.secret, cmk]);
    }

    /// More 32-byte data keys under `cmk`: (blob, plaintext), both base64.
    fn data_keys(&self, cmk: &str, n: usize) -> Vec<(String, String)> {
        let v = tool(&[
            "datakeys",
            &self.url,
            &self.access_key_id,
            &self.secret,
            cmk,
            &n.to_string(),
        ]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["blob"].as_str().unwrap().to_string(),
                    k["plaintext"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn body(&self, blob: &str, cmk: &str) -> Value {
        json!({
            "type": "aws",
            "region": self.region,
            "encrypted_key": blob,
            "cmk_arn": cmk,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret,
        })
    }
}

fn aws_config(moto: &Moto, interval: &str, max_stale: &str) -> String {
    format!(
        "[aws]\nendpoint_url = \"{}\"\nrevalidate_interval = \"{interval}\"\nmax_stale = \"{max_stale}\"\nrequest_timeout = \"3s\"\n",
        moto.url
    )
}

fn start(moto: &Moto, interval: &str, max_stale: &str, per_day: u32) -> Daemon {
    Daemon::start_with(Options {
        extra: aws_config(moto, interval, max_stale),
        versions_per_day: per_day,
        ..Options::default()
    })
}

fn register(d: &Daemon, country: &str, body: Value) -> Reply {
    d.post(&format!("/v1/keys/prod/{country}"), body)
}

fn secrets_map(doc: &Value) -> Vec<(u64, String)> {
    doc["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["version"].as_u64().unwrap(),
                s["secret"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn status_of(d: &Daemon, country: &str, version: usize) -> String {
    d.get(&format!("/v1/keys/prod/{country}")).json()["versions"][version - 1]["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Polls `f` until it returns true; fails with `what` after `secs` seconds.
fn wait_for(secs: u64, what: &str, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn register_serves_as_current_with_kms_plaintext() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "15m", "24h", 1);

    let r = register(&d, "de", kms.body(&kms.key32_blob, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 1);
    assert_eq!(r.json()["type"], "aws");

    let show = d.get("/v1/keys/prod/DE").json();
    assert_eq!(show["versions"][0]["type"], "aws");
    assert_eq!(show["versions"][0]["status"], "active");
    assert!(show["versions"][0]["rotation_period_months"].is_null());
    assert!(show["rotation_period_days"].is_null());

    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 1);
    assert_eq!(secrets_map(&doc), vec![(1, kms.key32_plain.clone())]);

    // A record the daemon encrypts with the aws version decrypts in the InCountry SDK.
    let r = d.post(
        "/v1/keys/prod/DE/encrypt",
        json!({"plaintext": "under the customer's key"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], 1);
    let ct = r.json()["ciphertext"].as_str().unwrap().to_string();
    let back = sdk(&doc, &["decrypt", &ct, "1"]);
    assert_eq!(back["plaintext"], "under the customer's key");

    // The daily limit applies to aws versions too.
    let more = kms.data_keys(&kms.cmk_a, 1);
    let r = register(&d, "DE", kms.body(&more[0].0, &kms.cmk_a));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error_code(), "daily_limit");

    // A managed key gets an aws version on top: it becomes active, the managed one
    // deprecated, and the key keeps its rotation period (not applied while aws is active).
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    d.advance(86_400);
    let r = register(&d, "FR", kms.body(&more[0].0, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    let doc = d.secrets("prod", "FR");
    assert_eq!(doc["currentVersion"], 2);
    assert_eq!(secrets_map(&doc)[1], (2, more[0].1.clone()));
    let show = d.get("/v1/keys/prod/FR").json();
    assert_eq!(show["versions"][0]["status"], "deprecated");
    assert_eq!(show["versions"][0]["rotation_period_months"], 1);
    assert!(show["versions"][1]["rotation_period_months"].is_null());

    // The CLI: secret from a file, never on the command line; the table shows the type.
    let secret_file = d.tmp.path().join("iam-secret");
    std::fs::write(&secret_file, format!("{}\n", kms.secret)).unwrap();
    let keys = kms.data_keys(&kms.cmk_a, 1);
    let out = d.cli(&[
        "keys",
        "create",
        "prod",
        "AT",
        "--type",
        "aws",
        "--region",
        &kms.region,
        "--encrypted-key",
        &keys[0].0,
        "--cmk-arn",
        &kms.cmk_a,
        "--access-key-id",
        &kms.access_key_id,
        "--secret-key-file",
        secret_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        secrets_map(&d.secrets("prod", "AT")),
        vec![(1, keys[0].1.clone())]
    );
    let out = d.cli(&["keys", "show", "prod", "AT"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(" aws ") && table.contains("active"),
        "{table}"
    );

    // Restart: the data key is only in memory, so it comes back from KMS before ready.
    let d = d.restart();
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone())]
    );
    assert_eq!(secrets_map(&d.secrets("prod", "FR"))[1].1, more[0].1);
    let health = d.get("/v1/health").json();
    assert_eq!(health["aws"]["status"], "ok", "{health}");
    assert_eq!(health["aws"]["versions"], 3);
    drop(moto);
}

#[test]
fn refused_registrations_name_the_cause_and_store_nothing() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "15m", "24h", 1);
    let good = kms.body(&kms.key32_blob, &kms.cmk_a);
    let with = |field: &str, value: &str| {
        let mut b = good.clone();
        b[field] = json!(value);
        b
    };
    let corrupted = {
        use base64::Engine;
        let mut blob = b64(&kms.key32_blob);
        let last = blob.len() - 1;
        blob[last] ^= 0x01;
        base64::engine::general_purpose::STANDARD.encode(blob)
    };
    let missing_cmk = kms.cmk_a.replace(
        kms.cmk_a.rsplit('/').next().unwrap(),
        "00000000-0000-0000-0000-000000000000",
    );
    let cases: Vec<(&str, Value, u16, &[&str], &str)> = vec![
        (
            "wrong CMK ARN",
            with("cmk_arn", &kms.cmk_b),
            400,
            &["aws_access_denied", "aws_incorrect_key"],
            &kms.cmk_b,
        ),
        (
            "CMK that does not exist",
            with("cmk_arn", &missing_cmk),
            400,
            &["aws_key_not_found", "aws_access_denied"],
            "does not exist",
        ),
        (
            "garbage ciphertext",
            with("encrypted_key", "bm90IGEgY2lwaGVydGV4dA=="),
            400,
            &["aws_invalid_ciphertext"],
            "not a valid KMS ciphertext",
        ),
        (
            "corrupted ciphertext",
            with("encrypted_key", &corrupted),
            400,
            &["aws_invalid_ciphertext"],
            "not a valid KMS ciphertext",
        ),
        (
            "16-byte plaintext",
            with("encrypted_key", &kms.key16_blob),
            400,
            &["aws_key_length"],
            "to 16 bytes",
        ),
        (
            "unknown access key id",
            with("access_key_id", "AKIAAAAAAAAAAAAAAAAA"),
            400,
            &["aws_credentials_rejected"],
            "credentials were refused",
        ),
        (
            "wrong secret key",
            with(
                "secret_access_key",
                "WrongSecretKeyWrongSecretKeyWrongSecret0",
            ),
            400,
            &["aws_credentials_rejected"],
            "credentials were refused",
        ),
        (
            "not base64",
            with("encrypted_key", "%%%"),
            400,
            &["invalid_encrypted_key"],
            "base64",
        ),
        (
            "ARN in another region",
            with("region", "us-west-2"),
            400,
            &["invalid_cmk_arn"],
            "us-west-2",
        ),
        (
            "rotation period on aws",
            {
                let mut b = good.clone();
                b["rotation_period_days"] = json!(30);
                b
            },
            400,
            &["invalid_rotation_period"],
            "aws",
        ),
        (
            "no secret",
            {
                let mut b = good.clone();
                b.as_object_mut().unwrap().remove("secret_access_key");
                b
            },
            400,
            &["missing_field"],
            "secret_access_key",
        ),
    ];
    for (what, body, status, codes, says) in cases {
        let r = register(&d, "DE", body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(
            codes.contains(&r.error_code().as_str()),
            "{what}: code {} not in {codes:?}: {}",
            r.error_code(),
            r.text()
        );
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            msg.contains(says),
            "{what}: message does not say `{says}`: {msg}"
        );
        assert!(
            !msg.contains(&kms.secret),
            "{what}: the IAM secret is in the message"
        );
    }
    // Nothing was stored: no key, and the first accepted registration is version 1.
    assert_eq!(d.get("/v1/keys/prod/DE").status, 404);
    assert_eq!(d.get("/v1/keys").json()["keys"], json!([]));
    let r = register(&d, "DE", good);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 1);
}

#[test]
fn iam_secret_is_not_in_state_or_logs() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "24h", 1);
    let r = register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    let wrong = "WrongSecretKeyWrongSecretKeyWrongSecret0";
    let mut bad = kms.body(&kms.key32_blob, &kms.cmk_a);
    bad["secret_access_key"] = json!(wrong);
    assert_eq!(register(&d, "FR", bad).status, 400);
    // A few revalidations, then a restart (which opens the sealed secret and uses it).
    wait_for(20, "two revalidations", &d, || {
        d.log_text().matches("KMS revalidation pass").count() >= 2
    });
    let mut d = d.restart();
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone())]
    );
    d.stop();

    let data_key = b64(&kms.key32_plain);
    let state = d.tmp.path().join("state");
    let mut files = vec![d.log.clone()];
    for e in std::fs::read_dir(&state).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut db_seen = false;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        db_seen |= f.ends_with("keyd.sqlite3") && !bytes.is_empty();
        for (what, needle) in [
            ("the IAM secret", kms.secret.as_bytes()),
            ("the refused IAM secret", wrong.as_bytes()),
            ("the data key", data_key.as_slice()),
            ("the data key (base64)", kms.key32_plain.as_bytes()),
        ] {
            assert!(!contains(&bytes, needle), "{what} is in {}", f.display());
        }
    }
    assert!(db_seen, "no state database in {}", state.display());
    // What the state does keep: the encrypted key, the ARN and the access key id.
    let db = std::fs::read(state.join("keyd.sqlite3")).unwrap();
    assert!(contains(&db, kms.cmk_a.as_bytes()));
    assert!(contains(&db, kms.access_key_id.as_bytes()));
    assert!(contains(&db, &b64(&kms.key32_blob)));
}

#[test]
fn revoked_cmk_makes_versions_unavailable_until_enabled_again() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "24h", 10);
    assert_eq!(
        register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a)).status,
        201
    );
    // A managed version on top: v1 (aws) is deprecated, v2 (managed) active.
    let r = d.post(
        "/v1/keys/prod/DE/rotate",
        json!({"rotation_period_days": 30}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let managed = secrets_map(&d.secrets("prod", "DE"))[1].clone();

    kms.key_state("disable", &kms.cmk_a);
    wait_for(20, "v1 unavailable after DisableKey", &d, || {
        status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    let why = show["versions"][0]["error"].as_str().unwrap();
    assert!(why.contains("disabled"), "{why}");
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 2);
    assert_eq!(secrets_map(&doc), vec![managed.clone()]);
    let health = d.get("/v1/health").json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["aws"]["problems"][0]["state"], "revoked", "{health}");
    assert!(health["unavailable_versions"]
        .as_array()
        .unwrap()
        .contains(&json!("prod/DE v1")));
    assert!(d.log_text().contains("no longer served"));

    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 restored after EnableKey", &d, || {
        status_of(&d, "DE", 1) == "deprecated"
    });
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone()), managed.clone()]
    );
    assert_eq!(d.get("/v1/health").json()["aws"]["status"], "ok");
    let audit = d.get("/v1/audit?since=0").json()["entries"].clone();
    let revalidations: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "kms-revalidate" && e["version"] == 1)
        .map(|e| {
            (
                e["outcome"].as_str().unwrap().into(),
                e["detail"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(revalidations.len(), 2, "{revalidations:?}");
    assert_eq!(revalidations[0].0, "failed");
    assert!(revalidations[0].1.contains("disabled"), "{revalidations:?}");
    assert_eq!(revalidations[1].0, "ok");

    // An active aws version whose CMK goes pending deletion: the document cannot be served
    // (its current version is gone), and says why.
    let keys = kms.data_keys(&kms.cmk_a, 1);
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    kms.key_state("schedule-deletion", &kms.cmk_a);
    wait_for(20, "v3 unavailable after ScheduleKeyDeletion", &d, || {
        status_of(&d, "DE", 3) == "unavailable" && status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    assert!(
        show["versions"][2]["error"]
            .as_str()
            .unwrap()
            .contains("pending deletion"),
        "{show}"
    );
    let r = d.get("/v1/keys/prod/DE/secrets");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "active_version_unavailable");

    kms.key_state("cancel-deletion", &kms.cmk_a);
    kms.key_state("enable", &kms.cmk_a);
    wait_for(20, "v1 and v3 restored", &d, || {
        status_of(&d, "DE", 3) == "active" && status_of(&d, "DE", 1) == "deprecated"
    });
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 3);
    assert_eq!(secrets_map(&doc)[2], (3, keys[0].1.clone()));
}

#[test]
fn kms_outage_keeps_serving_until_max_stale() {
    let mut moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "1h", 10);
    assert_eq!(
        register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a)).status,
        201
    );
    let keys = kms.data_keys(&kms.cmk_a, 1);
    moto.stop();

    wait_for(30, "health degraded while KMS is down", &d, || {
        d.get("/v1/health").json()["aws"]["status"] == "degraded"
    });
    let health = d.get("/v1/health").json();
    assert_eq!(health["status"], "degraded");
    let problem = &health["aws"]["problems"][0];
    assert_eq!(problem["state"], "unreachable", "{health}");
    assert!(problem["last_success"].as_str().unwrap().ends_with('Z'));
    // The cached key still serves.
    assert_eq!(status_of(&d, "DE", 1), "active");
    assert_eq!(
        secrets_map(&d.secrets("prod", "DE")),
        vec![(1, kms.key32_plain.clone())]
    );
    // A registration cannot be checked: 503, nothing stored.
    let r = register(&d, "DE", kms.body(&keys[0].0, &kms.cmk_a));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "kms_unavailable");
    assert_eq!(
        d.get("/v1/keys/prod/DE").json()["versions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Past max_stale without a successful check: no longer served.
    d.advance(3_700);
    wait_for(30, "v1 unavailable past max_stale", &d, || {
        status_of(&d, "DE", 1) == "unavailable"
    });
    let show = d.get("/v1/keys/prod/DE").json();
    assert!(
        show["versions"][0]["error"]
            .as_str()
            .unwrap()
            .contains("max_stale"),
        "{show}"
    );
    assert_eq!(
        d.get("/v1/health").json()["aws"]["problems"][0]["state"],
        "stale"
    );
    assert_eq!(d.get("/v1/keys/prod/DE/secrets").status, 503);
}

#[test]
fn the_101st_customer_supplied_version_is_refused() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1h", "24h", 1000);
    let keys = kms.data_keys(&kms.cmk_a, 101);
    for (i, (blob, _)) in keys.iter().take(100).enumerate() {
        let r = register(&d, "DE", kms.body(blob, &kms.cmk_a));
        assert_eq!(r.status, 201, "version {}: {}", i + 1, r.text());
    }
    let r = register(&d, "DE", kms.body(&keys[100].0, &kms.cmk_a));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code(), "customer_supplied_limit");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("100 customer-supplied") && msg.contains("does not reset"),
        "{msg}"
    );
    // Managed versions are still allowed; the aws limit counts over the key's life.
    let r = d.post(
        "/v1/keys/prod/DE/rotate",
        json!({"rotation_period_days": 30}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    d.advance(86_400 * 2);
    let r = register(&d, "DE", kms.body(&keys[100].0, &kms.cmk_a));
    assert_eq!(r.status, 409, "{}", r.text());
    let doc = d.secrets("prod", "DE");
    assert_eq!(doc["currentVersion"], 101);
    assert_eq!(doc["secrets"].as_array().unwrap().len(), 101);
}

/// Runs one statement on the state of a stopped daemon.
fn edit_state(d: &Daemon, sql: &str, params: &[&dyn rusqlite::ToSql]) {
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    let n = db.execute(sql, params).unwrap();
    assert_eq!(n, 1, "{sql}");
}

const ROW: &str =
    "WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE environment = 'prod' AND country = ?1)";

#[test]
fn versions_are_bound_to_their_key_and_kms_fields() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let mut d = start(&moto, "15m", "24h", 1);
    let keys = kms.data_keys(&kms.cmk_a, 4);
    // DE: its encrypted key is swapped for another valid one under the same CMK.
    // FR: its sealed key check is removed. AT: its CMK ARN is changed. IT: left alone.
    for (country, blob) in [
        ("DE", &kms.key32_blob),
        ("FR", &keys[1].0),
        ("AT", &keys[2].0),
        ("IT", &keys[3].0),
    ] {
        let r = register(&d, country, kms.body(blob, &kms.cmk_a));
        assert_eq!(r.status, 201, "{country}: {}", r.text());
    }
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    let checks: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM versions WHERE aws_check IS NOT NULL AND length(aws_check_iv) = 12",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(checks, 4, "every registration stores a sealed key check");
    drop(db);

    d.stop();
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_encrypted_key = ?2 {ROW}"),
        &[&"DE", &b64(&keys[0].0)],
    );
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_check = NULL, aws_check_iv = NULL {ROW}"),
        &[&"FR"],
    );
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_cmk_arn = ?2 {ROW}"),
        &[&"AT", &kms.cmk_b],
    );
    let d = d.launch();

    for country in ["DE", "FR", "AT"] {
        wait_for(20, "the altered versions unavailable", &d, || {
            status_of(&d, country, 1) == "unavailable"
        });
        let show = d.get(&format!("/v1/keys/prod/{country}")).json();
        let why = show["versions"][0]["error"].as_str().unwrap();
        assert!(why.contains("aws_key_mismatch"), "{country}: {why}");
        let r = d.get(&format!("/v1/keys/prod/{country}/secrets"));
        assert_eq!(r.status, 503, "{country}: {}", r.text());
        assert_eq!(r.error_code(), "active_version_unavailable");
        let r = d.post(
            &format!("/v1/keys/prod/{country}/encrypt"),
            json!({"plaintext": "x"}),
        );
        assert_eq!(r.status, 503, "{country}: {}", r.text());
    }
    let why = |c: &str| {
        d.get(&format!("/v1/keys/prod/{c}")).json()["versions"][0]["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(why("FR").contains("removed"), "{}", why("FR"));
    assert!(why("AT").contains("CMK ARN"), "{}", why("AT"));
    // The untouched version serves its own key.
    assert_eq!(status_of(&d, "IT", 1), "active");
    assert_eq!(
        secrets_map(&d.secrets("prod", "IT")),
        vec![(1, keys[3].1.clone())]
    );

    let health = d.get("/v1/health").json();
    assert_eq!(health["status"], "degraded", "{health}");
    let problems = health["aws"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 3, "{health}");
    for p in problems {
        assert_eq!(p["state"], "mismatch", "{health}");
        assert_eq!(p["code"], "aws_key_mismatch", "{health}");
    }
    // Audited like any other aws unavailability, once each.
    let audit = d.get("/v1/audit?since=0").json()["entries"].clone();
    let failed: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "kms-revalidate" && e["outcome"] == "failed")
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed
        .iter()
        .all(|e| e["detail"].as_str().unwrap().contains("aws_key_mismatch")));
    // Never a key in the log.
    let log = d.log_text();
    assert!(log.contains("fails its key check"), "{log}");
    for (_, plain) in &keys {
        assert!(!log.contains(plain.as_str()));
    }
    assert!(!log.contains(&kms.key32_plain));
    drop(moto);
}
