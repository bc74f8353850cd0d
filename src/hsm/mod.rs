//! The HSM behind a small synchronous trait, and the worker thread that owns it.
//!
//! PKCS#11 modules (SoftHSM in particular) are not safe for arbitrary concurrent use and
//! their calls block, so no PKCS#11 call runs on the async runtime: one dedicated thread
//! owns the backend (and with it the logged-in session) and runs jobs sent to it.

// Test doubles: in unit tests, and for the in-process integration tests (test builds only).
#[cfg(any(test, feature = "test-clock"))]
pub mod fake;
mod open;
mod pkcs11;
mod softhsm;

pub use open::{open, open_with, read_pin};
pub use pkcs11::Pkcs11Hsm;

use crate::domain::Code;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use zeroize::Zeroizing;

pub use crate::domain::secret::WRAP_IV_LEN;

pub use crate::domain::audit::MAC_LEN;
use crate::domain::error::Error;

/// Number of anchor slots: writes alternate between them, so a write cut short by a kill
/// spoils at most one, and the other still holds the anchor before it.
pub const ANCHOR_SLOTS: usize = 2;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    /// The session, the login or the token is gone (or the worker has not got them back
    /// yet): retry later; the worker reconnects by itself.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// A root key the state refers to is not on the token (confirmed on a fresh session).
    #[error("root key `{0}` is missing from the HSM token")]
    RootKeyMissing(String),
    /// More than one object carries a root key's label: refuse to guess which.
    #[error("{0} objects on the HSM token carry the root key label `{1}`; remove the extra ones")]
    DuplicateRootKey(usize, String),
    /// A GCM tag check failed: the wrapped data was altered or belongs elsewhere.
    #[error("authentication tag check failed")]
    Integrity,
    /// The HSM refused the call's arguments (a bug on our side, not a lost session).
    #[error("HSM refused the request: {0}")]
    Rejected(String),
    /// Opening the module, finding the token or logging in failed.
    #[error("{0}")]
    Setup(String),
}

impl HsmError {
    /// Whether the session should be thrown away and opened again.
    fn session_lost(&self) -> bool {
        matches!(self, HsmError::Unavailable(_) | HsmError::Setup(_))
    }
}

/// What the daemon needs from an HSM. Root keys are named by label; they never leave it.
pub trait Hsm: Send {
    /// Finds the root key with this label; creates it when absent and `create` is set.
    /// Returns whether it was created.
    fn ensure_root_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError>;
    /// Fills `buf` from the HSM's random number generator.
    fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError>;
    /// AES-256-GCM encryption under a root key; returns ciphertext ‖ tag.
    fn seal(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError>;
    /// The reverse of `seal`; a failed tag check is `HsmError::Integrity`.
    fn open(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError>;
    /// Finds the MAC key (HMAC-SHA256, never extractable) with this label; creates it when
    /// absent and `create` is set. Returns whether it was created.
    fn ensure_mac_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError>;
    /// HMAC-SHA256 of `data` in the HSM under the MAC key with this label, which must exist.
    fn mac(&mut self, label: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError>;
    /// The values of the anchor objects found (each slot's, in no order; a slot whose
    /// object cannot be read contributes nothing). Their contents are the caller's.
    fn read_anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError>;
    /// Stores `bytes` as anchor slot `slot` (`< ANCHOR_SLOTS`): a kill meanwhile may spoil
    /// this slot, never the other.
    fn write_anchor(&mut self, slot: usize, bytes: &[u8]) -> Result<(), HsmError>;
    /// A call that proves the session, the login and the token still hold.
    fn ping(&mut self) -> Result<(), HsmError>;
    /// Throws the session away and opens a new one (re-initializing the module if needed),
    /// logging in again.
    fn reconnect(&mut self) -> Result<(), HsmError>;
}

/// Whether the worker holds a working session, as health shows it.
#[derive(Debug, Clone, Default)]
pub struct HsmStatus {
    /// `None`: connected. `Some(reason)`: the last failure, while reconnecting.
    pub unavailable: Option<String>,
    /// Reconnects that succeeded since start.
    pub reconnects: u64,
}

/// How a job left the session.
enum Verdict {
    Fine,
    Lost(String),
}

/// A job gets the HSM (or why there is none) and the status, which it marks before it
/// answers, so a caller that saw a lost session also sees health say so.
type Job = Box<dyn FnOnce(Result<&mut dyn Hsm, HsmError>, &Mutex<HsmStatus>) -> Verdict + Send>;

/// Reconnect attempts: soon after a fault, then backing off so a dead HSM is not hammered;
/// capped so a recovered HSM is back within a few seconds.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(3);

/// The HSM worker thread, to wait for at exit.
pub struct HsmThread(std::thread::JoinHandle<()>);

impl HsmThread {
    /// Waits (at most `limit`) for the thread to close the session and finalize the module,
    /// which it does once every `HsmWorker` handle is gone.
    pub fn wait(self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.0.is_finished() {
            if Instant::now() > deadline {
                tracing::warn!("HSM worker still busy at exit; not waiting longer");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.join();
    }
}

/// Handle to the dedicated HSM thread. Cloning shares the thread.
#[derive(Clone)]
pub struct HsmWorker {
    jobs: mpsc::Sender<Job>,
    errors: Counter,
    status: Arc<Mutex<HsmStatus>>,
}

impl HsmWorker {
    /// Starts the worker thread and opens the backend on it; returns once the backend is
    /// open, or with the error that stopped it. The thread closes the session and finalizes
    /// the module when the last handle is dropped; `HsmThread::wait` lets the process wait
    /// for that before it exits (a module's own exit-time destructors must not race it).
    pub fn start<F>(open: F) -> Result<(HsmWorker, HsmThread), HsmError>
    where
        F: FnOnce() -> Result<Box<dyn Hsm>, HsmError> + Send + 'static,
    {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let status = Arc::new(Mutex::new(HsmStatus::default()));
        let thread_status = status.clone();
        let thread = std::thread::Builder::new()
            .name("hsm-worker".into())
            .spawn(move || {
                let hsm = match open() {
                    Ok(hsm) => {
                        let _ = ready_tx.send(Ok(()));
                        hsm
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                work(hsm, &queue, &thread_status);
            })
            .map_err(|e| HsmError::Setup(format!("cannot start HSM worker thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| HsmError::Setup("HSM worker thread ended during start".into()))??;
        Ok((
            HsmWorker {
                jobs,
                errors: Counter::default(),
                status,
            },
            HsmThread(thread),
        ))
    }

    /// Counts HSM operations that returned an error (for metrics).
    pub fn error_counter(&self) -> Counter {
        self.errors.clone()
    }

    /// Whether the worker holds a working session now.
    pub fn status(&self) -> HsmStatus {
        lock(&self.status).clone()
    }

    fn count<T>(&self, r: Result<T, HsmError>) -> Result<T, HsmError> {
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// Wraps `f` into a job that reports its result on `tx` and tells the worker whether
    /// the session survived it.
    fn job<T, F>(f: F, tx: impl FnOnce(Result<T, HsmError>) + Send + 'static) -> Job
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        Box::new(move |hsm, status| {
            let result = hsm.and_then(f);
            let verdict = match &result {
                Err(e) if e.session_lost() => {
                    lock(status).unavailable = Some(e.to_string());
                    Verdict::Lost(e.to_string())
                }
                _ => Verdict::Fine,
            };
            tx(result);
            verdict
        })
    }

    fn stopped() -> HsmError {
        HsmError::Unavailable("HSM worker thread has stopped".into())
    }

    /// Runs `f` on the HSM thread and awaits its result without blocking the runtime.
    pub async fn call<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Self::job(f, move |r| {
                let _ = tx.send(r);
            }))
            .map_err(|_| Self::stopped())?;
        self.count(
            rx.await
                .map_err(|_| HsmError::Unavailable("an HSM job failed; see the log".into()))
                .and_then(|r| r),
        )
    }

    /// Runs `f` on the HSM thread from synchronous code (start-up, offline tools).
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Self::job(f, move |r| {
                let _ = tx.send(r);
            }))
            .map_err(|_| Self::stopped())?;
        self.count(
            rx.recv()
                .map_err(|_| HsmError::Unavailable("an HSM job failed; see the log".into()))
                .and_then(|r| r),
        )
    }

    /// Answers once the worker thread takes jobs, whether or not the HSM is reachable: the
    /// watchdog's proof that no PKCS#11 call hangs and the thread is alive.
    pub async fn alive(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.jobs.send(Box::new(move |_, _| {
            let _ = tx.send(());
            Verdict::Fine
        }));
        sent.is_ok() && rx.await.is_ok()
    }
}

fn lock(status: &Mutex<HsmStatus>) -> std::sync::MutexGuard<'_, HsmStatus> {
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The worker loop: runs jobs in order; when a job reports the session lost, answers
/// further jobs with `Unavailable` and reconnects with backoff until it holds again. A job
/// that panics is logged and treated as a lost session (its state is unknown). Ends when
/// every `HsmWorker` handle is dropped.
fn work(mut hsm: Box<dyn Hsm>, queue: &mpsc::Receiver<Job>, status: &Mutex<HsmStatus>) {
    // `Some((due, backoff))` while disconnected.
    let mut reconnect: Option<(Instant, Duration)> = None;
    loop {
        let job = match reconnect {
            None => match queue.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
            Some((due, _)) => {
                match queue.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        if let Some((due, backoff)) = reconnect {
            if Instant::now() >= due {
                reconnect = try_reconnect(hsm.as_mut(), backoff, status);
            }
        }
        let Some(job) = job else { continue };
        let input = match reconnect {
            // The cast shortens the trait object's lifetime to this call.
            None => Ok(hsm.as_mut() as &mut dyn Hsm),
            Some(_) => Err(HsmError::Unavailable(
                lock(status)
                    .unavailable
                    .clone()
                    .unwrap_or_else(|| "reconnecting".into()),
            )),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(input, status)));
        let lost = match outcome {
            Ok(Verdict::Fine) => None,
            Ok(Verdict::Lost(reason)) => Some(reason),
            Err(_) => {
                tracing::error!("an HSM job panicked; reopening the HSM session");
                Some("an HSM job panicked".to_string())
            }
        };
        if let (Some(reason), None) = (lost, reconnect) {
            tracing::error!(
                reason,
                "HSM session lost: changes get 503 hsm_unavailable until it is back; loaded keys keep serving"
            );
            lock(status).unavailable = Some(reason);
            reconnect = Some((Instant::now(), RECONNECT_FIRST));
        }
    }
}

/// One reconnect attempt; returns the next schedule, or `None` once connected.
fn try_reconnect(
    hsm: &mut dyn Hsm,
    backoff: Duration,
    status: &Mutex<HsmStatus>,
) -> Option<(Instant, Duration)> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hsm.reconnect()))
        .unwrap_or_else(|_| Err(HsmError::Unavailable("reconnect panicked".into())));
    match result {
        Ok(()) => {
            let mut s = lock(status);
            s.unavailable = None;
            s.reconnects += 1;
            tracing::info!("HSM session re-opened and logged in again");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "HSM reconnect failed");
            lock(status).unavailable = Some(e.to_string());
            Some((Instant::now() + backoff, (backoff * 2).min(RECONNECT_MAX)))
        }
    }
}

/// What an HSM failure means to the caller: retry (unavailable), page someone (integrity).
impl From<HsmError> for Error {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::Unavailable(_) | HsmError::Setup(_) => {
                Error::unavailable(Code::HsmUnavailable, e)
            }
            HsmError::RootKeyMissing(_) => Error::unavailable(Code::RootKeyMissing, e),
            HsmError::DuplicateRootKey(..) => Error::conflict(Code::DuplicateRootKey, e),
            HsmError::Integrity => Error::integrity(e),
            HsmError::Rejected(_) => Error::internal(e),
        }
    }
}

#[cfg(test)]
mod tests;
