//! Customer-supplied (aws) keys against a real KMS API: moto's server on 127.0.0.1, started
//! by each test (harness::moto), set up with boto3 (tests/aws/kms_tool.py).
//!
//! - `register`: registrations served, refused with their cause, and the 101st refused;
//! - `revalidation`: a revoked CMK, a KMS outage past `max_stale`;
//! - `state`: what the state keeps (never the IAM secret or the key) and what binds it.

mod register;
mod revalidation;
mod state;

use std::time::{Duration, Instant};

use harness::moto::{kms_tool, DataKey, KmsSetup, Moto};
use harness::{Daemon, Options, Reply};
use incountry_keyd::domain::VersionStatus;
use incountry_keyd::proto::CreateKeyRequest;
use serde::de::IgnoredAny;
use serde_json::Value;
use zeroize::Zeroizing;

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

impl Kms {
    fn setup(moto: &Moto) -> Kms {
        let v: KmsSetup = kms_tool(&["setup", &moto.url]);
        Kms {
            url: moto.url.clone(),
            region: v.region,
            access_key_id: v.access_key_id,
            secret: v.secret_access_key,
            cmk_a: v.cmk_a,
            cmk_b: v.cmk_b,
            key32_blob: v.key32.blob,
            key32_plain: v.key32.plaintext,
            key16_blob: v.key16.blob,
        }
    }

    /// Changes the CMK's state: disable, enable, schedule-deletion, cancel-deletion.
    fn key_state(&self, action: &str, cmk: &str) {
        kms_tool::<IgnoredAny>(&[action, &self.url, &self.access_key_id, &self.secret, cmk]);
    }

    /// More 32-byte data keys under `cmk`: (blob, plaintext), both base64.
    fn data_keys(&self, cmk: &str, n: usize) -> Vec<(String, String)> {
        let v: Vec<DataKey> = kms_tool(&[
            "datakeys",
            &self.url,
            &self.access_key_id,
            &self.secret,
            cmk,
            &n.to_string(),
        ]);
        v.into_iter().map(|k| (k.blob, k.plaintext)).collect()
    }

    /// The registration of `blob` under `cmk` with this IAM user.
    fn request(&self, blob: &str, cmk: &str) -> CreateKeyRequest {
        CreateKeyRequest {
            kind: "aws".into(),
            rotation_period_days: None,
            region: Some(self.region.clone()),
            encrypted_key: Some(blob.into()),
            cmk_arn: Some(cmk.into()),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(Zeroizing::new(self.secret.clone())),
        }
    }

    fn body(&self, blob: &str, cmk: &str) -> Value {
        body_of(&self.request(blob, cmk))
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

/// A request as the body to send.
fn body_of(request: &CreateKeyRequest) -> Value {
    serde_json::to_value(request).unwrap()
}

fn status_of(d: &Daemon, country: &str, version: usize) -> VersionStatus {
    d.versions("prod", country)[version - 1].status
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
