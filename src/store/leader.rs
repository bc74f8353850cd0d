//! Which node runs timer rotations: the one holding the state's lease ([`Store::leadership`]).
//! A SQLite state has one node, always the leader; on PostgreSQL the lease is an advisory
//! lock on a session of its own (`postgres::lease`), renewed by a heartbeat.
//!
//! [`Store::leadership`]: super::Store::leadership

use std::future::pending;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

/// What the lease's holder publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Follower,
    /// Leader until then, unless renewed first: past it the database may already have ended
    /// the session (and freed the lock) of a node that was frozen or cut off. `None`: for
    /// good (one node).
    Leader(Option<Instant>),
}

/// This node's role, as its lease says now. Cheap to clone; every clone sees the same lease.
#[derive(Clone)]
pub struct Leadership {
    lease: watch::Receiver<Lease>,
    /// `None`: not in a cluster (SQLite).
    node: Option<Arc<str>>,
}

impl Leadership {
    /// The only node of its state: always the leader, in no cluster.
    pub fn single() -> Leadership {
        Leadership {
            lease: watch::channel(Lease::Leader(None)).1,
            node: None,
        }
    }

    /// Node `node` of a cluster, a follower until the sender says otherwise.
    pub fn cluster(node: &str) -> (watch::Sender<Lease>, Leadership) {
        let (tx, lease) = watch::channel(Lease::Follower);
        let node = Some(Arc::from(node));
        (tx, Leadership { lease, node })
    }

    /// Whether this node runs timer rotations now.
    pub fn is_leader(&self) -> bool {
        leads(*self.lease.borrow())
    }

    /// This node's name in its cluster; `None` for a state of one node.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Returns once this node leads (at once if it does now).
    pub async fn became_leader(&mut self) {
        self.until(true).await
    }

    /// Returns once this node no longer leads (at once if it does not now). A lease that
    /// lapsed without a word from its holder is seen by `is_leader` only.
    pub async fn lost(&mut self) {
        self.until(false).await
    }

    async fn until(&mut self, leader: bool) {
        // Waits for the holder's next word, not on a timer: a lapsed lease is renewed or
        // given up by the holder (whose session ended by then).
        while leads(*self.lease.borrow_and_update()) != leader {
            if self.lease.changed().await.is_err() {
                // No holder any more: the role stays as it is.
                pending::<()>().await;
            }
        }
    }
}

fn leads(lease: Lease) -> bool {
    match lease {
        Lease::Follower => false,
        Lease::Leader(None) => true,
        Lease::Leader(Some(until)) => Instant::now() < until,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_node_always_leads() {
        let mut l = Leadership::single();
        assert!(l.is_leader());
        assert_eq!(l.node(), None);
        l.became_leader().await;
        let lost = tokio::time::timeout(Duration::from_millis(20), l.lost()).await;
        assert!(lost.is_err(), "a single node never stops leading");
    }

    #[tokio::test]
    async fn a_cluster_node_follows_its_lease_and_a_lapsed_lease_is_not_leading() {
        let (tx, mut l) = Leadership::cluster("a");
        assert_eq!((l.is_leader(), l.node()), (false, Some("a")));
        let mut waiting = l.clone();
        let became = tokio::spawn(async move { waiting.became_leader().await });
        tx.send_replace(Lease::Leader(Some(
            Instant::now() + Duration::from_secs(60),
        )));
        became.await.unwrap();
        assert!(l.is_leader());
        tx.send_replace(Lease::Leader(Some(
            Instant::now() - Duration::from_millis(1),
        )));
        assert!(!l.is_leader(), "a lease past its time does not lead");
        tx.send_replace(Lease::Follower);
        l.lost().await;
        assert!(!l.is_leader());
    }
}
