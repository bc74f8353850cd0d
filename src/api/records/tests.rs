//! Unit tests of the records body: duplicate fields at any depth, and each item's parse
//! errors (codes and messages that never quote a record).

use super::*;

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
        assert_eq!(fault(&e), Fault::DuplicateField, "{dup}");
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
    assert_eq!(fault(&parse("{\"a\":").unwrap_err()), Fault::Syntax);
}

fn item_error(op: Op, item: &str) -> Error {
    let value: Value = serde_json::from_str(item).unwrap();
    let errors: Vec<Error> = match items(op, vec![value]) {
        Items::Encrypt(v) => v.into_iter().filter_map(|r| r.err()).collect(),
        Items::Decrypt(v) | Items::Rewrap(v) => v.into_iter().filter_map(|r| r.err()).collect(),
    };
    errors.into_iter().next().expect("the item should fail")
}

#[test]
fn items_fail_with_their_code_and_the_expected_shape() {
    let e = item_error(Op::Encrypt, r#"{"plaintext":"a","x":1}"#);
    assert_eq!(e.code(), Code::UnknownField);
    assert!(e.to_string().starts_with("unknown field `x`"), "{e}");

    let e = item_error(Op::Decrypt, r#"{"version":1}"#);
    assert_eq!(e.code(), Code::InvalidRequest);
    assert_eq!(
        e.to_string(),
        "missing field `ciphertext`: expected {\"ciphertext\": string, \"version\": integer}"
    );

    // A type error quotes the value: only the shape is said.
    let e = item_error(
        Op::Rewrap,
        r#"{"ciphertext":"2:secret","version":"2:secret"}"#,
    );
    assert_eq!(e.code(), Code::InvalidRequest);
    assert!(!e.to_string().contains("secret"), "{e}");

    let e = item_error(Op::Encrypt, r#"["a"]"#);
    assert_eq!(e.code(), Code::InvalidRequest);
    assert_eq!(e.to_string(), "each item must be {\"plaintext\": string}");
}

#[test]
fn items_parse_into_the_operation_of_the_route() {
    let values = vec![
        serde_json::json!({"ciphertext": "2:x", "version": 3}),
        serde_json::json!({"ciphertext": "pt:eA=="}),
    ];
    match items(Op::Rewrap, values) {
        Items::Rewrap(v) => {
            let v: Vec<Sealed> = v.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!((v[0].ciphertext.as_str(), v[0].version), ("2:x", Some(3)));
            assert_eq!((v[1].ciphertext.as_str(), v[1].version), ("pt:eA==", None));
        }
        _ => panic!("expected rewrap items"),
    }
}
