//! Customer-supplied (aws) keys: registered against moto's KMS on 127.0.0.1 (its IAM secret
//! key in the request), a registration refused before KMS is asked (its secret too), the
//! secrets document served; then the daemon's memory.

use base64::Engine;
use harness::moto::{kms_tool, KmsSetup, Moto};
use harness::{Daemon, Options};
use incountry_keyd::proto::CreateKeyRequest;
use zeroize::Zeroizing;

use crate::scan::{self, check, wait_connections_closed, Needle};

#[test]
fn aws_registration_copies() {
    if !scan::can_read_memory() {
        eprintln!("skipped: reading the daemon's memory needs root");
        return;
    }
    let moto = Moto::start();
    let kms: KmsSetup = kms_tool(&["setup", &moto.url]);
    let d = Daemon::start_with(Options {
        extra: format!(
            "[aws]\nendpoint_url = \"{}\"\nrequest_timeout = \"3s\"\n",
            moto.url
        ),
        log_level: "info",
        versions_per_day: 100,
        ..Options::default()
    });
    let secret = kms.secret_access_key.clone();
    let aws = || CreateKeyRequest {
        kind: "aws".into(),
        rotation_period_days: None,
        region: Some(kms.region.clone()),
        encrypted_key: Some(kms.key32.blob.clone()),
        cmk_arn: Some(kms.cmk_a.clone()),
        access_key_id: Some(kms.access_key_id.clone()),
        secret_access_key: Some(Zeroizing::new(secret.clone())),
    };
    let body = |request: CreateKeyRequest| serde_json::to_value(request).unwrap();
    // Refused before KMS is asked: a managed key with aws fields, an aws key with a bad region.
    let early = "EarlyReturnSecretKey0123456789abcdefghijkl";
    let refused = CreateKeyRequest {
        kind: "incountry-managed".into(),
        secret_access_key: Some(Zeroizing::new(early.into())),
        ..aws()
    };
    assert_eq!(d.post("/v1/keys/prod/FR", body(refused)).status, 400);
    let refused = CreateKeyRequest {
        region: Some("Not A Region".into()),
        secret_access_key: Some(Zeroizing::new(early.into())),
        ..aws()
    };
    assert_eq!(d.post("/v1/keys/prod/FR", body(refused)).status, 400);
    let r = d.post("/v1/keys/prod/DE", body(aws()));
    assert_eq!(r.status, 201, "{}", r.text());
    for _ in 0..3 {
        d.secrets("prod", "DE");
    }
    wait_connections_closed(d.pid());

    let plain = kms.key32.plaintext.clone();
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
