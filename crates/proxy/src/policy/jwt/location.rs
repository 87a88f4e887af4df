//! Where tokens are found in a request: the locations the rules name (headers with an
//! optional prefix, query parameters, cookies) and the extraction of every token present.

use http::{HeaderMap, HeaderName};

/// Where a token may be, and the rules reading it there.
pub(super) struct Location {
    pub(super) place: Place,
    pub(super) rules: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// A header; the token follows `prefix` (`Bearer`: the scheme, case-insensitively).
    Header { name: HeaderName, prefix: Prefix },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Place {
    fn param(&self) -> Option<&str> {
        match self {
            Place::Param(n) => Some(n),
            _ => None,
        }
    }

    fn cookie(&self) -> Option<&str> {
        match self {
            Place::Cookie(n) => Some(n),
            _ => None,
        }
    }
}

/// What precedes the token in a header value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Prefix {
    /// Nothing: the whole value is the token.
    None,
    /// The `Bearer` scheme (RFC 6750; scheme names are case-insensitive) and a space.
    Bearer,
    /// This exact text, as configured.
    Exact(String),
}

impl Prefix {
    /// The token in `value`, if it carries this prefix, and how long the prefix was.
    fn strip<'v>(&self, value: &'v str) -> Option<(usize, &'v str)> {
        match self {
            Prefix::None => Some((0, value)),
            Prefix::Exact(p) => value.strip_prefix(p.as_str()).map(|t| (p.len(), t)),
            Prefix::Bearer => {
                let (scheme, rest) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some((scheme.len() + 1, rest))
            }
        }
    }
}

/// A token found in a request.
pub(super) struct Found<'r> {
    pub(super) token: std::borrow::Cow<'r, str>,
    pub(super) location: usize,
}

/// Every token in the request, at most one per header value, parameter or cookie (the
/// location with the longest matching prefix claims a header value).
pub(super) fn find_tokens<'r>(
    locations: &[Location],
    headers: &'r HeaderMap,
    query: Option<&'r str>,
) -> Vec<Found<'r>> {
    let mut found = Vec::new();
    let mut seen_headers: Vec<&HeaderName> = Vec::new();
    for loc in locations {
        let Place::Header { name, .. } = &loc.place else {
            continue;
        };
        if seen_headers.contains(&name) {
            continue;
        }
        seen_headers.push(name);
        for value in headers.get_all(name) {
            let Ok(value) = value.to_str() else { continue };
            let best = locations
                .iter()
                .enumerate()
                .filter_map(|(i, l)| match &l.place {
                    Place::Header { name: n, prefix } if n == name => {
                        prefix.strip(value).map(|(len, token)| (len, i, token))
                    }
                    _ => None,
                })
                .max_by_key(|(len, _, _)| *len);
            if let Some((_, location, token)) = best {
                let token = token.trim();
                if !token.is_empty() {
                    found.push(Found {
                        token: token.into(),
                        location,
                    });
                }
            }
        }
    }
    let wants = |pick: fn(&Place) -> Option<&str>, key: &str| {
        locations.iter().position(|l| pick(&l.place) == Some(key))
    };
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(key) = percent_decode(key) else {
                continue;
            };
            if let Some(location) = wants(Place::param, &key) {
                if let Some(token) = percent_decode(value).filter(|t| !t.is_empty()) {
                    found.push(Found {
                        token: token.into(),
                        location,
                    });
                }
            }
        }
    }
    if locations.iter().any(|l| l.place.cookie().is_some()) {
        let pairs = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim);
        for pair in pairs {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            if let Some(location) = wants(Place::cookie, name.trim()) {
                let value = value.trim().trim_matches('"');
                if !value.is_empty() {
                    found.push(Found {
                        token: value.into(),
                        location,
                    });
                }
            }
        }
    }
    found
}

/// The name of a `name=value` cookie pair.
pub(super) fn cookie_name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(n, _)| n).trim()
}

/// Decodes `%XX` escapes (and `+` as a space, as forms encode); `None` when that is not
/// UTF-8 or an escape is broken.
pub(super) fn percent_decode(s: &str) -> Option<String> {
    if !s.contains(['%', '+']) {
        return Some(s.to_string());
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                (hi * 16 + lo) as u8
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}
