//! Runs the store's futures to completion on the calling thread. The `Store` trait is
//! synchronous and its callers are blocking threads (`spawn_blocking`, offline tools);
//! tokio's own `block_on` panics when a caller turns out to be on a runtime's worker, this
//! never does (it only blocks that thread, as SQLite's fsyncs would).
//!
//! The connections are driven by the store's own runtime (one worker thread), whose
//! context is entered meanwhile so that new sockets and timers register with it.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use tokio::runtime::Handle;

/// Wakes the thread that waits in `block_on`.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

pub(super) fn block_on<F: Future>(handle: &Handle, fut: F) -> F::Output {
    let _context = handle.enter();
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        // A wake before the park leaves the token set: park then returns at once.
        std::thread::park();
    }
}
