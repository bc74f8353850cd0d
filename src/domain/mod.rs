//! The bottom layer: what the daemon is about, with no I/O of its own. Names and versions,
//! the published snapshot, live key memory, limits, the audit entry and its chain, errors,
//! time and the SDK record format. Everything above imports from here; nothing here
//! imports from above.

pub mod audit;
pub mod aws;
pub mod caller;
pub mod clock;
pub mod code;
pub mod crypto;
pub mod error;
pub mod id;
pub mod limits;
pub mod secret;
pub mod snapshot;
pub mod verification;
pub mod version;

pub use aws::{AwsHealth, AwsKeyRef, AwsProblem, AwsState, AwsStatus};
pub use caller::Caller;
pub use code::Code;
pub use error::{Error, Result};
pub use id::KeyId;
pub use secret::{DataKey, DATA_KEY_LEN};
pub use snapshot::{Availability, KeyState, Snapshot, VersionState, VersionStatus};
pub use verification::VerificationMode;
pub use version::{Initiator, VersionType};
