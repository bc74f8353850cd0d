//! moto's KMS server on 127.0.0.1 (tests/aws/moto_server.py), set up and driven with boto3
//! (tests/aws/kms_tool.py).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{moto_python, repo};

/// moto's server on a free loopback port; killed on drop.
pub struct Moto {
    child: Option<Child>,
    pub url: String,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts the server and waits until it listens.
    pub fn start() -> Moto {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Kills the server (a KMS outage).
    pub fn stop(&mut self) {
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

/// What `kms_tool.py setup URL` prints: an IAM user's access key, two CMKs, and a 32-byte
/// and a 16-byte data key under the first.
#[derive(Deserialize)]
pub struct KmsSetup {
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub cmk_a: String,
    pub cmk_b: String,
    pub key32: DataKey,
    pub key16: DataKey,
}

/// A data key KMS generated: its ciphertext blob and its plaintext, both base64.
#[derive(Deserialize)]
pub struct DataKey {
    pub blob: String,
    pub plaintext: String,
}

/// Runs tests/aws/kms_tool.py; returns what it printed (JSON), read as `T`
/// (`serde::de::IgnoredAny` when nothing of it is needed).
pub fn kms_tool<T: DeserializeOwned>(args: &[&str]) -> T {
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
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kms_tool {:?} printed: {e}: {}",
            args[0],
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
