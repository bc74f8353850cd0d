//! Malformed request heads: request lines, paths, headers, methods and other protocols.

use crate::support::Rng;

use super::{probe_path, raw_request, target_key, Malformed, Mode};

/// Request lines that are not `METHOD target HTTP/1.1`.
pub fn bad_request_line(rng: &mut Rng) -> Malformed {
    let lines: [&[u8]; 18] = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /v1/health HTTP/1.1 extra\r\n\r\n",
        b" GET /v1/health HTTP/1.1\r\n\r\n",
        b"GET  /v1/health  HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/9.9\r\n\r\n",
        b"GET /v1/health HTTP/1.10\r\n\r\n",
        b"GET /v1/health http/1.1\r\n\r\n",
        b"G\x01T /v1/health HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\r\n\r\n",
        b"GET v1/health HTTP/1.1\r\n\r\n",
        b"CONNECT localhost:80 HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
        b"get /v1/health HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\r\r\r",
        b"GET /v1/health\tHTTP/1.1\r\n\r\n",
        b"GET /v1/he alth HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ];
    (
        "bad request line",
        rng.pick(&lines).to_vec(),
        Mode::HalfClose,
    )
}

/// A request line of 100 to 300 KiB.
pub fn huge_request_line(rng: &mut Rng) -> Malformed {
    let n = 100 * 1024 + rng.below(200 * 1024) as usize;
    let path = format!("/v1/keys/{}/DE/secrets", "a".repeat(n));
    (
        "huge request line",
        raw_request("GET", path.as_bytes(), &[], b""),
        Mode::Read,
    )
}

/// One header of 100 to 500 KiB.
pub fn huge_header(rng: &mut Rng) -> Malformed {
    let n = 100 * 1024 + rng.below(400 * 1024) as usize;
    let h = format!("X-Big: {}", "b".repeat(n));
    (
        "huge header",
        raw_request("GET", probe_path("secrets").as_bytes(), &[&h], b""),
        Mode::Read,
    )
}

/// 1,000 to 8,000 headers.
pub fn thousands_of_headers(rng: &mut Rng) -> Malformed {
    let n = 1000 + rng.below(7000) as usize;
    let hs: Vec<String> = (0..n).map(|i| format!("X-H{i}: {i}")).collect();
    let hs: Vec<&str> = hs.iter().map(String::as_str).collect();
    (
        "thousands of headers",
        raw_request("GET", probe_path("secrets").as_bytes(), &hs, b""),
        Mode::Read,
    )
}

/// Paths with bytes, escapes and queries the routes must refuse.
pub fn bad_paths(rng: &mut Rng) -> Malformed {
    let long_env = format!("/v1/keys/{}/DE", "e".repeat(10_000));
    let paths: [&[u8]; 20] = [
        b"/v1/keys/\xff\xfe/DE/secrets",
        b"/v1/keys/%ff%fe/DE/secrets",
        b"/v1/keys/%00/DE/secrets",
        b"/v1/keys/%/DE/secrets",
        b"/v1/keys/%zz/DE",
        b"/v1/keys/hostile/%44%45/secrets",
        b"/v1/keys/..%2f..%2f/DE",
        b"/v1/keys/hostile/DE/secrets?wait=%ff",
        b"/v1/keys/hostile/DE/secrets?wait=99999999999999999999999",
        b"/v1/keys/hostile/DE/secrets?wait=-1",
        b"/v1/keys/hostile/D\xc3\xa9/secrets",
        b"/v1/keys/hostile/\xe2\x80\xae/secrets",
        b"/v1/audit?since=-5",
        b"/v1/audit?since=999999999999999999999",
        b"//////",
        b"/v1/keys/hostile/DE/secrets/../../../FR",
        b"/v1/keys/hostile/DE/secrets#frag",
        b"/v1/keys/hostile/DE/secrets?%00=%00",
        b"/v1/keys/\x7f/DE",
        long_env.as_bytes(),
    ];
    let path = *rng.pick(&paths);
    (
        "bad path bytes and escapes",
        raw_request("GET", path, &[], b""),
        Mode::HalfClose,
    )
}

/// HTTP/0.9 requests.
pub fn http09(rng: &mut Rng) -> Malformed {
    let reqs: [&[u8]; 4] = [
        b"GET /v1/health\r\n",
        b"GET /\n",
        b"GET /v1/keys/hostile/DE/secrets\r\n\r\n",
        b"GET /v1/health HTTP/0.9\r\n\r\n",
    ];
    ("HTTP/0.9", rng.pick(&reqs).to_vec(), Mode::HalfClose)
}

/// The HTTP/2 preface, or an h2c upgrade.
pub fn http2(rng: &mut Rng) -> Malformed {
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame, then a HEADERS frame of junk.
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    preface.extend_from_slice(&[0, 0, 8, 1, 5, 0, 0, 0, 1]);
    preface.extend_from_slice(&rng.bytes(8));
    let upgrade = raw_request(
        "GET",
        b"/v1/health",
        &[
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "Connection: Upgrade, HTTP2-Settings",
        ],
        b"",
    );
    let bytes = if rng.below(3) == 0 { upgrade } else { preface };
    ("HTTP/2 preface or h2c upgrade", bytes, Mode::HalfClose)
}

/// NUL bytes in the request line, headers and body.
pub fn null_bytes(rng: &mut Rng) -> Malformed {
    let variants: [&[u8]; 8] = [
        b"GET /v1/health\x00 HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
        b"\x00\x00\x00\x00\x00\x00\x00\x00",
        b"GET /v1/health HTTP/1.1\r\nX\x00A: b\r\n\r\n",
        b"POST /v1/keys/hostile/DE/encrypt HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"plaintext\":\"a\x00b\"}",
        b"GE\x00T /v1/health HTTP/1.1\r\n\r\n",
        b"GET /v1/keys/hostile/DE\x00/secrets HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/1.1\x00\r\n\r\n",
    ];
    ("null bytes", rng.pick(&variants).to_vec(), Mode::HalfClose)
}

/// Header lines that are not `name: value`.
pub fn bad_header_syntax(rng: &mut Rng) -> Malformed {
    let variants: [&[u8]; 7] = [
        b"GET /v1/health HTTP/1.1\rHost: x\r\r",
        b"GET /v1/health HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nX-A: \xff\xfe\r\n\r\n",
        b"GET /v1/keys/hostile/DE/secrets HTTP/1.1\r\nIf-None-Match: \xff\r\n\r\n",
    ];
    (
        "bad header syntax",
        rng.pick(&variants).to_vec(),
        Mode::HalfClose,
    )
}

/// Methods the routes do not take.
pub fn odd_methods(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let fr = target_key();
    let long = "M".repeat(10_000);
    let variants = [
        raw_request("FOO", b"/v1/health", &[], b""),
        raw_request("DELETE", fr.as_bytes(), &[], b""),
        raw_request("PUT", fr.as_bytes(), &["Content-Length: 2"], b"{}"),
        raw_request("GET", encrypt.as_bytes(), &[], b""),
        raw_request("HEAD", probe_path("secrets").as_bytes(), &[], b""),
        raw_request(&long, b"/v1/health", &[], b""),
        raw_request("TRACE", b"/v1/health", &[], b""),
    ];
    ("odd methods", rng.pick(&variants).clone(), Mode::Read)
}
