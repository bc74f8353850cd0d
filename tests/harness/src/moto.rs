//! moto's KMS server on 127.0.0.1 (tests/aws/moto_server.py), set up and driven with boto3
//! (tests/aws/kms_tool.py).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// Runs tests/aws/kms_tool.py; returns what it printed (JSON).
pub fn kms_tool(args: &[&str]) -> Value {
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
