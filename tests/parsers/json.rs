//! JSON oracles, written apart from the daemon: what a JSON text is (RFC 8259), serde's
//! view of a struct's fields, and objects with a key twice.

use incountry_keyd::domain::Code;
use serde_json::Value;

/// Whether `bytes` is one JSON text as RFC 8259 defines it: UTF-8 (section 8.1) and the
/// grammar, with no limit on nesting or on the size of a number (those are a parser's
/// limits: serde_json's `Value` stops at 128 levels and at numbers beyond f64).
pub fn is_json_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok() && json_grammar(bytes)
}

/// The RFC 8259 grammar over bytes: a string may hold any byte but `"`, `\` and controls,
/// valid UTF-8 or not.
fn json_grammar(bytes: &[u8]) -> bool {
    let mut g = Grammar { b: bytes, i: 0 };
    g.ws();
    let ok = g.value();
    g.ws();
    ok && g.i == bytes.len()
}

struct Grammar<'a> {
    b: &'a [u8],
    i: usize,
}

impl Grammar<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += hit as usize;
        hit
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self) -> bool {
        match self.peek() {
            Some(b'{') => self.members(b'}', |g| {
                g.string()
                    && {
                        g.ws();
                        g.eat(b':')
                    }
                    && {
                        g.ws();
                        g.value()
                    }
            }),
            Some(b'[') => self.members(b']', Self::value),
            Some(b'"') => self.string(),
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            _ => self.number(),
        }
    }

    /// After the opening bracket: `ws [ member *( ws , ws member ) ws ] close`.
    fn members(&mut self, close: u8, member: fn(&mut Self) -> bool) -> bool {
        self.i += 1;
        self.ws();
        if self.eat(close) {
            return true;
        }
        loop {
            if !member(self) {
                return false;
            }
            self.ws();
            if self.eat(close) {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
            self.ws();
        }
    }

    fn word(&mut self, w: &[u8]) -> bool {
        let hit = self.b[self.i..].starts_with(w);
        self.i += if hit { w.len() } else { 0 };
        hit
    }

    fn string(&mut self) -> bool {
        if !self.eat(b'"') {
            return false;
        }
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        // Any four hex digits: the grammar has no opinion on lone surrogates.
                        Some(b'u') => {
                            let hex = self.b.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return false;
                            }
                            self.i += 5;
                        }
                        _ => return false,
                    }
                }
                Some(c) if c < 0x20 => return false,
                Some(_) => self.i += 1,
            }
        }
    }

    /// `[ - ] ( 0 / [1-9] *DIGIT ) [ . 1*DIGIT ] [ (e/E) [ + / - ] 1*DIGIT ]`
    fn number(&mut self) -> bool {
        self.eat(b'-');
        if !self.eat(b'0') && self.digits() == 0 {
            return false;
        }
        if self.eat(b'.') && self.digits() == 0 {
            return false;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return false;
            }
        }
        true
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }
}

/// What a body field must be: serde's view of `Option<u32>`, `String` and so on, written
/// out independently.
#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    OptStr,
    OptU32,
}

fn type_ok(ty: Ty, v: Option<&Value>) -> bool {
    match (ty, v) {
        (Ty::Str, Some(Value::String(_))) => true,
        (Ty::Str, _) => false,
        (_, None | Some(Value::Null)) => true,
        (Ty::OptStr, Some(v)) => v.is_string(),
        (Ty::OptU32, Some(v)) => v.as_u64().is_some_and(|n| n <= u32::MAX as u64),
    }
}

/// The codes a JSON value may get from a `deny_unknown_fields` struct of these fields:
/// empty when it parses. (With several faults serde reports the first it meets, so any of
/// them may come back.)
pub fn shape_faults(v: &Value, fields: &[(&str, Ty)]) -> Vec<Code> {
    let mut faults = Vec::new();
    let Some(obj) = v.as_object() else {
        return vec![Code::InvalidRequest];
    };
    if obj.keys().any(|k| !fields.iter().any(|(f, _)| f == k)) {
        faults.push(Code::UnknownField);
    }
    if fields.iter().any(|(f, ty)| !type_ok(*ty, obj.get(*f))) {
        faults.push(Code::InvalidRequest);
    }
    faults
}

/// Whether a JSON text has an object with a key twice (serde's typed parse refuses it).
pub fn has_duplicate_keys(body: &[u8]) -> bool {
    // Re-serializing through a Value drops duplicates; compare key counts.
    fn count(v: &Value) -> usize {
        match v {
            Value::Object(m) => m.len() + m.values().map(count).sum::<usize>(),
            Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let keys = count_keys(&mut de).unwrap_or(usize::MAX);
    keys != count(&v)
}

/// Counts every object key in a JSON text, duplicates included.
fn count_keys(de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>) -> Option<usize> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Counter;
    impl<'de> Visitor<'de> for Counter {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while map.next_key::<IgnoredAny>()?.is_some() {
                n += 1 + map.next_value_seed(Seed)?;
            }
            Ok(n)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(k) = seq.next_element_seed(Seed)? {
                n += k;
            }
            Ok(n)
        }
        fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_str<E>(self, _: &str) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_unit<E>(self) -> Result<usize, E> {
            Ok(0)
        }
    }
    struct Seed;
    impl<'de> serde::de::DeserializeSeed<'de> for Seed {
        type Value = usize;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_any(Counter)
        }
    }
    de.deserialize_any(Counter).ok()
}
