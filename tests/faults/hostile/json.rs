//! Malformed JSON bodies on the key routes: bad UTF-8, deep nesting, numbers out of range,
//! wrong types, random bytes and garbage batches.

use crate::support::Rng;

use super::{probe_path, target_key, with_body, Malformed, Mode};

/// JSON bodies with invalid UTF-8 or lone surrogates.
pub fn invalid_utf8(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let decrypt = probe_path("decrypt");
    let fr = target_key();
    let fr_rotate = format!("{fr}/rotate");
    let bodies: [(&str, &[u8]); 8] = [
        (&encrypt, b"{\"plaintext\":\"\xff\xfe\"}"),
        (&encrypt, b"{\"plaintext\":\"\\ud800\"}"),
        (&encrypt, b"{\"plaintext\":\"\\udc00x\"}"),
        (&encrypt, b"{\"plain\xc0\xafext\":\"x\"}"),
        (&decrypt, b"{\"ciphertext\":\"2:\xc0\xaf\",\"version\":1}"),
        (
            &fr,
            b"{\"type\":\"incountry-managed\xff\",\"rotation_period_days\":30}",
        ),
        (&fr, b"{\"rotation_period_days\":30\xff}"),
        (&fr_rotate, b"{\"rotation_period_days\":\"\xed\xa0\x80\"}"),
    ];
    let (path, body) = *rng.pick(&bodies);
    let method = if path == fr && body.starts_with(b"{\"rot") {
        "PATCH"
    } else {
        "POST"
    };
    (
        "invalid UTF-8 in JSON",
        with_body(method, path, body),
        Mode::Read,
    )
}

/// JSON nested 50,000 to 100,000 deep.
pub fn deeply_nested(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let decrypt = probe_path("decrypt");
    let fr = target_key();
    let fr_rotate = format!("{fr}/rotate");
    let deep = match rng.below(4) {
        0 => "[".repeat(100_000),
        1 => "{\"a\":".repeat(50_000),
        2 => format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        _ => format!("{{\"batch\":{}", "[".repeat(100_000)),
    };
    let path = match rng.below(4) {
        0 => encrypt.clone(),
        1 => decrypt.clone(),
        2 => fr.clone(),
        _ => fr_rotate.clone(),
    };
    (
        "deeply nested JSON",
        with_body("POST", &path, deep.as_bytes()),
        Mode::Read,
    )
}

/// Numbers no field takes: too large, negative, fractional, not JSON.
pub fn out_of_range_numbers(rng: &mut Rng) -> Malformed {
    let decrypt = probe_path("decrypt");
    let fr = target_key();
    let fr_rotate = format!("{fr}/rotate");
    let big = format!("1{}", "0".repeat(100_000));
    let numbers = [
        "18446744073709551616",
        "18446744073709551615",
        "4294967296",
        "4294967326",
        "-1",
        "-30",
        "-0",
        "1e400",
        "-1e400",
        "30.0",
        "3e1",
        "0x1e",
        "NaN",
        "Infinity",
        "030",
        big.as_str(),
    ];
    let n = *rng.pick(&numbers);
    let (method, path, body) = match rng.below(5) {
        0 => (
            "POST",
            fr.clone(),
            format!("{{\"type\":\"incountry-managed\",\"rotation_period_days\":{n}}}"),
        ),
        1 => (
            "PATCH",
            fr.clone(),
            format!("{{\"rotation_period_days\":{n}}}"),
        ),
        2 => (
            "POST",
            fr_rotate.clone(),
            format!("{{\"rotation_period_days\":{n}}}"),
        ),
        3 => (
            "POST",
            decrypt.clone(),
            format!("{{\"ciphertext\":\"2:AAAA\",\"version\":{n}}}"),
        ),
        _ => (
            "POST",
            "/v1/test/clock".to_string(),
            // Only values no i64 holds: the clock must not move.
            format!(
                "{{\"advance_seconds\":{}}}",
                rng.pick(&["9223372036854775808", "-9223372036854775809", "1e400"])
            ),
        ),
    };
    (
        "out-of-range numbers",
        with_body(method, &path, body.as_bytes()),
        Mode::Read,
    )
}

/// Well-formed JSON of the wrong types or with unknown and duplicate fields.
pub fn wrong_types(rng: &mut Rng) -> Malformed {
    let encrypt = probe_path("encrypt");
    let decrypt = probe_path("decrypt");
    let fr = target_key();
    let fr_rotate = format!("{fr}/rotate");
    let cases: [(&str, &str, &str); 20] = [
        ("POST", &encrypt, "{\"plaintext\":5}"),
        ("POST", &encrypt, "{\"plaintext\":null}"),
        ("POST", &encrypt, "{\"plaintext\":[\"a\"]}"),
        ("POST", &encrypt, "{\"plaintext\":{\"a\":1}}"),
        ("POST", &encrypt, "[]"),
        ("POST", &encrypt, "\"str\""),
        ("POST", &encrypt, "null"),
        ("POST", &decrypt, "{\"ciphertext\":5,\"version\":\"1\"}"),
        ("POST", &decrypt, "{\"batch\":\"x\"}"),
        ("POST", &decrypt, "{\"batch\":[1,\"a\",null,{}]}"),
        ("POST", &fr, "{\"type\":5}"),
        ("POST", &fr, "{\"type\":null,\"rotation_period_days\":30}"),
        (
            "POST",
            &fr,
            "{\"type\":\"incountry-managed\",\"rotation_period_days\":\"30\"}",
        ),
        (
            "POST",
            &fr,
            "{\"type\":\"incountry-managed\",\"rotation_period_days\":30,\"x\":1}",
        ),
        ("POST", &fr, "{\"type\":\"aws\"}"),
        ("POST", &fr_rotate, "{\"rotation_period_days\":[30]}"),
        ("POST", &fr_rotate, "null"),
        ("PATCH", &fr, "{\"rotation_period_days\":true}"),
        (
            "PATCH",
            &fr,
            "{\"rotation_period_days\":30,\"rotation_period_days\":60}",
        ),
        ("PATCH", &fr, "[30]"),
    ];
    let (method, path, body) = *rng.pick(&cases);
    (
        "wrong JSON types",
        with_body(method, path, body.as_bytes()),
        Mode::Read,
    )
}

/// A JSON route with random bytes as its body.
pub fn random_json(rng: &mut Rng) -> Malformed {
    let decrypt = probe_path("decrypt");
    let fr = target_key();
    let n = 1 + rng.below(2048) as usize;
    let junk = rng.bytes(n);
    let path = if rng.below(2) == 0 { &decrypt } else { &fr };
    (
        "random JSON body",
        with_body("POST", path, &junk),
        Mode::Read,
    )
}

/// Decrypt batches of 1,000 and 1,001 items that cannot be decrypted.
pub fn garbage_batches(rng: &mut Rng) -> Malformed {
    let decrypt = probe_path("decrypt");
    let item = r#"{"ciphertext":"2:AAAA","version":4294967295}"#;
    let n = if rng.below(2) == 0 { 1001 } else { 1000 };
    let body = format!("{{\"batch\":[{}]}}", vec![item; n].join(","));
    (
        "batches of garbage",
        with_body("POST", &decrypt, body.as_bytes()),
        Mode::Read,
    )
}
