//! Malformed message framing: Content-Length, chunked and Transfer-Encoding, bodies cut
//! short or over the limit, pipelining, and clients that vanish.

use crate::support::Rng;

use super::{probe_path, raw_request, target_key, with_body, Malformed, Mode};

/// Chunked bodies with bad sizes, extensions, trailers or ends.
pub fn bad_chunked(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let bodies: [&[u8]; 11] = [
        b"ZZZ\r\nabc\r\n0\r\n\r\n",
        b"FFFFFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",
        b"5\r\nab\r\n0\r\n\r\n",
        b"3\r\nabcXX0\r\n\r\n",
        b"3;ext=\x00\r\nabc\r\n0\r\n\r\n",
        b"-1\r\nabc\r\n0\r\n\r\n",
        b"3 \r\nabc\r\n0\r\n\r\n",
        b"0\r\nTrailer: \xff\r\n\r\n",
        b"\r\n\r\n",
        b"1\r\n{\r\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
    ];
    let body = *rng.pick(&bodies);
    (
        "bad chunked encoding",
        raw_request(
            "POST",
            encrypt.as_bytes(),
            &["Transfer-Encoding: chunked"],
            body,
        ),
        Mode::HalfClose,
    )
}

/// Less body than the Content-Length says, then close.
pub fn partial_body(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let fr = target_key();
    // Content-Length promises more than comes; then the client is gone.
    let body = b"{\"plaintext\":\"partial body\"}";
    let cut = 1 + rng.below(body.len() as u64 - 1) as usize;
    let path = if rng.below(2) == 0 { &encrypt } else { &fr };
    (
        "partial body, then close",
        raw_request(
            "POST",
            path.as_bytes(),
            &[&format!("Content-Length: {}", body.len() + 1000)],
            &body[..cut],
        ),
        Mode::Close,
    )
}

/// A whole request cut anywhere, then close.
pub fn vanish_mid_request(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    // A prefix of a whole request, cut anywhere, then the client is gone.
    let full = with_body("POST", &encrypt, b"{\"plaintext\":\"vanishing\"}");
    let cut = rng.below(full.len() as u64) as usize;
    (
        "client vanishes mid-request",
        full[..cut].to_vec(),
        Mode::Close,
    )
}

/// A Content-Length shorter or longer than the body.
pub fn content_length_mismatch(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let body = b"{\"plaintext\":\"mismatch\"}";
    let (headers, mode) = match rng.below(3) {
        // Shorter: the rest would be a pipelined garbage request.
        0 => (
            format!("Content-Length: {}", rng.below(body.len() as u64)),
            Mode::Read,
        ),
        // Longer: the server waits for bytes that never come; we half-close.
        1 => (
            format!(
                "Content-Length: {}",
                body.len() + 1 + rng.below(100) as usize
            ),
            Mode::HalfClose,
        ),
        _ => ("Content-Length: 0".to_string(), Mode::Read),
    };
    (
        "Content-Length mismatch",
        raw_request("POST", encrypt.as_bytes(), &[&headers], body),
        mode,
    )
}

/// Duplicate, signed, hex, huge and other bad Content-Length headers.
pub fn bad_content_length(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let body = b"{\"plaintext\":\"dup\"}";
    let n = body.len();
    let variants = [
        format!("Content-Length: {n}\r\nContent-Length: {}", n + 1),
        format!("Content-Length: {n}\r\nContent-Length: {n}"),
        format!("Content-Length: {n}, {}", n + 1),
        format!("Content-Length: +{n}"),
        "Content-Length: -1".to_string(),
        "Content-Length: abc".to_string(),
        "Content-Length: 99999999999999999999999".to_string(),
        "Content-Length: 18446744073709551615".to_string(),
        format!("Content-Length: 0x{n:x}"),
        format!("Content-Length : {n}"),
    ];
    let h = rng.pick(&variants);
    (
        "duplicate or bad Content-Length",
        raw_request("POST", encrypt.as_bytes(), &[h], body),
        Mode::HalfClose,
    )
}

/// Transfer-Encoding with Content-Length, and codings other than chunked alone.
pub fn transfer_encoding(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let body = b"{\"plaintext\":\"te\"}";
    let chunked = format!(
        "{:x}\r\n{}\r\n0\r\n\r\n",
        body.len(),
        "x".repeat(body.len())
    );
    let variants = [
        format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {}",
            body.len()
        ),
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked",
            chunked.len()
        ),
        "Transfer-Encoding: gzip, chunked".to_string(),
        "Transfer-Encoding: chunked, gzip".to_string(),
        "Transfer-Encoding: xchunked".to_string(),
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked".to_string(),
        "Transfer-Encoding : chunked".to_string(),
        "Transfer-Encoding: \x0bchunked".to_string(),
        "Transfer-Encoding: identity".to_string(),
    ];
    let h = rng.pick(&variants);
    (
        "Transfer-Encoding with Content-Length and odd codings",
        raw_request("POST", encrypt.as_bytes(), &[h], chunked.as_bytes()),
        Mode::HalfClose,
    )
}

/// Many requests in one write, none of the answers read.
pub fn pipelined_junk(rng: &mut Rng) -> Malformed {
    // Pipelining is the point: many requests in one write, good and bad mixed,
    // and the client leaves without reading any answer.
    let n = 50 + rng.below(250) as usize;
    let mut bytes = Vec::new();
    for i in 0..n {
        match i % 4 {
            0 => bytes.extend_from_slice(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"),
            1 => bytes.extend_from_slice(b"GET /v1/keys/hostile/XX HTTP/1.1\r\n\r\n"),
            2 => bytes.extend_from_slice(
                b"POST /v1/keys/hostile/DE/decrypt HTTP/1.1\r\nContent-Length: 2\r\n\r\n{]",
            ),
            _ => bytes.extend_from_slice(&rng.bytes(16)),
        }
    }
    ("pipelined junk, answers never read", bytes, Mode::Close)
}

/// `Expect: 100-continue`, then the client is gone.
pub fn expect_continue() -> Malformed {
    let encrypt = probe_path("encrypt");
    let bytes = raw_request(
        "POST",
        encrypt.as_bytes(),
        &["Expect: 100-continue", "Content-Length: 500000"],
        b"{\"plain",
    );
    ("Expect: 100-continue, then vanish", bytes, Mode::Close)
}

/// A body over max_body, declared or chunked.
pub fn over_max_body(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    if rng.below(2) == 0 {
        let mut bytes = raw_request(
            "POST",
            encrypt.as_bytes(),
            &["Content-Length: 2000000"],
            b"",
        );
        bytes.extend_from_slice(&vec![b'x'; 64 * 1024]);
        ("declared body over max_body", bytes, Mode::Read)
    } else {
        // Chunked, so only the count while reading can stop it.
        let mut bytes = raw_request(
            "POST",
            encrypt.as_bytes(),
            &["Transfer-Encoding: chunked"],
            b"",
        );
        let chunk = vec![b'y'; 64 * 1024];
        for _ in 0..18 {
            bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            bytes.extend_from_slice(&chunk);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        ("chunked body over max_body", bytes, Mode::Read)
    }
}

/// Random bytes instead of a request.
pub fn random_bytes(rng: &mut Rng) -> Malformed {
    let n = 1 + rng.below(4096) as usize;
    ("random bytes", rng.bytes(n), Mode::HalfClose)
}
