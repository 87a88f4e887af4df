//! Request path normalization for authorization, so that `//admin`, `/./admin` and
//! `/%61dmin` cannot slip past a rule written for `/admin`.
//!
//! The semantics are Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action: REJECT_REQUEST`, which is what Istio recommends for
//! authorization (istio.io "Authorization Policy Normalization", `NORMALIZE_AND_MERGE_SLASHES`
//! with escaped slashes rejected):
//!
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every other
//!   escape is kept, with its hex digits upper-cased (`%2f` never becomes `/`);
//! - `%2F` and `%5C` (an escaped `/` or `\`) and a literal `\` are rejected, as are malformed
//!   escapes and control characters (raw or escaped);
//! - runs of `/` are merged, then `.` and `..` segments are removed (RFC 3986 5.2.4);
//! - the result always starts with `/`; case is kept (paths are case-sensitive).
//!
//! `;` is an ordinary character here: `/admin;x` stays `/admin;x`. The inbound policy step
//! ([`super::inbound`]) then matches policies against the path without `;` parameters, so that
//! a rule for `/admin` covers `/admin;x` (which many servers take for `/admin`), while the
//! application receives the normalized path with its parameters. The request should be
//! forwarded with the normalized path, so that the application serves what the policy saw.

/// Why a path was refused; the request should be rejected (400), not evaluated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C`: an escaped `/` or `\`, which servers disagree on.
    #[error("escaped slash or backslash ({0}) in the path")]
    EscapedSlash(String),
    /// A literal `\`, which some servers treat as `/`.
    #[error("backslash in the path")]
    Backslash,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-escape at byte {0} of the path")]
    BadEscape(usize),
    /// A control character, raw or escaped (`%00`-`%1F`, `%7F`).
    #[error("control character in the path")]
    Control,
}

/// The normalized form of a request path (the part before `?` and `#`), or why it is refused.
///
/// Idempotent: a normalized path normalizes to itself.
pub fn normalize(raw_path: &str) -> Result<String, PathError> {
    let end = raw_path.find(['?', '#']).unwrap_or(raw_path.len());
    let path = &raw_path[..end];
    if is_plain(path) {
        return Ok(path.to_string());
    }
    let decoded = decode_unreserved(path)?;
    Ok(remove_dot_segments(&decoded))
}

/// Whether `path` is already normal, as most request paths are: absolute, printable ASCII
/// without `%` or `\`, no empty, `.` or `..` segment. Such a path normalizes to itself, and
/// skipping the two passes is most of what normalization costs a request.
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'%' && b != b'\\')
        && !path.contains("//")
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Decodes escaped unreserved characters, upper-cases the rest, refuses the dangerous ones.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(PathError::BadEscape(i)),
                };
                let value = match (hex(hi), hex(lo)) {
                    (Some(h), Some(l)) => h * 16 + l,
                    _ => return Err(PathError::BadEscape(i)),
                };
                if value == b'/' || value == b'\\' {
                    return Err(PathError::EscapedSlash(path[i..i + 3].to_string()));
                }
                if value.is_ascii_control() {
                    return Err(PathError::Control);
                }
                if is_unreserved(value) {
                    out.push(char::from(value));
                } else {
                    out.push('%');
                    out.push(char::from(hi.to_ascii_uppercase()));
                    out.push(char::from(lo.to_ascii_uppercase()));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if b.is_ascii_control() => return Err(PathError::Control),
            _ => {
                // Copy the whole (possibly multi-byte) character.
                let len = path[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&path[i..i + len]);
                i += len;
            }
        }
    }
    Ok(out)
}

/// Merges slashes and resolves `.` / `..`; a trailing `/` (or a final `.`/`..`) is kept as `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        trailing_slash = false;
        match segment {
            "." => trailing_slash = true,
            ".." => {
                kept.pop();
                trailing_slash = true;
            }
            s => kept.push(s),
        }
    }
    if path.ends_with('/') {
        trailing_slash = true;
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_attempts_all_normalize_to_admin() {
        for raw in [
            "/admin",
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/x/y/../../admin",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/%2e/admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/../admin",
            "admin",
            "/admin?x=1",
            "/admin#frag",
            "/admin?a=/../b",
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok("/admin"), "{raw}");
        }
    }

    #[test]
    fn escaped_slashes_and_backslashes_are_refused() {
        for (raw, want) in [
            ("/%2Fadmin", PathError::EscapedSlash("%2F".into())),
            ("/%2fadmin", PathError::EscapedSlash("%2f".into())),
            ("/%5Cadmin", PathError::EscapedSlash("%5C".into())),
            ("/%5cadmin", PathError::EscapedSlash("%5c".into())),
            ("/\\admin", PathError::Backslash),
            ("/admin%", PathError::BadEscape(6)),
            ("/admin%4", PathError::BadEscape(6)),
            ("/admin%zz", PathError::BadEscape(6)),
            ("/ad\0min", PathError::Control),
            ("/ad\nmin", PathError::Control),
            ("/ad%00min", PathError::Control),
            ("/ad%7fmin", PathError::Control),
        ] {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn case_semicolons_and_other_escapes_are_kept() {
        for (raw, want) in [
            ("/ADMIN", "/ADMIN"),
            ("/admin;x", "/admin;x"),
            ("/admin;x/../y", "/y"),
            ("/a%20b", "/a%20b"),
            ("/a%3bb", "/a%3Bb"),
            ("/a%25", "/a%25"),
            ("/a%252e%252e/", "/a%252e%252e/"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("", "/"),
            ("/", "/"),
            ("/..", "/"),
            ("/a/", "/a/"),
            ("/a/.", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a//b//", "/a/b/"),
            ("/~user/%7Efoo", "/~user/~foo"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Paths built from the pieces that matter to normalization.
    fn raw_path() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "%41", "%7e", "%3b", "%25", "%2f", "%5c",
            "%", "%z", "\\", "a", "B", "admin", ";", "~", "-", "_", "?", "#", " ", "\u{e9}", "%20",
        ]);
        prop::collection::vec(piece, 0..16).prop_map(|p| p.concat())
    }

    proptest! {
        /// Normalizing twice changes nothing.
        #[test]
        fn idempotent(raw in raw_path()) {
            if let Ok(once) = normalize(&raw) {
                prop_assert_eq!(normalize(&once), Ok(once.clone()));
            }
        }

        /// The output is absolute, has no empty, `.` or `..` segment, and no escaped unreserved
        /// character.
        #[test]
        fn output_is_canonical(raw in raw_path()) {
            if let Ok(out) = normalize(&raw) {
                prop_assert!(out.starts_with('/'), "{out}");
                prop_assert!(!out.contains("//"), "{out}");
                prop_assert!(!out.contains('\\'), "{out}");
                prop_assert!(!out.contains('?') && !out.contains('#'), "{out}");
                for segment in out.split('/') {
                    prop_assert!(segment != "." && segment != "..", "{out}");
                }
                prop_assert!(!out.to_ascii_lowercase().contains("%2e"), "{out}");
            }
        }

        /// The shortcut for plain paths gives what the full normalization gives.
        #[test]
        fn the_plain_path_shortcut_agrees(raw in raw_path()) {
            let end = raw.find(['?', '#']).unwrap_or(raw.len());
            let full = decode_unreserved(&raw[..end]).map(|d| remove_dot_segments(&d));
            prop_assert_eq!(normalize(&raw), full);
        }

        /// Arbitrary text never panics.
        #[test]
        fn total(raw in any::<String>()) {
            let _ = normalize(&raw);
        }
    }
}
