//! Loading keys from the state: every version unwrapped by the HSM in one job per key.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::aws;
use crate::domain::error::Result;
use crate::domain::{Availability, DataKey, KeyId, KeyState, VersionState, VersionType};
use crate::hsm::{HsmError, HsmWorker};
use crate::store::{StoredKey, StoredVersion};

/// Unwraps every version of a stored key in one HSM job.
pub(super) async fn unwrap_key(hsm: &HsmWorker, key: StoredKey) -> Result<KeyState> {
    let (problem, versions) = unwrap_versions(hsm, &key.id, key.versions).await?;
    Ok(KeyState {
        id: key.id,
        rotation_period_days: key.rotation_period_days,
        created: key.created,
        unavailable_reason: problem,
        versions,
    })
}

/// Unwraps some versions of a key in one HSM job (at start all of them; when another node
/// added versions, those). A root key the HSM lacks is said loudly and makes them
/// unavailable (the problem is returned too); an HSM failure stops the load.
pub(super) async fn unwrap_versions(
    hsm: &HsmWorker,
    id: &KeyId,
    stored: Vec<StoredVersion>,
) -> Result<(Option<String>, Vec<VersionState>)> {
    let label = id.root_label();
    let jobs: Vec<_> = stored
        .iter()
        .map(|v| {
            let aad = match v.kind {
                VersionType::Managed => id.wrap_aad(v.version),
                VersionType::Aws => id.aws_secret_aad(v.version),
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
                env = %id.env, country = %id.country,
                "state has key {id} but {e}: the key is unavailable (no new root key is made)"
            );
            (Some(format!("{id}: {e}")), Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let mut versions = Vec::with_capacity(stored.len());
    let mut opened = opened.into_iter();
    for v in stored {
        let opened = opened.next();
        let (material, aws) = match v.aws {
            Some(aws) => aws::load_version(id, v.version, &problem, aws, opened)?,
            None => (managed_material(id, v.version, &problem, opened)?, None),
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
    Ok((problem, versions))
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
