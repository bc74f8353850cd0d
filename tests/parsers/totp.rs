//! Verification codes: the `X-Verification-Code` header over HTTP, and the code the
//! verifier checks, against a daemon with TOTP verification and this process enrolled.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use proptest::prelude::*;

use incountry_keyd::domain::Code;

use crate::daemon::{me, InProcess};
use crate::strategies::config;

/// Verification by TOTP, with this process's uid enrolled.
struct TotpDaemon {
    d: InProcess,
    totp: totp_rs::Totp,
}

fn totp_daemon() -> &'static TotpDaemon {
    static D: OnceLock<TotpDaemon> = OnceLock::new();
    D.get_or_init(|| {
        let d = InProcess::start("totp");
        let peer = me();
        // The first admin is enrolled by the offline bootstrap's path (no code from anyone).
        let enrollment = d
            .runtime
            .block_on(d.app.verifier.offline_enroll_begin(peer.uid))
            .unwrap();
        let secret = totp_rs::Secret::try_from_base32(&enrollment.secret_base32).unwrap();
        let totp = totp_rs::Builder::new()
            .with_algorithm(totp_rs::Algorithm::SHA1)
            .with_digits(6)
            .with_step_duration(30)
            .with_skew(1)
            .with_secret(secret)
            .build()
            .unwrap();
        let code = totp.generate(d.now() as u64).to_string();
        d.runtime
            .block_on(d.app.verifier.offline_enroll_confirm(
                peer.uid,
                &code,
                &incountry_keyd::domain::audit::Actor::of(&peer.caller()),
            ))
            .unwrap();
        // The key the header tests change, made through the API with a fresh code.
        d.clock.advance(30);
        let code = totp.generate(d.now() as u64).to_string();
        let r = d.request_with(
            "POST",
            "/v1/keys/header/DE",
            &[("X-Verification-Code", &code)],
            br#"{"type":"incountry-managed","rotation_period_days":30}"#,
        );
        r.assert_status(201);
        TotpDaemon { d, totp }
    })
}

impl TotpDaemon {
    /// Moves past any lockout and failure window and into unused TOTP steps; returns the
    /// codes the verifier accepts now (steps -1, 0, +1) and the one of them `pick` picks.
    fn next_window(&self, pick: prop::sample::Index) -> (BTreeSet<String>, String) {
        self.d.clock.advance(301);
        let now = self.d.now() as u64;
        let window: BTreeSet<String> = [now - 30, now, now + 30]
            .iter()
            .map(|t| self.totp.generate(*t).to_string())
            .collect();
        let code = window.iter().nth(pick.index(window.len())).unwrap().clone();
        (window, code)
    }
}

/// Header values: mutations of a code in the window (the interesting neighbours of a
/// valid code) and arbitrary bytes (no CR or LF: those would end the header line).
#[derive(Clone, Debug)]
enum CodeRecipe {
    Exact,
    /// Optional whitespace around it (not part of an HTTP field value).
    Padded(&'static str, &'static str),
    Prefix(String),
    Suffix(String),
    Insert(prop::sample::Index, String),
    Drop(prop::sample::Index),
    Replace(prop::sample::Index, char),
    /// Each digit as another script's digit (fullwidth, Arabic-Indic, superscript).
    Script(u32),
    Bytes(Vec<u8>),
    Text(String),
}

fn arb_code_recipe() -> impl Strategy<Value = CodeRecipe> {
    let bit = prop_oneof![
        prop::sample::select(vec![
            "+", "-", "0", "1", " ", "\t", "\u{0}", ".", "٠", "０", "\u{a0}", "x"
        ])
        .prop_map(str::to_string),
        "[0-9]{1,3}",
        ".{1,2}",
    ];
    prop_oneof![
        2 => Just(CodeRecipe::Exact),
        1 => (prop::sample::select(vec!["", " ", "\t", "  "]), prop::sample::select(vec!["", " ", "\t "]))
            .prop_map(|(a, b)| CodeRecipe::Padded(a, b)),
        2 => bit.clone().prop_map(CodeRecipe::Prefix),
        2 => bit.clone().prop_map(CodeRecipe::Suffix),
        2 => (any::<prop::sample::Index>(), bit).prop_map(|(i, s)| CodeRecipe::Insert(i, s)),
        1 => any::<prop::sample::Index>().prop_map(CodeRecipe::Drop),
        2 => (any::<prop::sample::Index>(), prop::char::any()).prop_map(|(i, c)| CodeRecipe::Replace(i, c)),
        1 => prop::sample::select(vec![0xff10u32, 0x0660, 0x2070]).prop_map(CodeRecipe::Script),
        2 => prop::collection::vec(any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'), 0..12)
            .prop_map(CodeRecipe::Bytes),
        1 => "[0-9]{6}".prop_map(CodeRecipe::Text),
    ]
}

fn make_code(recipe: &CodeRecipe, code: &str) -> Vec<u8> {
    let mut chars: Vec<char> = code.chars().collect();
    let s: String = match recipe {
        CodeRecipe::Exact => code.to_string(),
        CodeRecipe::Padded(a, b) => format!("{a}{code}{b}"),
        CodeRecipe::Prefix(p) => format!("{p}{code}"),
        CodeRecipe::Suffix(p) => format!("{code}{p}"),
        CodeRecipe::Insert(i, p) => {
            let at = i.index(chars.len() + 1);
            format!("{}{p}{}", &code[..at], &code[at..])
        }
        CodeRecipe::Drop(i) => {
            chars.remove(i.index(chars.len()));
            chars.into_iter().collect()
        }
        CodeRecipe::Replace(i, c) => {
            let at = i.index(chars.len());
            chars[at] = *c;
            chars.into_iter().collect()
        }
        CodeRecipe::Script(base) => code
            .chars()
            .map(|c| {
                let d = c.to_digit(10).unwrap();
                if *base == 0x2070 && (1..=3).contains(&d) {
                    ['¹', '²', '³'][d as usize - 1]
                } else {
                    char::from_u32(base + d).unwrap()
                }
            })
            .collect(),
        CodeRecipe::Bytes(b) => return b.clone(),
        CodeRecipe::Text(t) => t.clone(),
    };
    s.into_bytes()
}

/// The header value as HTTP hands it over: without optional whitespace around it.
fn field_value(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

proptest! {
    #![proptest_config(config(128))]

    /// Guards the `X-Verification-Code` header end to end (an admin settings change, over
    /// HTTP): any header value gets an answer (no panic); the change is made exactly when
    /// the value, without the optional whitespace HTTP puts around a field value, is 6
    /// ASCII digits equal to a code of the current window; anything else — a sign, a 7th
    /// digit, a dropped digit, fullwidth or Arabic-Indic digits, a space inside, NUL,
    /// obs-text bytes, an empty value — is refused (401 verification_failed or
    /// verification_required, or hyper's 400 for a malformed header) without a change.
    #[test]
    fn verification_header_only_takes_six_digits(recipe in arb_code_recipe(), pick in any::<prop::sample::Index>()) {
        let t = totp_daemon();
        let _one_at_a_time = t.d.exclusive();
        let (window, code) = t.next_window(pick);
        let value = make_code(&recipe, &code);
        let r = t.d.request_raw_header(
            "PATCH",
            "/v1/keys/header/DE",
            ("X-Verification-Code", &value),
            br#"{"rotation_period_days":60}"#,
        );
        let ctx = || format!("{:?} (window {:?}) -> {} {}", String::from_utf8_lossy(&value), window, r.status, String::from_utf8_lossy(&r.body));
        let field = field_value(&value);
        let well_formed = field.len() == 6 && field.iter().all(u8::is_ascii_digit);
        let valid = well_formed && window.contains(std::str::from_utf8(field).unwrap());
        if valid {
            prop_assert_eq!(r.status, 200, "{}", ctx());
        } else {
            let code = r.error_code();
            prop_assert!(
                (r.status == 401 && matches!(code, Some(Code::VerificationFailed | Code::VerificationRequired)))
                    || (r.status == 400 && r.body.is_empty()),
                "{}", ctx()
            );
            if !field.is_empty() && field.iter().all(|b| (0x20..0x7f).contains(b)) {
                // A readable, non-empty value reaches the verifier.
                prop_assert_eq!(code, Some(Code::VerificationFailed), "{}", ctx());
            }
        }
    }

    /// Guards the verifier's own reading of a code (what the header and `--code` reach,
    /// with any Unicode text): never a panic, and a code is accepted only when, trimmed,
    /// it is 6 ASCII digits of the current window. Fails if e.g. a '+' sign, other
    /// scripts' digits or a 7-digit string containing the code ever pass. (The trim is
    /// `str::trim`, Unicode whitespace included: "\u{a0}123456" passes here; over HTTP the
    /// header cannot carry it, the confirm body's `code` can.)
    #[test]
    fn verifier_only_takes_six_digits(recipe in arb_code_recipe(), pick in any::<prop::sample::Index>()) {
        let t = totp_daemon();
        let _one_at_a_time = t.d.exclusive();
        let (window, code) = t.next_window(pick);
        let value = String::from_utf8_lossy(&make_code(&recipe, &code)).into_owned();
        let result = t.d.runtime.block_on(t.d.app.verifier.check(&me().caller(), Some(&value), "settings"));
        let trimmed = value.trim();
        let valid = trimmed.len() == 6 && trimmed.bytes().all(|b| b.is_ascii_digit()) && window.contains(trimmed);
        match result {
            Ok(()) => prop_assert!(valid, "{:?} accepted (window {:?})", value, window),
            Err(e) => {
                prop_assert!(!valid, "{:?} refused: {}", value, e);
                let want = if trimmed.is_empty() { Code::VerificationRequired } else { Code::VerificationFailed };
                prop_assert_eq!(e.code(), want, "{:?}", value);
            }
        }
    }
}
