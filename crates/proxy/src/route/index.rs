//! An index over a host's routes by their literal paths, so a table of thousands of routes
//! costs a request a few hash lookups instead of a walk over every route.
//!
//! First match wins, so the index only narrows the walk: it yields, in route order, the
//! routes that *could* match a path — those with a match whose exact path equals it or whose
//! prefix starts it, plus every route with a match the index cannot read (a regex, no path
//! condition, `ignoreUriCase`) — and the caller evaluates each in full. Prefixes are looked
//! up by length: one hash lookup per distinct prefix length in the table that fits the path.

use super::Route;
use foldhash::HashMap;

use super::matcher::Literal;

/// Below this many routes a plain walk is as fast; no index is built.
const MIN_ROUTES: usize = 16;

/// See the module docs.
#[derive(Default)]
pub struct RouteIndex {
    /// Routes that must always be tried (in order).
    always: Vec<u32>,
    /// Routes by exact path (each list in order).
    exact: HashMap<Box<str>, Vec<u32>>,
    /// Routes by path prefix (each list in order).
    prefix: HashMap<Box<str>, Vec<u32>>,
    /// The distinct prefix lengths in `prefix`, ascending.
    prefix_lengths: Vec<usize>,
    built: bool,
}

impl RouteIndex {
    /// The index over `routes` (empty, and unused, for short tables).
    pub fn build(routes: &[Route]) -> Self {
        let mut index = Self::default();
        if routes.len() < MIN_ROUTES {
            return index;
        }
        index.built = true;
        for (i, r) in routes.iter().enumerate() {
            let i = i as u32;
            let literals: Option<Vec<Literal<'_>>> =
                r.matches.iter().map(|m| m.literal_path()).collect();
            match literals {
                Some(ls) if !ls.is_empty() => {
                    for l in ls {
                        let (map, key) = match l {
                            Literal::Exact(p) => (&mut index.exact, p),
                            Literal::Prefix(p) => (&mut index.prefix, p),
                        };
                        let list = map.entry(Box::from(key)).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
                _ => index.always.push(i),
            }
        }
        index.prefix_lengths = index.prefix.keys().map(|k| k.len()).collect();
        index.prefix_lengths.sort_unstable();
        index.prefix_lengths.dedup();
        index
    }

    /// The routes that could match `path`, in route order; `None` when there is no index
    /// (try every route).
    pub fn candidates(&self, path: &str) -> Option<Vec<u32>> {
        if !self.built {
            return None;
        }
        let mut out = self.always.clone();
        if let Some(list) = self.exact.get(path) {
            out.extend_from_slice(list);
        }
        for &len in &self.prefix_lengths {
            let Some(head) = path.get(..len) else {
                if len > path.len() {
                    break;
                }
                continue; // not a char boundary: no literal prefix ends there
            };
            if let Some(list) = self.prefix.get(head) {
                out.extend_from_slice(list);
            }
        }
        out.sort_unstable();
        out.dedup();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::matcher::{HttpMatch, MatchContext, Source};
    use crate::route::{Action, HeaderOps};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use trellis_api::resources::http_match::HttpMatchRequest;

    fn route(conditions: &[String]) -> Route {
        let matches = conditions
            .iter()
            .map(|c| {
                let m: HttpMatchRequest = serde_yaml_ng::from_str(c).unwrap();
                HttpMatch::compile(&m).unwrap()
            })
            .collect();
        Route {
            name: "r".into(),
            matches,
            action: Action::Direct {
                status: http::StatusCode::OK,
                body: bytes::Bytes::new(),
            },
            timeout: None,
            headers: HeaderOps::default(),
            rewrite: None,
            fault: None,
            retry: None,
            mirrors: Vec::new(),
            cors: None,
        }
    }

    fn condition() -> impl Strategy<Value = String> {
        let path = "/[ab]{0,3}(/[ab]{0,2})?";
        prop_oneof![
            path.prop_map(|p| format!("uri: {{ exact: \"{p}\" }}")),
            path.prop_map(|p| format!("uri: {{ prefix: \"{p}\" }}")),
            path.prop_map(|p| format!("uri: {{ regex: \"{p}.*\" }}")),
            path.prop_map(|p| format!("uri: {{ prefix: \"{p}\" }}\nignoreUriCase: true")),
            Just("method: { exact: GET }".to_string()),
            Just("headers: { x-v: { exact: \"2\" } }".to_string()),
        ]
    }

    fn first_match(
        routes: &[Route],
        order: impl Iterator<Item = usize>,
        path: &str,
    ) -> Option<usize> {
        let head = http::Request::get(path).body(()).unwrap().into_parts().0;
        let labels = BTreeMap::new();
        let cx = MatchContext {
            path,
            authority: "svc",
            port: None,
            source: Source {
                labels: &labels,
                namespace: "ns",
            },
        };
        order.into_iter().find(|&i| {
            let r = &routes[i];
            r.matches.is_empty() || r.matches.iter().any(|m| m.matches(&head, &cx))
        })
    }

    proptest! {
        /// The indexed walk picks exactly the route the full walk picks.
        #[test]
        fn the_index_never_changes_which_route_matches(
            table in proptest::collection::vec(proptest::collection::vec(condition(), 0..3), 16..60),
            paths in proptest::collection::vec("/[abAB]{0,4}(/[ab]{0,3})?", 1..40),
        ) {
            let routes: Vec<Route> = table.iter().map(|c| route(c)).collect();
            let index = RouteIndex::build(&routes);
            for path in &paths {
                let full = first_match(&routes, 0..routes.len(), path);
                let could = index.candidates(path).unwrap();
                let indexed = first_match(&routes, could.iter().map(|&i| i as usize), path);
                prop_assert_eq!(full, indexed, "path {}", path);
            }
        }
    }

    #[test]
    fn short_tables_are_not_indexed() {
        let routes: Vec<Route> = (0..MIN_ROUTES - 1)
            .map(|i| route(&[format!("uri: {{ prefix: /s{i}/ }}")]))
            .collect();
        assert!(RouteIndex::build(&routes).candidates("/s1/x").is_none());
    }

    #[test]
    fn candidates_are_the_routes_whose_literal_fits_plus_the_unindexable_ones() {
        let mut routes: Vec<Route> = (0..20)
            .map(|i| route(&[format!("uri: {{ prefix: /svc-{i}/ }}")]))
            .collect();
        routes.push(route(&["uri: { exact: /svc-3/health }".into()]));
        routes.push(route(&["uri: { regex: \"/svc-[0-9]+/x\" }".into()]));
        routes.push(route(&[]));
        let index = RouteIndex::build(&routes);
        assert_eq!(index.candidates("/svc-3/health").unwrap(), [3, 20, 21, 22]);
        assert_eq!(index.candidates("/svc-13/a").unwrap(), [13, 21, 22]);
        assert_eq!(index.candidates("/other").unwrap(), [21, 22]);
        assert_eq!(index.candidates("/é").unwrap(), [21, 22]);
    }
}
