//! `GET /v1/health`: the whole document for readers, the bare status for peers without a
//! role.

use serde::{Deserialize, Serialize};

use crate::domain::{AwsHealth, VerificationMode};

/// Either document; a client reads whichever its role gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Health {
    Full(Box<HealthDocument>),
    Bare(BareHealth),
}

impl Health {
    pub fn status(&self) -> HealthStatus {
        match self {
            Health::Full(doc) => doc.status,
            Health::Bare(doc) => doc.status,
        }
    }
}

/// What peers without a role see: key names, versions and KMS errors (account ids, ARNs)
/// are for readers only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BareHealth {
    pub status: HealthStatus,
}

/// The reader's document (fields alphabetical: the wire order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthDocument {
    pub aws: AwsHealth,
    /// This node in its cluster (PostgreSQL state); absent for a state of one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterHealth>,
    pub hsm: Condition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_error: Option<String>,
    pub hsm_reconnects: u64,
    pub keys: usize,
    /// Only on a state other nodes write too (PostgreSQL): how their changes reach this
    /// node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation: Option<PropagationHealth>,
    pub rotation: RotationHealth,
    pub state: Condition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
    pub status: HealthStatus,
    /// `ENV/COUNTRY vN` of each version that is not served.
    pub unavailable_versions: Vec<String>,
    pub verification: VerificationMode,
    pub versions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    /// Something needs an operator: see the other fields.
    Degraded,
}

/// Whether the HSM or the state works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Ok,
    Unavailable,
}

/// How other nodes' changes reach this one (fields alphabetical: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropagationHealth {
    /// From another node's commit to this node serving the change, for the last change
    /// learned from a notification (ms; `null` until one was).
    pub last_delay_ms: Option<u64>,
    /// RFC 3339: when the whole state was last read (start, a listener back, reconcile).
    pub last_reload: Option<String>,
}

/// The rotation timer (fields alphabetical: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationHealth {
    /// Passes since start.
    pub checks: u64,
    pub failing: Vec<RotationFailure>,
    /// RFC 3339.
    pub last_check: Option<String>,
}

/// A key whose rotation fails, and when the timer tries again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFailure {
    pub attempts: u32,
    pub error: String,
    pub key: String,
    pub retry_in_seconds: u64,
}

/// A node of a cluster (fields alphabetical: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHealth {
    /// `cluster.node_name`.
    pub node: String,
    pub role: NodeRole,
}

/// Whether the node runs timer rotations (holds the rotator's lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Leader,
    Follower,
}
