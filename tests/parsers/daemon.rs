//! The daemon in this process: the real `api::serve`, `Keyring`, `Verifier` and SQLite
//! `Store`, with the crate's in-memory HSM (`hsm::fake`), a KMS that accepts everything and a clock that
//! only moves when a test moves it, on a Unix socket in a temp dir. Requests go through
//! the harness (the crate's own client); a raw socket only for header bytes no client sends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use time::OffsetDateTime;
use zeroize::Zeroizing;

pub use harness::Reply;
use harness::{raw, request, Secrets};
use incountry_keyd::api::App;
use incountry_keyd::api::{self, Peer, Role};
use incountry_keyd::config::Config;
use incountry_keyd::domain::clock::ManualClock;
use incountry_keyd::hsm::fake::FakeHsm;
use incountry_keyd::keyring::Keyring;
use incountry_keyd::kms::{AwsKeyRef, DecryptFuture, KmsDecrypt};
use incountry_keyd::proto::KeyDocument;
use incountry_keyd::store;
use incountry_keyd::verify::Verifier;

/// A KMS that decrypts every registration to the same 32 bytes.
struct AcceptingKms;

impl KmsDecrypt for AcceptingKms {
    fn decrypt<'a>(&'a self, _key: &'a AwsKeyRef) -> DecryptFuture<'a> {
        Box::pin(async { Ok(Zeroizing::new(vec![0x5a; 32])) })
    }
}

/// The daemon in this process.
pub struct InProcess {
    socket: PathBuf,
    pub app: Arc<App>,
    pub clock: Arc<ManualClock>,
    pub runtime: tokio::runtime::Runtime,
    /// Serializes the tests that move the clock or count wrong codes.
    exclusive: Mutex<()>,
}

/// Removes `dir` when the process exits: the daemons live in statics, which are never
/// dropped, so a `TempDir` guard would never run.
fn remove_at_exit(dir: PathBuf) {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn clean() {
        let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner()));
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
    // SAFETY: `clean` is a plain function that neither unwinds nor calls exit.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean);
    });
}

impl InProcess {
    pub fn start(verification: &str) -> InProcess {
        // Under the target's scratch dir (what a killed run leaves stays there).
        let dir = tempfile::Builder::new()
            .prefix("parsers-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        remove_at_exit(dir.clone());
        let socket = dir.join("keyd.sock");
        let uid = nix::unistd::getuid().as_raw();
        let config = Config::parse(&format!(
            "version = 1\n\
             [server]\nsocket = {socket:?}\n\
             [access]\nadmins = [\"uid:{uid}\"]\n\
             [limits]\nversions_per_day = 1000\n\
             [verification]\nmode = \"{verification}\"\n"
        ))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // A fixed, whole-minute start: TOTP steps line up with the clock's moves.
        let start = OffsetDateTime::now_utc().unix_timestamp() / 60 * 60;
        // Time that moves only when a test moves it (TOTP windows must not shift mid-case).
        let clock = Arc::new(ManualClock::at(start));
        let (hsm, hsm_thread) = FakeHsm::default().start();
        // The worker ends with the process.
        std::mem::forget(hsm_thread);
        let store = store::open(&dir.join("state")).unwrap();
        let app = runtime.block_on(async {
            let keyring = Keyring::load(
                store.clone(),
                hsm.clone(),
                clock.clone(),
                Arc::new(AcceptingKms),
            )
            .await
            .unwrap();
            let verifier = Verifier::new(config.verification.mode, store, hsm, clock.clone());
            Arc::new(App::new(keyring, config, verifier).unwrap())
        });
        let listener = {
            let _rt = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        runtime.spawn(api::serve(
            app.clone(),
            listener,
            std::future::pending::<()>(),
        ));
        InProcess {
            socket,
            app,
            clock,
            runtime,
            exclusive: Mutex::new(()),
        }
    }

    pub fn exclusive(&self) -> MutexGuard<'_, ()> {
        self.exclusive.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now(&self) -> i64 {
        self.clock.unix()
    }

    /// One request with `body` as it is. A connection closed without an answer (what a
    /// panicking handler leaves) fails the caller.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        request(&self.socket, method, path, &[], body)
    }

    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        request(&self.socket, method, path, headers, body)
    }

    /// One request with a header whose value is any bytes (NUL, obs-text, ...), which no
    /// HTTP client sends: written on a raw socket.
    pub fn request_raw_header(
        &self,
        method: &str,
        path: &str,
        (name, value): (&str, &[u8]),
        body: &[u8],
    ) -> Reply {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n{name}: ",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body);
        let answer = raw::exchange(&self.socket, &req, Duration::from_secs(30));
        raw::parse(&answer).unwrap_or_else(|e| {
            panic!("no answer to {method} {path} (connection dropped: a panic?): {e}")
        })
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, body.to_string().as_bytes())
    }

    /// Creates an incountry-managed key with a 30-day period at `path` (/v1/keys/{env}/{c}).
    pub fn create_managed(&self, path: &str) {
        self.post(
            path,
            &json!({"type": "incountry-managed", "rotation_period_days": 30}),
        )
        .assert_status(201);
    }

    /// The key document at `path`, for what a change wrote.
    pub fn key_doc(&self, path: &str) -> KeyDocument {
        self.request("GET", path, b"").ok(200)
    }

    /// The data keys of a key, by version, from its secrets document.
    pub fn data_keys(&self, env: &str, country: &str) -> HashMap<u32, [u8; 32]> {
        let r = self.request("GET", &format!("/v1/keys/{env}/{country}/secrets"), b"");
        r.assert_status(200);
        Secrets::parse(r.body)
            .secrets
            .iter()
            .map(|s| {
                let key = STANDARD.decode(s.secret.as_bytes()).unwrap();
                (s.version, key.try_into().unwrap())
            })
            .collect()
    }
}

/// Verification off: the body tests.
pub fn open_daemon() -> &'static InProcess {
    static D: OnceLock<InProcess> = OnceLock::new();
    D.get_or_init(|| InProcess::start("off"))
}

/// A fresh environment name per call, so that creates never meet an existing key.
pub fn fresh_env(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::SeqCst))
}

/// This process as the daemon sees it over the socket.
pub fn me() -> Peer {
    Peer {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        pid: None,
        groups: vec![],
        role: Role::Admin,
    }
}

/// `sent -> status answer`, for failure messages.
pub fn after(r: &Reply, sent: &[u8]) -> String {
    format!(
        "{:?} -> {} {}",
        String::from_utf8_lossy(sent),
        r.status,
        String::from_utf8_lossy(&r.body)
    )
}
