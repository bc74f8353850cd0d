//! One line of the input: its fields in file order with their exact text, and what is to be
//! done with it (decided without the daemon).

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's fields in file order, each value as its exact text.
pub(super) struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push((k, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl Fields {
    pub(super) fn get(&self, name: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }
}

/// What is to be done with one line.
pub(super) enum Plan {
    /// Written back as read: blank, already current, or failed before asking the daemon.
    Keep,
    Fail(String),
    /// Sent to the daemon: the record's fields and the record strings to rewrap
    /// (`body`, then `precommit_body` when it is a string).
    Rewrap {
        fields: Fields,
        items: Vec<(&'static str, String)>,
    },
}

pub(super) struct Line {
    pub(super) number: u64,
    pub(super) text: String,
    /// "\n", "\r\n" or "" (last line without one).
    pub(super) end: &'static str,
    pub(super) plan: Plan,
}

/// Decides what to do with a line, without the daemon.
pub(super) fn plan(text: &str, active: u32) -> Plan {
    if text.trim().is_empty() {
        return Plan::Keep;
    }
    let fields: Fields = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(_) => return Plan::Fail("not a JSON object".into()),
    };
    let version = match fields
        .get("version")
        .map(|v| serde_json::from_str::<u32>(v.get()))
    {
        Some(Ok(v)) => v,
        Some(Err(_)) => return Plan::Fail("\"version\" is not a non-negative integer".into()),
        None => return Plan::Fail("no \"version\" field".into()),
    };
    let mut items = Vec::new();
    for name in ["body", "precommit_body"] {
        match fields
            .get(name)
            .map(|v| serde_json::from_str::<Option<String>>(v.get()))
        {
            Some(Ok(Some(s))) => items.push((name, s)),
            Some(Ok(None)) | None if name == "precommit_body" => {}
            None => return Plan::Fail("no \"body\" field".into()),
            _ => return Plan::Fail(format!("\"{name}\" is not a string")),
        }
    }
    let current = version == active && items.iter().all(|(_, s)| s.starts_with("2:"));
    if current {
        Plan::Keep
    } else {
        Plan::Rewrap { fields, items }
    }
}

/// Sets field `name` to `json` (JSON text), in its place, or last when the line has none.
pub(super) fn set(fields: &mut Fields, name: &str, json: String) -> anyhow::Result<()> {
    let raw = RawValue::from_string(json)?;
    match fields.0.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = raw,
        None => fields.0.push((name.to_string(), raw)),
    }
    Ok(())
}

/// The line again: its fields in their order, each value as its text.
pub(super) fn render(fields: &Fields) -> anyhow::Result<String> {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.0.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&serde_json::to_string(k)?);
        s.push(':');
        s.push_str(v.get());
    }
    s.push('}');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_lines() {
        assert!(matches!(plan("   ", 3), Plan::Keep));
        assert!(matches!(
            plan(r#"{"body":"2:x","version":3}"#, 3),
            Plan::Keep
        ));
        assert!(matches!(
            plan(r#"{"body":"2:x","version":2}"#, 3),
            Plan::Rewrap { .. }
        ));
        // An unencrypted record at the active version still gets encrypted.
        assert!(matches!(
            plan(r#"{"body":"pt:eA==","version":3}"#, 3),
            Plan::Rewrap { .. }
        ));
        match plan(r#"{"body":"2:x","precommit_body":"2:y","version":1}"#, 3) {
            Plan::Rewrap { items, .. } => assert_eq!(items.len(), 2),
            _ => panic!("expected a rewrap"),
        }
        match plan(r#"{"body":"2:x","precommit_body":null,"version":1}"#, 3) {
            Plan::Rewrap { items, .. } => assert_eq!(items.len(), 1),
            _ => panic!("expected a rewrap"),
        }
        for (bad, why) in [
            ("nope", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"body":"2:x"}"#, "no \"version\" field"),
            (
                r#"{"body":"2:x","version":-1}"#,
                "not a non-negative integer",
            ),
            (r#"{"version":1}"#, "no \"body\" field"),
            (r#"{"body":5,"version":1}"#, "\"body\" is not a string"),
        ] {
            match plan(bad, 3) {
                Plan::Fail(reason) => assert!(reason.contains(why), "{bad}: {reason}"),
                _ => panic!("{bad} should fail"),
            }
        }
    }

    #[test]
    fn renders_fields_in_order_with_exact_values() {
        let text =
            r#"{"record_key":"k1","body":"2:old","n":1.50,"nested":{"b":1,"a":[1,2]},"version":1}"#;
        let mut f: Fields = serde_json::from_str(text).unwrap();
        assert_eq!(render(&f).unwrap(), text);
        set(&mut f, "body", "\"2:new\"".into()).unwrap();
        set(&mut f, "version", "4".into()).unwrap();
        assert_eq!(
            render(&f).unwrap(),
            r#"{"record_key":"k1","body":"2:new","n":1.50,"nested":{"b":1,"a":[1,2]},"version":4}"#
        );
    }
}
