//! The daemon in this process: the real `api::serve`, `Keyring`, `Verifier` and SQLite
//! `Store`, with an in-memory AES-GCM HSM, a KMS that accepts everything and a clock that
//! only moves when a test moves it, on a Unix socket in a temp dir. Requests go through
//! the harness (the crate's own client); a raw socket only for header bytes no client sends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
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
use incountry_keyd::domain::clock::Clock;
use incountry_keyd::hsm::{Hsm, HsmError, HsmWorker, MAC_LEN, WRAP_IV_LEN};
use incountry_keyd::keyring::Keyring;
use incountry_keyd::kms::{AwsKeyRef, DecryptFuture, KmsDecrypt};
use incountry_keyd::proto::KeyDocument;
use incountry_keyd::store;
use incountry_keyd::verify::Verifier;

/// AES-256-GCM root keys, MAC keys and anchor slots in memory, with the `Hsm` trait's
/// error semantics.
#[derive(Default)]
struct MemoryHsm {
    roots: HashMap<String, [u8; 32]>,
    macs: HashMap<String, [u8; 32]>,
    anchors: HashMap<usize, Vec<u8>>,
}

impl MemoryHsm {
    fn cipher(&self, label: &str) -> Result<Aes256Gcm, HsmError> {
        let key = self
            .roots
            .get(label)
            .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
        Ok(Aes256Gcm::new(key.into()))
    }
}

impl Hsm for MemoryHsm {
    fn ensure_root_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        if self.roots.contains_key(label) {
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        self.roots.insert(label.to_string(), key);
        Ok(true)
    }

    fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError> {
        OsRng.fill_bytes(buf);
        Ok(())
    }

    fn seal(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.cipher(label)?
            .encrypt(
                Nonce::from_slice(iv),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| HsmError::Unavailable("seal".into()))
    }

    fn open(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.cipher(label)?
            .decrypt(Nonce::from_slice(iv), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| HsmError::Integrity)
    }

    fn ensure_mac_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        if self.macs.contains_key(label) {
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        self.macs.insert(label.to_string(), key);
        Ok(true)
    }

    /// A keyed SHA-256 (not HMAC: a stand-in with the same interface).
    fn mac(&mut self, label: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError> {
        use sha2::Digest;
        let key = self
            .macs
            .get(label)
            .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
        let mut h = sha2::Sha256::new();
        h.update(key);
        h.update(data);
        Ok(h.finalize().into())
    }

    fn read_anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError> {
        Ok(self.anchors.values().cloned().collect())
    }

    fn write_anchor(&mut self, slot: usize, bytes: &[u8]) -> Result<(), HsmError> {
        self.anchors.insert(slot, bytes.to_vec());
        Ok(())
    }

    fn ping(&mut self) -> Result<(), HsmError> {
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), HsmError> {
        Ok(())
    }
}

/// A KMS that decrypts every registration to the same 32 bytes.
struct AcceptingKms;

impl KmsDecrypt for AcceptingKms {
    fn decrypt<'a>(&'a self, _key: &'a AwsKeyRef) -> DecryptFuture<'a> {
        Box::pin(async { Ok(Zeroizing::new(vec![0x5a; 32])) })
    }
}

/// Time that moves only when a test moves it (TOTP windows must not shift mid-case).
pub struct ManualClock {
    unix: AtomicI64,
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.unix.load(Ordering::SeqCst)).unwrap()
    }
    fn advance(&self, seconds: i64) -> bool {
        self.unix.fetch_add(seconds, Ordering::SeqCst);
        true
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
        let clock = Arc::new(ManualClock {
            unix: AtomicI64::new(start),
        });
        let (hsm, hsm_thread) =
            HsmWorker::start(|| Ok(Box::new(MemoryHsm::default()) as Box<dyn Hsm>)).unwrap();
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
        self.clock.unix.load(Ordering::SeqCst)
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
