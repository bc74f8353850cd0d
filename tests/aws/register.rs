//! Registrations: served as the current version with the key KMS decrypts, refused with
//! their cause (nothing stored), and the 101st customer-supplied version refused.

use harness::moto::Moto;
use harness::{needs_test_clock, sdk};
use incountry_keyd::domain::{AwsStatus, Code, VersionStatus, VersionType};
use incountry_keyd::proto::{CreateKeyRequest, Decrypted, Encrypted, KeyList, VersionAdded};
use serde_json::{json, Value};

use crate::{b64, body_of, register, start, Kms};

#[test]
fn register_serves_as_current_with_kms_plaintext() {
    needs_test_clock!();
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "15m", "24h", 1);

    let added: VersionAdded = register(&d, "de", kms.body(&kms.key32_blob, &kms.cmk_a)).ok(201);
    assert_eq!(added.version, 1);
    assert_eq!(added.kind, VersionType::Aws);

    let show = d.key("prod", "DE");
    assert_eq!(show.versions[0].kind, VersionType::Aws);
    assert_eq!(show.versions[0].status, VersionStatus::Active);
    assert_eq!(show.versions[0].rotation_period_months, None);
    assert_eq!(show.rotation_period_days, None);

    let doc = d.secrets("prod", "DE");
    assert_eq!(doc.current_version, 1);
    assert_eq!(doc.keys(), vec![(1, kms.key32_plain.clone())]);

    // A record the daemon encrypts with the aws version decrypts in the InCountry SDK.
    let r = d.post(
        "/v1/keys/prod/DE/encrypt",
        json!({"plaintext": "under the customer's key"}),
    );
    let rec: Encrypted = r.ok(200);
    assert_eq!(rec.version, 1);
    let back: Decrypted = sdk(&doc, &["decrypt", &rec.ciphertext, "1"]);
    assert_eq!(*back.plaintext, "under the customer's key");

    // The daily limit applies to aws versions too.
    let more = kms.data_keys(&kms.cmk_a, 1);
    let r = register(&d, "DE", kms.body(&more[0].0, &kms.cmk_a));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), Code::DailyLimit);

    // A managed key gets an aws version on top: it becomes active, the managed one
    // deprecated, and the key keeps its rotation period (not applied while aws is active).
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    d.advance(86_400);
    let r = register(&d, "FR", kms.body(&more[0].0, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    let doc = d.secrets("prod", "FR");
    assert_eq!(doc.current_version, 2);
    assert_eq!(doc.keys()[1], (2, more[0].1.clone()));
    let show = d.key("prod", "FR");
    assert_eq!(show.versions[0].status, VersionStatus::Deprecated);
    assert_eq!(show.versions[0].rotation_period_months, Some(1));
    assert_eq!(show.versions[1].rotation_period_months, None);

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
    assert_eq!(d.secrets("prod", "AT").keys(), vec![(1, keys[0].1.clone())]);
    let out = d.cli(&["keys", "show", "prod", "AT"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(" aws ") && table.contains("active"),
        "{table}"
    );

    // Restart: the data key is only in memory, so it comes back from KMS before ready.
    let d = d.restart();
    assert_eq!(
        d.secrets("prod", "DE").keys(),
        vec![(1, kms.key32_plain.clone())]
    );
    assert_eq!(d.secrets("prod", "FR").keys()[1].1, more[0].1);
    let health = d.health();
    assert_eq!(health.aws.status, AwsStatus::Ok, "{health:?}");
    assert_eq!(health.aws.versions, 3);
    drop(moto);
}

#[test]
fn refused_registrations_name_the_cause_and_store_nothing() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "15m", "24h", 1);
    let good = kms.body(&kms.key32_blob, &kms.cmk_a);
    // The good registration with one field replaced (a request, built as JSON).
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
    let cases: Vec<(&str, Value, u16, &[Code], &str)> = vec![
        (
            "wrong CMK ARN",
            with("cmk_arn", &kms.cmk_b),
            400,
            &[Code::AwsAccessDenied, Code::AwsIncorrectKey],
            &kms.cmk_b,
        ),
        (
            "CMK that does not exist",
            with("cmk_arn", &missing_cmk),
            400,
            &[Code::AwsKeyNotFound, Code::AwsAccessDenied],
            "does not exist",
        ),
        (
            "garbage ciphertext",
            with("encrypted_key", "bm90IGEgY2lwaGVydGV4dA=="),
            400,
            &[Code::AwsInvalidCiphertext],
            "not a valid KMS ciphertext",
        ),
        (
            "corrupted ciphertext",
            with("encrypted_key", &corrupted),
            400,
            &[Code::AwsInvalidCiphertext],
            "not a valid KMS ciphertext",
        ),
        (
            "16-byte plaintext",
            with("encrypted_key", &kms.key16_blob),
            400,
            &[Code::AwsKeyLength],
            "to 16 bytes",
        ),
        (
            "unknown access key id",
            with("access_key_id", "AKIAAAAAAAAAAAAAAAAA"),
            400,
            &[Code::AwsCredentialsRejected],
            "credentials were refused",
        ),
        (
            "wrong secret key",
            with(
                "secret_access_key",
                "WrongSecretKeyWrongSecretKeyWrongSecret0",
            ),
            400,
            &[Code::AwsCredentialsRejected],
            "credentials were refused",
        ),
        (
            "not base64",
            with("encrypted_key", "%%%"),
            400,
            &[Code::InvalidEncryptedKey],
            "base64",
        ),
        (
            "ARN in another region",
            with("region", "us-west-2"),
            400,
            &[Code::InvalidCmkArn],
            "us-west-2",
        ),
        (
            "rotation period on aws",
            body_of(&CreateKeyRequest {
                rotation_period_days: Some(30),
                ..kms.request(&kms.key32_blob, &kms.cmk_a)
            }),
            400,
            &[Code::InvalidRotationPeriod],
            "aws",
        ),
        (
            "no secret",
            body_of(&CreateKeyRequest {
                secret_access_key: None,
                ..kms.request(&kms.key32_blob, &kms.cmk_a)
            }),
            400,
            &[Code::MissingField],
            "secret_access_key",
        ),
    ];
    for (what, body, status, codes, says) in cases {
        let r = register(&d, "DE", body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let error = r.error().error;
        assert!(
            codes.contains(&error.code),
            "{what}: code {:?} not in {codes:?}: {}",
            error.code,
            r.text()
        );
        let msg = error.message;
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
    assert_eq!(d.keys(), KeyList { keys: vec![] });
    let added: VersionAdded = register(&d, "DE", good).ok(201);
    assert_eq!(added.version, 1);
}

#[test]
fn the_101st_customer_supplied_version_is_refused() {
    needs_test_clock!();
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
    assert_eq!(r.code(), Code::CustomerSuppliedLimit);
    let msg = r.message();
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
    assert_eq!(doc.current_version, 101);
    assert_eq!(doc.secrets.len(), 101);
}
