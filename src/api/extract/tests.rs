//! Unit tests of request extraction: the body's JSON rules and error codes, query
//! parameters and the verification headers.

use super::*;
use crate::proto::{CreateKeyRequest, PeriodRequest};

fn code_of<T: DeserializeOwned>(body: &str) -> Code {
    match parse_json::<T>(body.as_bytes()) {
        Ok(_) => panic!("{body} should be refused"),
        Err(e) => e.code(),
    }
}

#[test]
fn a_blank_body_is_none_and_only_objects_are_read() {
    assert!(parse_json::<PeriodRequest>(b"").unwrap().is_none());
    assert!(parse_json::<PeriodRequest>(b" \n\t").unwrap().is_none());
    let p = parse_json::<PeriodRequest>(br#"{"rotation_period_days": 60}"#)
        .unwrap()
        .unwrap();
    assert_eq!(p.rotation_period_days, Some(60));
    // serde would read an array positionally: refused as not an object.
    assert_eq!(code_of::<PeriodRequest>("[60]"), Code::InvalidRequest);
    assert_eq!(code_of::<PeriodRequest>("60"), Code::InvalidRequest);
    assert_eq!(code_of::<PeriodRequest>("\"x\""), Code::InvalidRequest);
    assert_eq!(code_of::<PeriodRequest>("[60"), Code::MalformedJson);
    assert_eq!(code_of::<PeriodRequest>("nope"), Code::MalformedJson);
    let e = parse_json::<PeriodRequest>(b"\xff\xfe").unwrap_err();
    assert_eq!(e.code(), Code::MalformedJson);
    assert_eq!(e.to_string(), "request body is not valid JSON");
}

#[test]
fn serde_errors_become_their_codes() {
    assert_eq!(code_of::<PeriodRequest>("{"), Code::MalformedJson);
    assert_eq!(
        code_of::<PeriodRequest>(r#"{"rotation_period_days" 1}"#),
        Code::MalformedJson
    );
    assert_eq!(
        code_of::<PeriodRequest>(r#"{"colour": 1}"#),
        Code::UnknownField
    );
    assert_eq!(
        code_of::<PeriodRequest>(r#"{"rotation_period_days": 30, "rotation_period_days": 60}"#),
        Code::DuplicateField
    );
    assert_eq!(
        code_of::<PeriodRequest>(r#"{"rotation_period_days": "30"}"#),
        Code::InvalidRequest
    );
    // A missing required field is an invalid request (the aws fields have codes of their
    // own, given by the handler).
    assert_eq!(
        code_of::<CreateKeyRequest>(r#"{"rotation_period_days": 30}"#),
        Code::InvalidRequest
    );
    let e = parse_json::<PeriodRequest>(br#"{"colour": 1}"#).unwrap_err();
    assert!(e.to_string().starts_with("unknown field `colour`"), "{e}");
    let e = parse_json::<PeriodRequest>(b"{").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("request body is not valid JSON: "),
        "{e}"
    );
}

#[test]
fn faults_by_kind() {
    let fault_of = |t: &str| fault(&serde_json::from_str::<PeriodRequest>(t).unwrap_err());
    assert_eq!(fault_of("{"), Fault::Syntax);
    assert_eq!(fault_of("{]"), Fault::Syntax);
    assert_eq!(fault_of(r#"{"x":1}"#), Fault::UnknownField);
    assert_eq!(
        fault_of(r#"{"rotation_period_days":1,"rotation_period_days":1}"#),
        Fault::DuplicateField
    );
    assert_eq!(fault_of(r#"{"rotation_period_days":-1}"#), Fault::Other);
    let e = serde_json::from_str::<crate::proto::ClockRequest>("{}").unwrap_err();
    assert_eq!(fault(&e), Fault::MissingField);
}

#[test]
fn query_parameters() {
    assert_eq!(query_param(Some("a=1&since=5"), "since"), Some("5"));
    assert_eq!(query_param(Some("since=5&since=6"), "since"), Some("5"));
    assert_eq!(query_param(Some("sinces=5"), "since"), None);
    assert_eq!(query_param(Some("since"), "since"), None);
    assert_eq!(query_param(None, "since"), None);

    assert_eq!(wait_param(None).unwrap(), None);
    assert_eq!(wait_param(Some("x=1")).unwrap(), None);
    assert_eq!(
        wait_param(Some("wait=300")).unwrap(),
        Some(Duration::from_secs(300))
    );
    assert_eq!(
        wait_param(Some("a=b&wait=1")).unwrap(),
        Some(Duration::from_secs(1))
    );
    for bad in [
        "wait=0", "wait=301", "wait=", "wait=-1", "wait=1.5", "wait=ten",
    ] {
        assert_eq!(
            wait_param(Some(bad)).unwrap_err().code(),
            Code::InvalidWait,
            "{bad}"
        );
    }

    assert_eq!(since_param(None).unwrap(), 0);
    assert_eq!(since_param(Some("since=42")).unwrap(), 42);
    for bad in ["since=-1", "since=x", "since="] {
        assert_eq!(
            since_param(Some(bad)).unwrap_err().code(),
            Code::InvalidSince,
            "{bad}"
        );
    }
}

#[test]
fn verification_headers() {
    let req = Request::builder()
        .header("X-Verification-Code", "123456")
        .header("x-verification-uid", " 1000 ")
        .header("if-none-match", "\"abc\"")
        .body(())
        .unwrap();
    assert_eq!(verification_code(&req), Some("123456"));
    assert_eq!(if_none_match(&req).as_deref(), Some("\"abc\""));
    let uid = voucher_header(&req).unwrap();
    assert_eq!(voucher_uid(uid).unwrap(), 1000);

    let bare = Request::builder().body(()).unwrap();
    assert_eq!(verification_code(&bare), None);
    assert!(voucher_header(&bare).is_none());
    assert!(if_none_match(&bare).is_none());

    for bad in ["", "root", "-1", "1e3", "99999999999", "１"] {
        let v = HeaderValue::from_bytes(bad.as_bytes()).unwrap();
        assert_eq!(
            voucher_uid(&v).unwrap_err().code(),
            Code::InvalidVerificationUid,
            "{bad}"
        );
    }
}
