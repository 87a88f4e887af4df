//! Small types several kinds share: Istio's `StringMatch`, `Percent` and `PortSelector`, and
//! the checks `validate()` methods use. A check returns `(field path, message)`.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// A validation failure: the field path and what is wrong.
pub type Invalid = (String, String);

/// Istio's `StringMatch`: exactly one of `exact`, `prefix` or `regex`. Regexes use RE2 syntax
/// and must match the whole value (as in Istio/Envoy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The whole value matches this regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

impl StringMatch {
    /// Whether none of the three is set (`{}`: for headers, "the header is present").
    pub fn is_empty(&self) -> bool {
        self.exact.is_none() && self.prefix.is_none() && self.regex.is_none()
    }

    /// Checks that exactly one of the three is set (at most one when `allow_empty`), and that
    /// a regex compiles.
    pub fn validate(&self, path: &str, allow_empty: bool) -> Result<(), Invalid> {
        let set = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.regex.is_some(),
        ]
        .into_iter()
        .filter(|s| *s)
        .count();
        if set > 1 || (set == 0 && !allow_empty) {
            return Err((
                path.to_string(),
                "set exactly one of exact, prefix or regex".into(),
            ));
        }
        match &self.regex {
            Some(re) => check_regex(re, &format!("{path}.regex")),
            None => Ok(()),
        }
    }
}

/// Checks that `re` compiles (RE2 syntax; a bounded program size, like Envoy's limit).
pub fn check_regex(re: &str, path: &str) -> Result<(), Invalid> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|e| {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or("").trim();
            let last = last.strip_prefix("error: ").unwrap_or(last);
            (path.to_string(), format!("invalid regex {re:?}: {last}"))
        })
}

/// Istio's `Percent`: `{ value: 0.0..=100.0 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    /// The percentage.
    pub value: f64,
}

impl Percent {
    /// Checks the range.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        check_percent(self.value, &format!("{path}.value"))
    }
}

/// Checks that `value` is a percentage (0..=100).
pub fn check_percent(value: f64, path: &str) -> Result<(), Invalid> {
    if (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err((
            path.to_string(),
            format!("{value} is not a percentage (0..=100)"),
        ))
    }
}

/// Istio's `PortSelector`: `{ number: 8080 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// The port.
    pub number: u32,
}

/// Checks that `port` is 1..=65535.
pub fn check_port(port: u32, path: &str) -> Result<(), Invalid> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err((path.to_string(), format!("port {port} is not in 1..=65535")))
    }
}

/// Checks that `value` is not empty.
pub fn check_non_empty(value: &str, path: &str, what: &str) -> Result<(), Invalid> {
    if value.trim().is_empty() {
        Err((path.to_string(), format!("{what} must not be empty")))
    } else {
        Ok(())
    }
}

/// A field Istio (or Gateway API) defines that this version of Trellis does not support yet.
/// Absent, it is `None`; present, it is an error naming the field and its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Unsupported {}

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through `deserialize_any` so that the error carries this node's line.
        d.deserialize_any(Refuse)
    }
}

struct Refuse;

impl Refuse {
    fn err<E: serde::de::Error>(self) -> Result<Unsupported, E> {
        Err(E::custom("not supported by this version of trellis yet"))
    }
}

impl<'de> serde::de::Visitor<'de> for Refuse {
    type Value = Unsupported;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field trellis supports")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Unsupported, E> {
        self.err()
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
        self.err()
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
        self.err()
    }
}
