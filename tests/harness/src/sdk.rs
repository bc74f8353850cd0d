//! The Python tools the tests drive: the InCountry SDK (tests/sdk) and moto (tests/aws),
//! each in a venv tests/run.sh makes.

use std::fmt;
use std::ops::Deref;
use std::path::PathBuf;
use std::process::Command;

use incountry_keyd::proto::SecretsDocument;
use serde::de::DeserializeOwned;

use crate::repo;

/// A venv's Python: `$var` when set, else `default` under the package's directory.
fn venv_python(var: &str, default: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(default));
    assert!(
        p.exists(),
        "{} missing: run tests through tests/run.sh, which makes the {what} venv",
        p.display()
    );
    p
}

/// The Python with the InCountry SDK.
pub fn sdk_python() -> PathBuf {
    venv_python("KEYD_TEST_PYTHON", ".venv/bin/python", "SDK")
}

/// The Python with moto's server and boto3 (a venv of its own: moto needs pydantic 2, the
/// SDK pydantic 1).
pub fn moto_python() -> PathBuf {
    venv_python("KEYD_TEST_MOTO_PYTHON", ".venv-moto/bin/python", "moto")
}

/// A secrets document as the daemon served it: its bytes, which the SDK reads as they are,
/// and the document they hold (`current_version`, `secrets`: reached through `Deref`).
pub struct Secrets {
    pub body: Vec<u8>,
    doc: SecretsDocument,
}

impl Secrets {
    /// Reads a served body; fails the test when it is not a secrets document.
    pub fn parse(body: Vec<u8>) -> Secrets {
        let doc = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "not a secrets document: {e}: {}",
                String::from_utf8_lossy(&body)
            )
        });
        Secrets { body, doc }
    }

    /// `(version, secret)` of each served version, in the document's order.
    pub fn keys(&self) -> Vec<(u32, String)> {
        self.doc
            .secrets
            .iter()
            .map(|s| (s.version, s.secret.to_string()))
            .collect()
    }
}

impl Deref for Secrets {
    type Target = SecretsDocument;
    fn deref(&self) -> &SecretsDocument {
        &self.doc
    }
}

/// The same document: the same current version and the same keys, as the same kind.
impl PartialEq for Secrets {
    fn eq(&self, other: &Secrets) -> bool {
        let (a, b) = (&self.doc, &other.doc);
        a.current_version == b.current_version
            && a.secrets.len() == b.secrets.len()
            && a.secrets.iter().zip(&b.secrets).all(|(x, y)| {
                x.version == y.version && x.is_key == y.is_key && *x.secret == *y.secret
            })
    }
}

/// The versions only: a failed assertion must not print keys.
impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("current_version", &self.doc.current_version)
            .field(
                "versions",
                &self
                    .doc
                    .secrets
                    .iter()
                    .map(|s| s.version)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Runs tests/sdk/sdk_tool.py with a secrets document, as served; its answer reads as the
/// daemon's: `proto::Encrypted` for `encrypt`, `proto::Decrypted` for `decrypt`.
pub fn sdk<T: DeserializeOwned>(doc: &Secrets, args: &[&str]) -> T {
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("doc.json");
    std::fs::write(&doc_file, &doc.body).unwrap();
    let out = Command::new(sdk_python())
        .arg(repo().join("tests/sdk/sdk_tool.py"))
        .arg(args[0])
        .arg(&doc_file)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "SDK {:?} answer: {e}: {}",
            args[0],
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
