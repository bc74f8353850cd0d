//! Customer-supplied (`aws`) keys: AWS KMS `Decrypt` behind a small trait, and the real
//! aws-sdk-kms client behind it.
//!
//! KMS answers fall into two kinds, and everything else follows from which:
//! - **rejected**: KMS answered and said no (key disabled, pending deletion, access denied,
//!   wrong key, invalid ciphertext, credentials refused). At registration a 400; at
//!   revalidation the version stops being served.
//! - **transient**: no usable answer (network, timeout, throttling, KMS internal errors).
//!   At registration a 503; at revalidation the cached key keeps serving until `aws.max_stale`.
//!
//! No Debug on anything holding the IAM secret; error messages carry KMS's code and message,
//! the CMK ARN and the region, never a secret, a ciphertext or a plaintext.

use crate::domain::Code;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::{
    retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region,
    SharedHttpClient,
};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use zeroize::Zeroizing;

pub use crate::domain::AwsKeyRef;

// Test doubles: in unit tests, and for the in-process integration tests (test builds only).
#[cfg(any(test, feature = "test-clock"))]
pub mod fake;

/// Why KMS refused a Decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Disabled,
    PendingDeletion,
    InvalidState,
    AccessDenied,
    IncorrectKey,
    NotFound,
    InvalidCiphertext,
    Credentials,
    Other,
}

impl Rejection {
    /// The API error code for a refused registration.
    pub fn code(self) -> Code {
        match self {
            Rejection::Disabled => Code::AwsKeyDisabled,
            Rejection::PendingDeletion => Code::AwsKeyPendingDeletion,
            Rejection::InvalidState => Code::AwsKeyInvalidState,
            Rejection::AccessDenied => Code::AwsAccessDenied,
            Rejection::IncorrectKey => Code::AwsIncorrectKey,
            Rejection::NotFound => Code::AwsKeyNotFound,
            Rejection::InvalidCiphertext => Code::AwsInvalidCiphertext,
            Rejection::Credentials => Code::AwsCredentialsRejected,
            Rejection::Other => Code::AwsRejected,
        }
    }

    /// What the refusal means, in words for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            Rejection::Disabled => "the CMK is disabled",
            Rejection::PendingDeletion => "the CMK is pending deletion",
            Rejection::InvalidState => "the CMK is not in a state that allows Decrypt",
            Rejection::AccessDenied => {
                "access denied (the IAM identity may not use this CMK, or the ciphertext belongs to another CMK)"
            }
            Rejection::IncorrectKey => "the encrypted key was not made with this CMK",
            Rejection::NotFound => "the CMK does not exist in this region",
            Rejection::InvalidCiphertext => {
                "the encrypted key is not a valid KMS ciphertext for this CMK"
            }
            Rejection::Credentials => {
                "the IAM credentials were refused (unknown access key id or wrong secret key)"
            }
            Rejection::Other => "KMS refused the request",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KmsError {
    /// KMS answered and refused: do not retry until something changes.
    #[error("{}: {detail}", cause.describe())]
    Rejected { cause: Rejection, detail: String },
    /// No usable answer (network, timeout, throttling, KMS internal error): retry later.
    #[error("{0}")]
    Transient(String),
}

pub type DecryptFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Zeroizing<Vec<u8>>, KmsError>> + Send + 'a>>;

/// KMS Decrypt of a customer-supplied data key with the key's own credentials.
pub trait KmsDecrypt: Send + Sync {
    fn decrypt<'a>(&'a self, key: &'a AwsKeyRef) -> DecryptFuture<'a>;
}

/// The real client: aws-sdk-kms over one shared HTTPS connection pool (rustls with ring).
pub struct AwsKms {
    http: SharedHttpClient,
    endpoint_url: Option<String>,
    timeout: Duration,
}

impl AwsKms {
    pub fn new(endpoint_url: Option<String>, timeout: Duration) -> AwsKms {
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        AwsKms {
            http,
            endpoint_url,
            timeout,
        }
    }

    fn client(&self, key: &AwsKeyRef) -> aws_sdk_kms::Client {
        let credentials = Credentials::new(
            key.access_key_id.as_str(),
            key.secret_access_key.as_str(),
            None,
            None,
            "incountry-keyd",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.timeout.min(Duration::from_secs(5)))
            .operation_attempt_timeout(self.timeout)
            .operation_timeout(self.timeout)
            .build();
        let mut conf = aws_sdk_kms::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(key.region.clone()))
            .credentials_provider(credentials)
            .http_client(self.http.clone())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(url) = &self.endpoint_url {
            conf = conf.endpoint_url(url);
        }
        aws_sdk_kms::Client::from_conf(conf.build())
    }
}

impl KmsDecrypt for AwsKms {
    fn decrypt<'a>(&'a self, key: &'a AwsKeyRef) -> DecryptFuture<'a> {
        Box::pin(async move {
            let out = self
                .client(key)
                .decrypt()
                .key_id(&key.cmk_arn)
                .ciphertext_blob(Blob::new(key.encrypted_key.clone()))
                .send()
                .await
                .map_err(classify)?;
            let plaintext =
                out.plaintext
                    .map(Blob::into_inner)
                    .ok_or_else(|| KmsError::Rejected {
                        cause: Rejection::Other,
                        detail: "Decrypt answered without a plaintext".into(),
                    })?;
            Ok(Zeroizing::new(plaintext))
        })
    }
}

fn classify<E>(err: SdkError<E, HttpResponse>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let status = se.raw().status().as_u16();
            classify_code(e.code().unwrap_or(""), e.message().unwrap_or(""), status)
        }
        SdkError::TimeoutError(_) => {
            KmsError::Transient("no answer within aws.request_timeout".into())
        }
        SdkError::DispatchFailure(_) => KmsError::Transient(chain(&err)),
        SdkError::ResponseError(_) => {
            KmsError::Transient(format!("unreadable answer: {}", chain(&err)))
        }
        SdkError::ConstructionFailure(_) => KmsError::Rejected {
            cause: Rejection::Other,
            detail: format!(
                "cannot build the KMS request (check region and aws.endpoint_url): {}",
                chain(&err)
            ),
        },
        _ => KmsError::Transient(chain(&err)),
    }
}

/// An error and its sources as one line ("dispatch failure: io error: ...: Connection
/// refused"), skipping links that only repeat the previous one.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    clean(&parts.join(": "))
}

/// Sorts a KMS error code (and, for answers without one, the HTTP status) into rejected
/// (with its cause) or transient.
pub fn classify_code(code: &str, message: &str, status: u16) -> KmsError {
    let detail = match (code, message) {
        ("", "") => format!("HTTP {status}"),
        ("", m) => format!("HTTP {status}: {}", clean(m)),
        (c, "") => c.to_string(),
        (c, m) => format!("{c}: {}", clean(m)),
    };
    let cause = match code {
        "DisabledException" => Rejection::Disabled,
        "KMSInvalidStateException" => {
            if message.to_ascii_lowercase().contains("pending deletion")
                || message.contains("PendingDeletion")
            {
                Rejection::PendingDeletion
            } else {
                Rejection::InvalidState
            }
        }
        "AccessDeniedException" | "AccessDenied" => Rejection::AccessDenied,
        "IncorrectKeyException" => Rejection::IncorrectKey,
        "NotFoundException" => Rejection::NotFound,
        "InvalidCiphertextException" => Rejection::InvalidCiphertext,
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidAccessKeyId"
        | "ExpiredTokenException" => Rejection::Credentials,
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "KMSInternalException"
        | "KMSInternal"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "InternalFailure"
        | "InternalError" => return KmsError::Transient(format!("KMS error {detail}")),
        // An answer without a code: the status decides.
        "" => match status {
            401 | 403 => Rejection::Credentials,
            400..=499 if status != 408 && status != 429 => Rejection::Other,
            _ => return KmsError::Transient(format!("KMS error {detail}")),
        },
        _ => Rejection::Other,
    };
    KmsError::Rejected { cause, detail }
}

/// One line, printable, bounded: KMS messages go into API errors and logs.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_sort_into_rejected_and_transient() {
        let cause = |code: &str, msg: &str| match classify_code(code, msg, 400) {
            KmsError::Rejected { cause, .. } => Some(cause),
            KmsError::Transient(_) => None,
        };
        assert_eq!(cause("DisabledException", "x"), Some(Rejection::Disabled));
        assert_eq!(
            cause("KMSInvalidStateException", "arn:... is pending deletion."),
            Some(Rejection::PendingDeletion)
        );
        assert_eq!(
            cause("KMSInvalidStateException", "other"),
            Some(Rejection::InvalidState)
        );
        assert_eq!(
            cause("UnrecognizedClientException", ""),
            Some(Rejection::Credentials)
        );
        assert_eq!(
            cause("SignatureDoesNotMatch", ""),
            Some(Rejection::Credentials)
        );
        assert_eq!(
            cause("InvalidCiphertextException", ""),
            Some(Rejection::InvalidCiphertext)
        );
        assert_eq!(cause("ThrottlingException", "slow down"), None);
        assert_eq!(cause("KMSInternalException", ""), None);
        assert_eq!(cause("SomethingNew", ""), Some(Rejection::Other));
        let by_status = |status| match classify_code("", "", status) {
            KmsError::Rejected { cause, .. } => Some(cause),
            KmsError::Transient(_) => None,
        };
        assert_eq!(by_status(403), Some(Rejection::Credentials));
        assert_eq!(by_status(400), Some(Rejection::Other));
        assert_eq!(by_status(429), None);
        assert_eq!(by_status(503), None);
    }

    #[test]
    fn messages_are_one_bounded_line() {
        let long = "a\nb".repeat(400);
        let c = clean(&long);
        assert!(!c.contains('\n'));
        assert!(c.chars().count() <= 301);
    }
}
