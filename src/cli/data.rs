//! Data from the socket: records (encrypt, decrypt) and the secrets document (`--watch`).

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use hyper::{Method, StatusCode};

use super::{key_path, ok, print_json};
use crate::cli::client::Client;
use crate::proto::{CipherRequest, Decrypted, EncryptRequest, Encrypted};

pub(super) async fn encrypt(
    client: &Client,
    env: &str,
    country: &str,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let mut plaintext = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut plaintext)
        .map_err(|_| anyhow::anyhow!("cannot read stdin as UTF-8 text (SDK records hold text)"))?;
    let body = serde_json::to_vec(&EncryptRequest { plaintext })?;
    let path = format!("{}/encrypt", key_path(env, country));
    let done: Encrypted =
        ok(client.request(Method::POST, &path, &[], Some(body)).await?)?.read()?;
    if as_json {
        print_json(&done)?;
    } else {
        println!("{}", done.ciphertext);
        eprintln!(
            "incountry-keyd: encrypted with {env}/{country} version {}",
            done.version
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn decrypt(
    client: &Client,
    env: &str,
    country: &str,
    version: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let mut record = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut record)?;
    let body = serde_json::to_vec(&CipherRequest {
        ciphertext: record.trim().to_string(),
        version,
    })?;
    let path = format!("{}/decrypt", key_path(env, country));
    let done: Decrypted =
        ok(client.request(Method::POST, &path, &[], Some(body)).await?)?.read()?;
    let mut out = std::io::stdout().lock();
    out.write_all(done.plaintext.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn secrets(
    client: &Client,
    env: &str,
    country: &str,
    watch: bool,
) -> anyhow::Result<ExitCode> {
    let base = format!("{}/secrets", key_path(env, country));
    let mut etag: Option<String> = None;
    loop {
        let (path, headers) = match &etag {
            Some(tag) => (
                format!("{base}?wait=300"),
                vec![("if-none-match", tag.as_str())],
            ),
            None => (base.clone(), vec![]),
        };
        let reply = ok(client.request(Method::GET, &path, &headers, None).await?)?;
        if reply.status == StatusCode::OK {
            let mut out = std::io::stdout().lock();
            out.write_all(&reply.body)?;
            out.write_all(b"\n")?;
            out.flush()?;
            etag = reply
                .headers
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        if !watch {
            return Ok(ExitCode::SUCCESS);
        }
        if etag.is_none() {
            bail!("the daemon sent no ETag; cannot watch");
        }
    }
}
