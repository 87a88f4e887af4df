//! Finds the line of a field path such as `spec.http[0].route[1].weight` in one YAML
//! document, so that errors found after deserializing (in `validate`) point at the offending
//! line rather than at the start of the document.
//!
//! It walks the document with serde and, at the node the path names, fails on purpose: the
//! YAML deserializer attaches that node's position to the error.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Marks the deliberate failure, so that it cannot be mistaken for another error.
const FOUND: &str = "\u{1}trellis-locate-found";

#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Splits `a.b[0].c` into segments; `None` when the path is not of that shape.
fn segments(path: &str) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Seg::Key(key.to_string()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let (index, tail) = r.split_once(']')?;
            out.push(Seg::Index(index.parse().ok()?));
            rest = tail;
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(out)
}

/// The 1-based line, within `doc`, of the node `path` names, or of its deepest ancestor found.
pub(super) fn line_of(doc: &str, path: &str) -> Option<usize> {
    let segs = segments(path)?;
    (1..=segs.len()).rev().find_map(|n| probe(doc, &segs[..n]))
}

/// The 1-based line of the node `path` names, only when it is there.
pub(super) fn exact_line_of(doc: &str, path: &str) -> Option<usize> {
    probe(doc, &segments(path)?)
}

fn probe(doc: &str, path: &[Seg]) -> Option<usize> {
    if path.is_empty() {
        return None;
    }
    let de = serde_yaml_ng::Deserializer::from_str(doc);
    match (Probe { path }).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| l.line()),
        _ => None,
    }
}

/// Walks towards `path`; `Ok(())` when it is not there.
struct Probe<'a> {
    path: &'a [Seg],
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            d.deserialize_any(Hit)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            match &self.path[0] {
                Seg::Key(k) if *k == key.0 => {
                    return map.next_value_seed(Probe {
                        path: &self.path[1..],
                    })
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            if self.path[0] == Seg::Index(i) {
                return seq
                    .next_element_seed(Probe {
                        path: &self.path[1..],
                    })
                    .map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The node the path names: fail here (every `visit_*` defaults to an error).
struct Hit;

impl Visitor<'_> for Hit {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }
}

/// A mapping key as text (YAML keys may be numbers or booleans).
struct Key(String);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Key, E> {
                Ok(Key("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_fields_and_falls_back_to_ancestors() {
        let doc = "kind: X\nspec:\n  http:\n  - route:\n    - weight: 90\n    - weight: 120\n  ports:\n    8080: { mode: STRICT }\n";
        assert_eq!(line_of(doc, "spec.http[0].route[1].weight"), Some(6));
        assert_eq!(line_of(doc, "spec.http[0].route[0]"), Some(5));
        assert_eq!(line_of(doc, "spec.ports.8080.mode"), Some(8));
        assert_eq!(line_of(doc, "spec.http[0].nothing"), Some(4));
        assert_eq!(
            line_of(doc, "spec.http[3]"),
            Some(4),
            "the sequence starts at its first item"
        );
        assert_eq!(line_of(doc, "nothing"), None);
        assert_eq!(line_of(doc, "bad[x]"), None);
        assert_eq!(exact_line_of(doc, "spec.http[0].nothing"), None);
        assert_eq!(exact_line_of(doc, "spec.ports.8080"), Some(8));
    }
}
