//! Unit tests of the record handlers: size bounds, duplicate fields, the encryption budget.

use super::*;

#[test]
fn largest_record_fits_a_batch_of_one() {
    let max_body = 1024 * 1024;
    let n = max_plaintext(max_body);
    assert_eq!(n, 786_301);
    let ct = crypto::encrypt(&[3u8; 32], &vec![b'a'; n]).unwrap();
    let request = json!({"batch": [{"ciphertext": ct, "version": u32::MAX}]}).to_string();
    assert!(request.len() <= max_body, "{}", request.len());
    let ct = crypto::encrypt(&[3u8; 32], &vec![b'a'; n + 3]).unwrap();
    let request = json!({"batch": [{"ciphertext": ct, "version": u32::MAX}]}).to_string();
    assert!(request.len() > max_body);
    assert_eq!(max_plaintext(10), 0);
}

#[test]
fn a_field_twice_is_refused_at_any_depth() {
    let parse = |t: &str| serde_json::from_str::<RecordsBody>(t).map(|b| b.0);
    for dup in [
        r#"{"plaintext":"a","plaintext":"b"}"#,
        r#"{"ciphertext":"2:x","version":1,"version":2}"#,
        r#"{"batch":[{"plaintext":"a"}],"batch":[]}"#,
        r#"{"batch":[{"plaintext":"a"},{"plaintext":"a","plaintext":"b"}]}"#,
        r#"{"batch":[{"x":{"y":1,"y":2}}]}"#,
    ] {
        let e = parse(dup).unwrap_err();
        assert!(e.to_string().starts_with("duplicate field"), "{dup}: {e}");
        assert_eq!(e.classify(), serde_json::error::Category::Data, "{dup}");
    }
    let e = parse(&format!(r#"{{"{0}":1,"{0}":2}}"#, "k".repeat(100))).unwrap_err();
    assert!(!e.to_string().contains("kkkk"), "{e}");
    // Everything else reads as serde_json reads it.
    for ok in [
        r#"{"plaintext":"a"}"#,
        r#"{"batch":[{"plaintext":"a"},{"plaintext":"a"}],"x":[1,-2,3.5,null,true,{"a":{}}]}"#,
        r#"[{"a":1},{"a":1}]"#,
        r#""text""#,
        r#"18446744073709551615"#,
    ] {
        assert_eq!(
            parse(ok).unwrap(),
            serde_json::from_str::<Value>(ok).unwrap(),
            "{ok}"
        );
    }
    assert_eq!(
        parse("{\"a\":").unwrap_err().classify(),
        serde_json::error::Category::Eof
    );
}

#[test]
fn budget_refuses_once_spent() {
    let id = KeyId::parse("p", "DE").unwrap();
    let key = KeyState {
        id,
        rotation_period_days: Some(30),
        created: 0,
        unavailable_reason: None,
        versions: Vec::new(),
    };
    let mut b = Budget { left: 2, limit: 8 };
    b.take(&key, 3).unwrap();
    b.take(&key, 3).unwrap();
    let e = b.take(&key, 3).unwrap_err();
    assert_eq!(e.code(), crate::domain::Code::EncryptionLimit);
    assert_eq!(response::status_of(&e), StatusCode::CONFLICT);
    let msg = e.to_string();
    assert!(
        msg.contains("p/DE version 3") && msg.contains("rotate"),
        "{msg}"
    );
}
