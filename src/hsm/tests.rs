//! The worker's recovery logic against a fake HSM: lost sessions, reconnects with backoff,
//! panicking jobs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::*;

/// A fake token: `down` makes every call fail as a lost session would, and reconnects fail
/// while it is set.
#[derive(Clone, Default)]
struct Fake {
    down: Arc<AtomicBool>,
    reconnects: Arc<AtomicUsize>,
}

impl Fake {
    fn check(&self) -> Result<(), HsmError> {
        if self.down.load(Ordering::SeqCst) {
            Err(HsmError::Unavailable("token gone".into()))
        } else {
            Ok(())
        }
    }
}

impl Hsm for Fake {
    fn ensure_root_key(&mut self, _: &str, _: bool) -> Result<bool, HsmError> {
        self.check().map(|_| false)
    }
    fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError> {
        self.check()?;
        buf.fill(7);
        Ok(())
    }
    fn seal(&mut self, _: &str, _: &[u8; 12], _: &[u8], p: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.check().map(|_| p.to_vec())
    }
    fn open(
        &mut self,
        _: &str,
        _: &[u8; 12],
        _: &[u8],
        s: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.check().map(|_| Zeroizing::new(s.to_vec()))
    }
    fn ensure_mac_key(&mut self, _: &str, _: bool) -> Result<bool, HsmError> {
        self.check().map(|_| false)
    }
    fn mac(&mut self, _: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError> {
        use sha2::Digest;
        self.check()?;
        Ok(sha2::Sha256::digest(data).into())
    }
    fn read_anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError> {
        self.check().map(|_| Vec::new())
    }
    fn write_anchor(&mut self, _: usize, _: &[u8]) -> Result<(), HsmError> {
        self.check()
    }
    fn ping(&mut self) -> Result<(), HsmError> {
        self.check()
    }
    fn reconnect(&mut self) -> Result<(), HsmError> {
        self.check()?;
        self.reconnects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn start(fake: &Fake) -> (HsmWorker, HsmThread) {
    let f = fake.clone();
    HsmWorker::start(move || Ok(Box::new(f) as Box<dyn Hsm>)).unwrap()
}

fn ping(w: &HsmWorker) -> Result<(), HsmError> {
    w.call_blocking(|h| h.ping())
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_lost_session_is_reconnected_by_the_worker_itself() {
    let fake = Fake::default();
    let (w, _t) = start(&fake);
    assert!(ping(&w).is_ok());
    fake.down.store(true, Ordering::SeqCst);
    assert!(matches!(ping(&w), Err(HsmError::Unavailable(_))));
    assert!(w.status().unavailable.is_some());
    // While the token is away, calls fail fast and reconnects keep being tried.
    assert!(matches!(ping(&w), Err(HsmError::Unavailable(_))));
    assert_eq!(fake.reconnects.load(Ordering::SeqCst), 0);
    fake.down.store(false, Ordering::SeqCst);
    // No call needed: the worker reconnects on its own schedule.
    wait_for("a reconnect", || w.status().unavailable.is_none());
    assert_eq!(fake.reconnects.load(Ordering::SeqCst), 1);
    assert_eq!(w.status().reconnects, 1);
    assert!(ping(&w).is_ok());
}

#[test]
fn errors_that_are_not_a_lost_session_keep_it() {
    let fake = Fake::default();
    let (w, _t) = start(&fake);
    let r: Result<(), _> = w.call_blocking(|_| Err(HsmError::Integrity));
    assert!(matches!(r, Err(HsmError::Integrity)));
    let r: Result<(), _> = w.call_blocking(|_| Err(HsmError::RootKeyMissing("x".into())));
    assert!(matches!(r, Err(HsmError::RootKeyMissing(_))));
    assert!(w.status().unavailable.is_none());
    assert!(ping(&w).is_ok());
    assert_eq!(fake.reconnects.load(Ordering::SeqCst), 0);
}

#[test]
fn a_panicking_job_is_caught_and_the_worker_goes_on() {
    let fake = Fake::default();
    let (w, _t) = start(&fake);
    let r: Result<(), HsmError> = w.call_blocking(|_| panic!("job bug"));
    assert!(matches!(r, Err(HsmError::Unavailable(_))));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(w.alive()), "the worker still takes jobs");
    // The session's state after a panic is unknown: it is opened again.
    wait_for("a reconnect", || w.status().unavailable.is_none());
    assert_eq!(fake.reconnects.load(Ordering::SeqCst), 1);
    assert!(ping(&w).is_ok());
}

#[test]
fn the_watchdog_probe_answers_while_the_hsm_is_away() {
    let fake = Fake::default();
    let (w, _t) = start(&fake);
    fake.down.store(true, Ordering::SeqCst);
    assert!(ping(&w).is_err());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(w.alive()));
}
