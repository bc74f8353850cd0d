//! Customer-supplied (aws) keys: registered against moto's KMS on 127.0.0.1 (its IAM secret
//! key in the request), a registration refused before KMS is asked (its secret too), the
//! secrets document served; then the daemon's memory.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::common::{moto_python, repo, Daemon, Options};
use crate::scan::{self, check, wait_connections_closed, Needle};

/// moto's server on a free loopback port; killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto_python())
            .arg(repo().join("tests/aws/moto_server.py"))
            .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup(moto: &Moto) -> Value {
    let out = Command::new(moto_python())
        .arg(repo().join("tests/aws/kms_tool.py"))
        .args(["setup", &moto.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn aws_registration_copies() {
    if !scan::can_read_memory() {
        eprintln!("skipped: reading the daemon's memory needs root");
        return;
    }
    let moto = Moto::start();
    let kms = setup(&moto);
    let d = Daemon::start_with(Options {
        extra: format!(
            "[aws]\nendpoint_url = \"{}\"\nrequest_timeout = \"3s\"\n",
            moto.url
        ),
        log_level: "info",
        versions_per_day: 100,
        ..Options::default()
    });
    let s = |k: &str| kms[k].as_str().unwrap().to_string();
    let secret = s("secret_access_key");
    let body = json!({
        "type": "aws",
        "region": s("region"),
        "encrypted_key": kms["key32"]["blob"],
        "cmk_arn": s("cmk_a"),
        "access_key_id": s("access_key_id"),
        "secret_access_key": secret,
    });
    // Refused before KMS is asked: a managed key with aws fields, an aws key with a bad region.
    let early = "EarlyReturnSecretKey0123456789abcdefghijkl";
    let mut refused = body.clone();
    refused["type"] = json!("incountry-managed");
    refused["secret_access_key"] = json!(early);
    assert_eq!(d.post("/v1/keys/prod/FR", refused).status, 400);
    let mut refused = body.clone();
    refused["region"] = json!("Not A Region");
    refused["secret_access_key"] = json!(early);
    assert_eq!(d.post("/v1/keys/prod/FR", refused).status, 400);
    let r = d.post("/v1/keys/prod/DE", body);
    assert_eq!(r.status, 201, "{}", r.text());
    for _ in 0..3 {
        d.secrets("prod", "DE");
    }
    wait_connections_closed(d.pid());

    let plain = kms["key32"]["plaintext"].as_str().unwrap().to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&plain)
        .unwrap();
    let mut needles = Needle::with_halves("aws data key raw", &raw, 1);
    // KMS's answer carries the key in base64 (JSON): one copy is left in the AWS SDK's HTTP
    // client (its connection's read buffer), which the daemon cannot reach. None on any
    // stack (the SDK's parsing frames are cleared) or in the daemon's own buffers.
    needles.extend(
        Needle::with_halves("aws data key base64", plain.as_bytes(), 0)
            .into_iter()
            .map(|n| n.allow(1)),
    );
    // The live version keeps its IAM secret (revalidation decrypts with it again): one copy.
    needles.extend(
        Needle::with_halves("IAM secret", secret.as_bytes(), 0)
            .into_iter()
            .map(|n| n.allow(1)),
    );
    needles.extend(Needle::with_halves(
        "refused IAM secret",
        early.as_bytes(),
        0,
    ));
    let failures = check(d.pid(), "aws key registered and served", &needles);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
