//! Loading keys from the state: every version unwrapped by the HSM in one job per key.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::aws;
use crate::domain::error::Result;
use crate::domain::{Availability, DataKey, KeyId, KeyState, VersionState, VersionType};
use crate::hsm::{HsmError, HsmWorker};
use crate::store::StoredKey;

/// Unwraps every version of a stored key in one HSM job.
pub(super) async fn unwrap_key(hsm: &HsmWorker, key: StoredKey) -> Result<KeyState> {
    let label = key.id.root_label();
    let jobs: Vec<_> = key
        .versions
        .iter()
        .map(|v| {
            let aad = match v.kind {
                VersionType::Managed => key.id.wrap_aad(v.version),
                VersionType::Aws => key.id.aws_secret_aad(v.version),
            };
            (v.iv, aad, v.wrapped.clone())
        })
        .collect();
    let opened = hsm
        .call(move |h| {
            h.ensure_root_key(&label, false)?;
            Ok(jobs
                .into_iter()
                .map(|(iv, aad, wrapped)| h.open(&label, &iv, &aad, &wrapped))
                .collect::<Vec<_>>())
        })
        .await;
    let (problem, opened) = match opened {
        Ok(opened) => (None, opened),
        Err(e @ HsmError::RootKeyMissing(_)) | Err(e @ HsmError::DuplicateRootKey(..)) => {
            tracing::error!(
                env = %key.id.env, country = %key.id.country,
                "state has key {} but {e}: the key is unavailable (no new root key is made)",
                key.id
            );
            (Some(format!("{}: {e}", key.id)), Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let mut versions = Vec::with_capacity(key.versions.len());
    let mut opened = opened.into_iter();
    for v in key.versions {
        let opened = opened.next();
        let (material, aws) = match v.aws {
            Some(stored) => aws::load_version(&key.id, v.version, &problem, stored, opened)?,
            None => (
                managed_material(&key.id, v.version, &problem, opened)?,
                None,
            ),
        };
        versions.push(VersionState {
            version: v.version,
            kind: v.kind,
            created: v.created,
            origin: v.origin,
            availability: material,
            aws,
        });
    }
    Ok(KeyState {
        id: key.id,
        rotation_period_days: key.rotation_period_days,
        created: key.created,
        unavailable_reason: problem,
        versions,
    })
}

/// A managed version's data key from its unwrap result; a failed tag check makes only this
/// version unavailable (loudly), an HSM failure stops the load.
fn managed_material(
    id: &KeyId,
    version: u32,
    problem: &Option<String>,
    opened: Option<std::result::Result<Zeroizing<Vec<u8>>, HsmError>>,
) -> Result<Availability> {
    Ok(match (problem, opened) {
        (Some(p), _) => Availability::Unavailable(p.clone()),
        (None, Some(Ok(bytes))) => match DataKey::new(&bytes) {
            Some(k) => Availability::Ready(Arc::new(k)),
            None => Availability::Unavailable(format!(
                "integrity check failed for {id} version {version}: wrong key length"
            )),
        },
        (None, Some(Err(HsmError::Integrity))) => {
            let msg = format!("integrity check failed for {id} version {version}");
            tracing::error!(env = %id.env, country = %id.country, version, "{msg}: the stored wrapped key was altered or moved");
            Availability::Unavailable(msg)
        }
        (None, Some(Err(e))) => return Err(e.into()),
        (None, None) => Availability::Unavailable("not unwrapped".into()),
    })
}
