//! An HSM in memory for unit tests: AES-256-GCM root keys by label (the caller's IV and AAD,
//! as `Pkcs11Hsm` uses them: a blob opened under another AAD or root key is
//! `HsmError::Integrity`), HMAC-SHA256 MAC keys, the anchor slots, and switches that make
//! it fail the way a token does. Clones share one token, so a test keeps a handle to the
//! token a worker owns, and a new worker over a clone is a restart.

// A test double (unit tests, test-clock builds): a broken test setup may panic.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Hsm, HsmError, HsmThread, HsmWorker, ANCHOR_SLOTS, MAC_LEN, WRAP_IV_LEN};

#[derive(Default)]
struct Token {
    roots: HashMap<String, [u8; 32]>,
    /// Root keys that look absent (a token whose key was deleted).
    hidden: HashSet<String>,
    macs: HashMap<String, [u8; 32]>,
    anchors: [Option<Vec<u8>>; ANCHOR_SLOTS],
    /// Every call (and reconnects) fails as a lost session does.
    down: bool,
    /// `open` calls per root key label.
    opens: HashMap<String, usize>,
    reconnects: usize,
}

/// Calls wait while the gate is held (to hold a change half-way through its HSM job).
#[derive(Default)]
struct Gate {
    held: bool,
    waiting: usize,
}

#[derive(Clone, Default)]
pub struct FakeHsm {
    token: Arc<Mutex<Token>>,
    gate: Arc<(Mutex<Gate>, Condvar)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeHsm {
    /// A worker thread over this token, as `HsmWorker::start` runs the real one.
    pub fn start(&self) -> (HsmWorker, HsmThread) {
        let hsm = self.clone();
        HsmWorker::start(move || Ok(Box::new(hsm) as Box<dyn Hsm>)).expect("fake HSM starts")
    }

    /// Every call fails with `Unavailable` (and so do reconnects) while `down`.
    pub fn set_down(&self, down: bool) {
        lock(&self.token).down = down;
    }

    /// Makes the root key `label` look absent (`RootKeyMissing`), or present again.
    pub fn hide_root(&self, label: &str, hidden: bool) {
        let mut t = lock(&self.token);
        if hidden {
            t.hidden.insert(label.to_string());
        } else {
            t.hidden.remove(label);
        }
    }

    pub fn has_root(&self, label: &str) -> bool {
        let t = lock(&self.token);
        t.roots.contains_key(label) && !t.hidden.contains(label)
    }

    /// How many times `open` ran under the root key `label`.
    pub fn opens(&self, label: &str) -> usize {
        lock(&self.token).opens.get(label).copied().unwrap_or(0)
    }

    pub fn reconnects(&self) -> usize {
        lock(&self.token).reconnects
    }

    /// Calls from now on wait until `release`.
    pub fn hold(&self) {
        lock(&self.gate.0).held = true;
    }

    pub fn release(&self) {
        lock(&self.gate.0).held = false;
        self.gate.1.notify_all();
    }

    /// Calls waiting at the held gate.
    pub fn waiting(&self) -> usize {
        lock(&self.gate.0).waiting
    }

    /// Waits at the gate, then answers the failure switches; the token for the call.
    fn enter(&self) -> Result<MutexGuard<'_, Token>, HsmError> {
        let (gate, opened) = &*self.gate;
        let mut g = lock(gate);
        if g.held {
            g.waiting += 1;
            while g.held {
                g = opened.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.waiting -= 1;
        }
        drop(g);
        let t = lock(&self.token);
        if t.down {
            return Err(HsmError::Unavailable("fake token is down".into()));
        }
        Ok(t)
    }
}

impl Token {
    fn root(&self, label: &str) -> Result<Aes256Gcm, HsmError> {
        match self.roots.get(label) {
            Some(key) if !self.hidden.contains(label) => Ok(Aes256Gcm::new(key.into())),
            _ => Err(HsmError::RootKeyMissing(label.to_string())),
        }
    }
}

fn fresh_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    key
}

/// HMAC-SHA256 (RFC 2104) for keys of at most one block, which is all the fake makes.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    assert!(key.len() <= 64, "the fake's MAC keys fit one block");
    let (mut ipad, mut opad) = ([0x36u8; 64], [0x5cu8; 64]);
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(data)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

impl Hsm for FakeHsm {
    fn ensure_root_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        let mut t = self.enter()?;
        if t.root(label).is_ok() {
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        t.hidden.remove(label);
        t.roots.insert(label.to_string(), fresh_key());
        Ok(true)
    }

    fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError> {
        drop(self.enter()?);
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
        let t = self.enter()?;
        let msg = Payload {
            msg: plaintext,
            aad,
        };
        t.root(label)?
            .encrypt(Nonce::from_slice(iv), msg)
            .map_err(|_| HsmError::Rejected("AES-GCM encryption failed".into()))
    }

    fn open(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut t = self.enter()?;
        *t.opens.entry(label.to_string()).or_default() += 1;
        let msg = Payload { msg: sealed, aad };
        t.root(label)?
            .decrypt(Nonce::from_slice(iv), msg)
            .map(Zeroizing::new)
            .map_err(|_| HsmError::Integrity)
    }

    fn ensure_mac_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        let mut t = self.enter()?;
        if t.macs.contains_key(label) {
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        t.macs.insert(label.to_string(), fresh_key());
        Ok(true)
    }

    fn mac(&mut self, label: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError> {
        let t = self.enter()?;
        let key = t
            .macs
            .get(label)
            .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
        Ok(hmac_sha256(key, data))
    }

    fn read_anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError> {
        Ok(self.enter()?.anchors.iter().flatten().cloned().collect())
    }

    fn write_anchor(&mut self, slot: usize, bytes: &[u8]) -> Result<(), HsmError> {
        let mut t = self.enter()?;
        let anchor = t
            .anchors
            .get_mut(slot)
            .ok_or_else(|| HsmError::Rejected(format!("no anchor slot {slot}")))?;
        *anchor = Some(bytes.to_vec());
        Ok(())
    }

    fn ping(&mut self) -> Result<(), HsmError> {
        self.enter().map(drop)
    }

    fn reconnect(&mut self) -> Result<(), HsmError> {
        let mut t = lock(&self.token);
        if t.down {
            return Err(HsmError::Unavailable("fake token is down".into()));
        }
        t.reconnects += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_rfc_4231() {
        // RFC 4231, test case 2.
        let tag = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_blob_opens_only_under_its_own_root_key_iv_and_aad() {
        let mut h = FakeHsm::default();
        assert!(h.ensure_root_key("a", true).unwrap());
        assert!(!h.ensure_root_key("a", true).unwrap());
        h.ensure_root_key("b", true).unwrap();
        let iv = [3u8; WRAP_IV_LEN];
        let sealed = h.seal("a", &iv, b"aad-1", b"secret").unwrap();
        assert_eq!(
            h.open("a", &iv, b"aad-1", &sealed).unwrap().as_slice(),
            b"secret"
        );
        for (label, iv, aad) in [
            ("a", iv, &b"aad-2"[..]),
            ("b", iv, &b"aad-1"[..]),
            ("a", [4u8; WRAP_IV_LEN], &b"aad-1"[..]),
        ] {
            assert!(matches!(
                h.open(label, &iv, aad, &sealed),
                Err(HsmError::Integrity)
            ));
        }
        assert!(matches!(
            h.open("a", &iv, b"aad-1", &sealed[..10]),
            Err(HsmError::Integrity)
        ));
        h.hide_root("a", true);
        assert!(matches!(
            h.open("a", &iv, b"aad-1", &sealed),
            Err(HsmError::RootKeyMissing(_))
        ));
        assert!(matches!(
            h.ensure_root_key("a", false),
            Err(HsmError::RootKeyMissing(_))
        ));
        h.hide_root("a", false);
        assert!(h.open("a", &iv, b"aad-1", &sealed).is_ok());
        assert_eq!(h.opens("a"), 6);
    }
}
