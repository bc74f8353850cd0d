//! Registrations: served as the current version with the key KMS decrypts, refused with
//! their cause (nothing stored), and the 101st customer-supplied version refused.

use harness::moto::Moto;
use harness::{needs_test_clock, sdk};
use serde_json::{json, Value};

use crate::{b64, register, secrets_map, start, Kms};

#[test]
fn register_serves_as_current_with_kms_plaintext() {
    needs_test_clock!();
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
