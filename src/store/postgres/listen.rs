//! The change feed of a PostgreSQL state (`Store::follow`): a connection of its own LISTENs
//! on `keyd_changes` and turns each notification into a `StateEvent`. It is pinged, so that
//! a server gone quiet (a network cut, not a closed socket) is noticed as well as a closed
//! one; a lost connection is made again with backoff, and each new one starts with
//! `Following`: notifications sent while none listened are gone, so the node reads the
//! whole state again.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::pool::Dialer;
use super::CHANGES_CHANNEL;
use crate::domain::error::Error;
use crate::domain::KeyId;
use crate::store::{ChangeFeed, StateEvent};

/// The first wait before connecting again, doubled after each failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the connection proves it is alive; how long it has to answer (connecting and
/// LISTEN too).
const PING_EVERY: Duration = Duration::from_secs(5);
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Why the listener is not following (`None` while it is), which the store's
/// `unavailable` reports.
pub(super) type Down = Arc<Mutex<Option<String>>>;

fn lock(down: &Down) -> MutexGuard<'_, Option<String>> {
    down.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts listening on the store's runtime; stops when the feed is dropped.
pub(super) fn start(dialer: Dialer, handle: &Handle, down: Down) -> ChangeFeed {
    let (tx, rx) = unbounded_channel();
    handle.spawn(run(dialer, tx, down));
    rx
}

async fn run(dialer: Dialer, tx: UnboundedSender<StateEvent>, down: Down) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (followed, why) = tokio::select! {
            ended = follow(&dialer, &tx, &down) => ended,
            _ = tx.closed() => return,
        };
        if tx.is_closed() {
            return;
        }
        if followed {
            backoff = FIRST_BACKOFF;
        }
        let first = lock(&down)
            .replace(format!("not hearing other nodes' changes: {why}"))
            .is_none();
        if first {
            tracing::warn!(error = %why, "PostgreSQL change listener lost: other nodes' changes are not seen until it is back");
            let _ = tx.send(StateEvent::Lost(why));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Aborts the task driving a connection when the listener lets go of it.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection's life: connect, LISTEN, forward notifications until it fails. Whether
/// it got as far as listening, and why it ended.
async fn follow(dialer: &Dialer, tx: &UnboundedSender<StateEvent>, down: &Down) -> (bool, String) {
    let (client, mut connection) = match tokio::time::timeout(ANSWER_WITHIN, dialer.connect()).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return (false, e.to_string()),
        Err(_) => return (false, "connecting timed out".into()),
    };
    // The connection is driven here; what the server sends unasked (notifications, notices,
    // a fatal error) comes through `messages`.
    let (messages_tx, mut messages) = unbounded_channel();
    let _driver = Driver(tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            let end = message.is_err();
            if messages_tx.send(message).is_err() || end {
                return;
            }
        }
    }));
    let listen = format!("LISTEN {CHANGES_CHANNEL}");
    match tokio::time::timeout(ANSWER_WITHIN, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return (false, Error::from(e).to_string()),
        Err(_) => return (false, "LISTEN timed out".into()),
    }
    if lock(down).take().is_some() {
        tracing::info!("PostgreSQL change listener back: reading the whole state again");
    }
    if tx.send(StateEvent::Following).is_err() {
        return (true, "no one follows".into());
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANGES_CHANNEL => {
                    let event = match parse(n.payload()) {
                        Some((key, sent)) => StateEvent::Changed { key, sent },
                        // Not one of ours: nothing to tell which key, so read them all.
                        None => {
                            tracing::warn!("unreadable change notification: reading the whole state again");
                            StateEvent::Following
                        }
                    };
                    if tx.send(event).is_err() {
                        return (true, "no one follows".into());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return (true, Error::from(e).to_string()),
                None => return (true, "connection closed".into()),
            },
            _ = ping.tick() => {
                match tokio::time::timeout(ANSWER_WITHIN, client.batch_execute("SELECT 1")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return (true, Error::from(e).to_string()),
                    Err(_) => return (true, format!("no answer to a ping within {} s", ANSWER_WITHIN.as_secs())),
                }
            }
        }
    }
}

/// `ENV/COUNTRY` and, after a space, when it was sent (Unix ms).
fn parse(payload: &str) -> Option<(KeyId, Option<i64>)> {
    let (key, sent) = match payload.split_once(' ') {
        Some((key, sent)) => (key, sent.parse().ok()),
        None => (payload, None),
    };
    let (env, country) = key.split_once('/')?;
    Some((KeyId::parse(env, country).ok()?, sent))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use crate::domain::KeyId;

    #[test]
    fn payloads() {
        let de = KeyId::parse("prod", "DE").unwrap();
        assert_eq!(
            parse("prod/DE 1700000000123"),
            Some((de.clone(), Some(1_700_000_000_123)))
        );
        assert_eq!(parse("prod/DE"), Some((de.clone(), None)));
        assert_eq!(parse("prod/DE soon"), Some((de, None)));
        assert_eq!(parse("prod"), None);
        assert_eq!(parse("pr od/DE 1"), None);
        assert_eq!(parse("prod/XXX 1"), None);
    }
}
