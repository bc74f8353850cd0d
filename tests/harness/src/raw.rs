//! HTTP on a raw Unix socket, only for the tests that send malformed or partial requests on
//! purpose (header bytes no client would send, bodies that never finish, requests held on a
//! keep-alive connection). Everything else goes through `request`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::Reply;

/// Writes `bytes` on a fresh connection and reads until the daemon closes it (or `timeout`
/// passes without a byte). Write errors are ignored: the daemon may answer and close before
/// it has read everything.
pub fn exchange(socket: &Path, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    try_exchange(socket, bytes, timeout).expect("connect to the daemon")
}

/// `exchange`, with `Err` when the daemon cannot be reached (not running: a test that kills
/// it).
pub fn try_exchange(socket: &Path, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Ok(raw)
}

/// Where the body starts, the status and the headers.
type Head = (usize, u16, Vec<(String, String)>);

/// The head at the start of `raw`: `Ok(None)` while it is incomplete.
fn head(raw: &[u8]) -> Result<Option<Head>, String> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some((split + 4, status, headers)))
}

/// An answer read to the end of its connection: the head, and the rest as the body.
pub fn parse(raw: &[u8]) -> Result<Reply, String> {
    let (body_at, status, headers) =
        head(raw)?.ok_or_else(|| format!("no complete head in {} bytes", raw.len()))?;
    Ok(Reply {
        status,
        headers,
        body: raw[body_at..].to_vec(),
    })
}

/// Reads one answer (head and Content-Length body) from a keep-alive connection.
pub fn read_response(s: &mut UnixStream) -> std::io::Result<String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some((body_at, _, headers)) = head(&raw).map_err(std::io::Error::other)? {
            let length = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            if raw.len() >= body_at + length {
                return Ok(String::from_utf8_lossy(&raw).into_owned());
            }
        }
    }
}
