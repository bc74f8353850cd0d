//! The HSM behind a small synchronous trait, and the worker thread that owns it.
//!
//! PKCS#11 modules (SoftHSM in particular) are not safe for arbitrary concurrent use and
//! their calls block, so no PKCS#11 call runs on the async runtime: one dedicated thread
//! owns the backend (and with it the logged-in session) and runs jobs sent to it.

mod pkcs11;

pub use pkcs11::Pkcs11Hsm;

use std::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use zeroize::Zeroizing;

/// Length of the GCM IV used to wrap data keys (the daemon supplies it: SoftHSM cannot).
pub const WRAP_IV_LEN: usize = 12;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    /// The HSM did not answer as it should (session lost, device error): retry later.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// A root key the state refers to is not on the token.
    #[error("root key `{0}` is missing from the HSM token")]
    RootKeyMissing(String),
    /// More than one object carries a root key's label: refuse to guess which.
    #[error("{0} objects on the HSM token carry the root key label `{1}`; remove the extra ones")]
    DuplicateRootKey(usize, String),
    /// A GCM tag check failed: the wrapped data was altered or belongs elsewhere.
    #[error("authentication tag check failed")]
    Integrity,
    /// Opening the module, finding the token or logging in failed.
    #[error("{0}")]
    Setup(String),
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
    /// A cheap call that proves the session and login still hold.
    fn ping(&mut self) -> Result<(), HsmError>;
}

type Job = Box<dyn FnOnce(&mut dyn Hsm) + Send>;

/// The HSM worker thread, to wait for at exit.
pub struct HsmThread(std::thread::JoinHandle<()>);

impl HsmThread {
    /// Waits (at most `limit`) for the thread to close the session and finalize the module,
    /// which it does once every `HsmWorker` handle is gone.
    pub fn wait(self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.0.is_finished() {
            if std::time::Instant::now() > deadline {
                tracing::warn!("HSM worker still busy at exit; not waiting longer");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = self.0.join();
    }
}

/// Handle to the dedicated HSM thread. Cloning shares the thread.
#[derive(Clone)]
pub struct HsmWorker {
    jobs: mpsc::Sender<Job>,
    errors: Counter,
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
        let thread = std::thread::Builder::new()
            .name("hsm-worker".into())
            .spawn(move || {
                let mut hsm = match open() {
                    Ok(hsm) => {
                        let _ = ready_tx.send(Ok(()));
                        hsm
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when every HsmWorker handle is dropped.
                for job in queue {
                    job(hsm.as_mut());
                }
            })
            .map_err(|e| HsmError::Setup(format!("cannot start HSM worker thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| HsmError::Setup("HSM worker thread ended during start".into()))??;
        Ok((
            HsmWorker {
                jobs,
                errors: Counter::default(),
            },
            HsmThread(thread),
        ))
    }

    /// Counts HSM operations that returned an error (for metrics).
    pub fn error_counter(&self) -> Counter {
        self.errors.clone()
    }

    fn count<T>(&self, r: Result<T, HsmError>) -> Result<T, HsmError> {
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// Runs `f` on the HSM thread and awaits its result without blocking the runtime.
    pub async fn call<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |hsm| {
                let _ = tx.send(f(hsm));
            }))
            .map_err(|_| HsmError::Unavailable("HSM worker thread has stopped".into()))?;
        self.count(
            rx.await
                .map_err(|_| HsmError::Unavailable("HSM worker thread dropped a job".into()))
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
            .send(Box::new(move |hsm| {
                let _ = tx.send(f(hsm));
            }))
            .map_err(|_| HsmError::Unavailable("HSM worker thread has stopped".into()))?;
        self.count(
            rx.recv()
                .map_err(|_| HsmError::Unavailable("HSM worker thread dropped a job".into()))
                .and_then(|r| r),
        )
    }
}
