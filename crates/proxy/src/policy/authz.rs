//! Istio `AuthorizationPolicy` for one workload: [`Authz::compile`] keeps the policies that
//! apply to it and pre-compiles their matchers; [`Authz::decide`] judges a request or
//! connection against them.
//!
//! Evaluation is Istio's (istio.io reference "Authorization Policy"): a matching DENY policy
//! denies; otherwise, if ALLOW policies apply, one of them must match; otherwise the request is
//! allowed. AUDIT policies are reported and never change the outcome. CUSTOM policies are
//! skipped here (`trellis analyze` rejects them). A policy matches when any rule does (no
//! rules: never; `rules: [{}]`: always); a rule when any `from`, any `to` and every `when`
//! does; a source or operation when every field given does; a field when any value and no
//! `not` value matches. An attribute the request does not have (no mTLS principal, no such
//! header, no JWT) matches no value, so `values` fail and `notValues` pass, as with Envoy's
//! RBAC `not_id` over a header matcher that never matches an absent header.
//!
//! Where the request lacks what a rule tests, this follows Istio's generator
//! (`pilot/pkg/security/authz/model`): it errs towards denying. On a TCP connection an ALLOW
//! rule that tests any HTTP attribute (hosts, methods, paths, request headers, request
//! principals, `request.auth.*`) never matches, while in a DENY or AUDIT rule those tests are
//! dropped, so the rest of the rule decides (a DENY for `methods: [POST]` denies every TCP
//! connection). The same goes for a value that cannot be compiled (an invalid path template,
//! a bad CIDR): it disables an ALLOW rule and is ignored in a DENY rule, and for an attribute
//! this proxy does not have (`destination.ip` when unknown, `experimental.envoy.filters.*`).
//! An unknown condition key (the API layer refuses them) makes its rule never match, as Istio
//! skips such a rule.
//!
//! Matching, per field: principals, request principals, methods, header and JWT values use
//! Istio's string match (exact, `abc*`, `*abc`, `*` = non-empty; another `*` is literal);
//! namespaces treat every `*` as a wildcard (Istio builds a regex from them); hosts compare
//! case-insensitively without port or trailing dot; paths add Istio's templates (`{*}`: one
//! segment, `{**}`: the rest, only as the last operator); IP blocks take addresses and CIDRs of
//! either family. Header conditions see every value of the header and each comma-separated
//! element of it (Envoy would match the values joined by `,` as one string), so
//! `x-role: guest, admin` satisfies `values: [admin]` and fails `notValues: [admin]`. JWT
//! claims match when a string claim, or any string of a list claim, does; other JSON types
//! match nothing.

use foldhash::HashMap;
use http::{HeaderMap, HeaderName};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use trellis_api::resources::authorization_policy::{Action, Condition, Operation, Rule, Source};
use trellis_api::resources::AuthorizationPolicy;

/// What a policy can test about one request (HTTP) or connection (TCP, `http: None`).
#[derive(Clone, Copy, Debug)]
pub struct RequestAttrs<'a> {
    /// The peer's mTLS identity in Istio form (`cluster.local/ns/x/sa/y`: the SPIFFE ID
    /// without `spiffe://`); `None` without mTLS.
    pub source_principal: Option<&'a str>,
    /// The peer's namespace, from its mTLS identity (see [`principal_namespace`]); `None`
    /// without mTLS.
    pub source_namespace: Option<&'a str>,
    /// The peer address of the connection.
    pub source_ip: IpAddr,
    /// The original client address (X-Forwarded-For / PROXY protocol when trusted, else
    /// `source_ip`).
    pub remote_ip: IpAddr,
    /// The local address the connection arrived at, when known.
    pub destination_ip: Option<IpAddr>,
    /// The port the connection arrived at.
    pub destination_port: u16,
    /// The HTTP request; `None` for a TCP connection.
    pub http: Option<HttpAttrs<'a>>,
    /// The request's validated JWT; `None` when it has none.
    pub jwt: Option<&'a JwtAttrs>,
}

/// The HTTP parts of a request.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttrs<'a> {
    /// The method, as sent (matching is case-sensitive, as in Istio).
    pub method: &'a str,
    /// The authority as [`normalize_host`] returns it; callers may leave it empty when
    /// [`Authz::reads_host`] says no policy reads it.
    pub host: &'a str,
    /// The path as [`super::path::normalize`] returns it. Matching assumes this form, and the
    /// application should be sent the same path.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// A validated JWT, as `RequestAuthentication` produced it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JwtAttrs {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// The `aud` claim.
    pub audiences: Vec<String>,
    /// The whole payload (`request.auth.claims[...]`, `azp` for `request.auth.presenter`).
    pub claims: Value,
}

/// The namespace of an Istio-form principal (`cluster.local/ns/<ns>/sa/<sa>`).
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let rest = &principal[principal.find("/ns/")? + "/ns/".len()..];
    let ns = rest.split('/').next().unwrap_or(rest);
    (!ns.is_empty()).then_some(ns)
}

/// A host as policies compare it: lower case, without port and trailing dot.
pub fn normalize_host(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = strip_port(authority.trim()).trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// `host` without a `:port` (or `:*`, in a pattern) suffix; IPv6 literals keep their brackets.
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty()
                && (!h.contains(':') || h.ends_with(']'))
                && (p == "*" || (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))) =>
        {
            h
        }
        _ => host,
    }
}

/// Whether `policy` applies to a workload, by Istio's scope rules: a policy in the root
/// namespace applies mesh-wide, one elsewhere to its own namespace, and a `selector` narrows
/// either to the workloads whose labels it matches. `targetRef(s)` policies attach to
/// gateways and waypoints, never to a sidecar.
pub fn applies_to(
    policy: &AuthorizationPolicy,
    workload_namespace: &str,
    workload_labels: &BTreeMap<String, String>,
    root_namespace: &str,
) -> bool {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        return false;
    }
    let ns = policy.metadata.namespace();
    (ns == root_namespace || ns == workload_namespace)
        && match &spec.selector {
            None => true,
            Some(s) => s.matches(workload_labels),
        }
}

/// The verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// `Allow` or `Deny`: the effect, which is the deciding policy's action when there is one.
    pub action: Action,
    /// The deciding policy (`namespace/name`): the matching DENY or ALLOW policy. `None` when
    /// the default decided: allowed because no ALLOW policy applies, or denied because none
    /// matched.
    pub policy: Option<Arc<str>>,
    /// The AUDIT policies that matched (`namespace/name`), for the access log.
    pub audit: Vec<Arc<str>>,
    /// The deciding policy's position among the workload's policies (below
    /// [`Authz::len`]): a key for per-policy state such as its decision counter.
    pub slot: Option<usize>,
}

impl Decision {
    /// `allow` or `deny`, the `action` label of `trellis_authz_decisions_total`.
    pub fn action_label(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }

    /// The deciding policy, or `""` for the default: the `policy` label.
    pub fn policy_label(&self) -> &str {
        self.policy.as_deref().unwrap_or("")
    }

    /// Whether any AUDIT policy matched.
    pub fn audited(&self) -> bool {
        !self.audit.is_empty()
    }
}

/// The authorization policies of one workload, compiled.
#[derive(Clone, Debug, Default)]
pub struct Authz {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
    /// The request headers the policies' conditions read.
    headers: HeaderTable,
    /// The literal paths the policies' operations test.
    paths: PathTable,
    /// Whether any policy tests the host (`hosts`, `request.headers[:authority]`).
    reads_host: bool,
}

impl Authz {
    /// Compiles the policies among `policies` that apply to the workload (see [`applies_to`]),
    /// in `namespace/name` order so that the reported policy does not depend on input order.
    pub fn compile<'p>(
        policies: impl IntoIterator<Item = &'p AuthorizationPolicy>,
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
        root_namespace: &str,
    ) -> Authz {
        let mut applicable: Vec<&AuthorizationPolicy> = policies
            .into_iter()
            .filter(|p| applies_to(p, workload_namespace, workload_labels, root_namespace))
            .collect();
        applicable.sort_by(|a, b| {
            (a.metadata.namespace(), &a.metadata.name)
                .cmp(&(b.metadata.namespace(), &b.metadata.name))
        });
        let mut authz = Authz::default();
        for (slot, p) in applicable.into_iter().enumerate() {
            let name: Arc<str> = format!("{}/{}", p.metadata.namespace(), p.metadata.name).into();
            let lenient = match p.spec.action {
                Action::Allow => false,
                Action::Deny | Action::Audit => true,
                Action::Custom => {
                    tracing::warn!(policy = %name, "CUSTOM authorization policies are not supported; skipped");
                    continue;
                }
            };
            let rules: Vec<CompiledRule> = p
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Compiler {
                        policy: &name,
                        rule: i,
                        lenient,
                        broken: false,
                        headers: &mut authz.headers,
                        paths: &mut authz.paths,
                    }
                    .rule(r)
                })
                .collect();
            let list = match p.spec.action {
                Action::Allow => &mut authz.allow,
                Action::Deny => &mut authz.deny,
                _ => &mut authz.audit,
            };
            authz.reads_host |= rules.iter().any(CompiledRule::reads_host);
            list.push(Policy { name, slot, rules });
        }
        authz
    }

    /// Whether no policy applies (every request is allowed).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Whether any policy tests the request's host: if not, [`HttpAttrs::host`] need not be
    /// worked out.
    pub fn reads_host(&self) -> bool {
        self.reads_host
    }

    /// How many policies apply (the bound of [`Decision::slot`]).
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    /// The policy at `slot` (`namespace/name`) and the action label its decisions carry
    /// (`deny`, `allow`, `audit`); the tests' way to check a decision's slot.
    #[cfg(test)]
    fn policy<'a>(&'a self, slot: usize) -> Option<(&'static str, &'a Arc<str>)> {
        let labelled =
            |action: &'static str, list: &'a [Policy]| list.iter().map(move |p| (action, p));
        labelled("deny", &self.deny)
            .chain(labelled("allow", &self.allow))
            .chain(labelled("audit", &self.audit))
            .find(|(_, p)| p.slot == slot)
            .map(|(action, p)| (action, &p.name))
    }

    /// Judges one request or connection.
    pub fn decide(&self, req: &RequestAttrs<'_>) -> Decision {
        let req = &Request {
            attrs: req,
            headers: req.http.map_or(0, |h| self.headers.present(h.headers)),
            paths: req.http.map_or(0, |h| self.paths.matched(h.path)),
        };
        let audit = self
            .audit
            .iter()
            .filter(|p| p.matches(req, true))
            .map(|p| p.name.clone())
            .collect();
        let decided = if let Some(p) = self.deny.iter().find(|p| p.matches(req, true)) {
            Some((false, p))
        } else if self.allow.is_empty() {
            None
        } else {
            match self.allow.iter().find(|p| p.matches(req, false)) {
                Some(p) => Some((true, p)),
                None => {
                    return Decision {
                        allowed: false,
                        action: Action::Deny,
                        policy: None,
                        audit,
                        slot: None,
                    }
                }
            }
        };
        let allowed = decided.is_none_or(|(allowed, _)| allowed);
        Decision {
            allowed,
            action: if allowed { Action::Allow } else { Action::Deny },
            policy: decided.map(|(_, p)| p.name.clone()),
            audit,
            slot: decided.map(|(_, p)| p.slot),
        }
    }
}

/// A request or connection being judged: its attributes, which of the headers the policies
/// read it carries (see [`HeaderTable::present`]) and which of their literal paths its path
/// matches (see [`PathTable::matched`]).
struct Request<'r, 'a> {
    attrs: &'r RequestAttrs<'a>,
    headers: u64,
    paths: u64,
}

/// The exact and prefix path values of the policies' operations, each with a bit, so that a
/// request's path is matched against all of them at once (one lookup for the exact values,
/// one per distinct prefix length) and a rule whose path field none of them matches is
/// skipped on one bit test. Values past the 64th get no bit.
#[derive(Clone, Debug, Default)]
struct PathTable {
    exact: HashMap<Box<[u8]>, u8>,
    /// Prefix values by length, shortest first.
    prefixes: BTreeMap<usize, HashMap<Box<[u8]>, u8>>,
    bits: u8,
}

impl PathTable {
    /// The bit of an exact or prefix value, added if new and there is room.
    fn bit(&mut self, m: &StrMatch) -> Option<u8> {
        let full = self.bits == 64;
        let (map, value) = match m {
            StrMatch::Exact(e) => (&mut self.exact, e),
            // A full table gets no new prefix length (each costs a lookup per request).
            StrMatch::Prefix(p) if full => (self.prefixes.get_mut(&p.len())?, p),
            StrMatch::Prefix(p) => (self.prefixes.entry(p.len()).or_default(), p),
            StrMatch::Suffix(_) | StrMatch::Present => return None,
        };
        if let Some(bit) = map.get(value.as_bytes()) {
            return Some(*bit);
        }
        if full {
            return None;
        }
        let bit = self.bits;
        map.insert(value.as_bytes().into(), bit);
        self.bits += 1;
        Some(bit)
    }

    /// The bits of the values `path` matches.
    fn matched(&self, path: &str) -> u64 {
        if self.bits == 0 {
            return 0;
        }
        let path = path.as_bytes();
        let mut bits = self.exact.get(path).map_or(0, |b| 1 << b);
        for (len, values) in self.prefixes.range(..=path.len()) {
            if let Some(b) = values.get(&path[..*len]) {
                bits |= 1 << b;
            }
        }
        bits
    }
}

/// The request headers that conditions read, each with a bit, so that a request is checked
/// for all of them in one pass over its own few headers. Most conditions test headers most
/// requests lack, and a pass that compares lengths first is cheaper than one hash lookup per
/// condition. Names past the 64th get no bit and are looked up each time.
#[derive(Clone, Debug, Default)]
struct HeaderTable {
    names: Vec<HeaderName>,
    /// Bit `len % 64` set for the length of every name.
    lengths: u64,
}

impl HeaderTable {
    /// Requests with more distinct header names than this are checked by looking up each
    /// of the table's names instead (bounding the pass at `SCAN_MAX * 64` comparisons).
    const SCAN_MAX: usize = 8;

    /// The bit of `name`, added if new and there is room.
    fn bit(&mut self, name: &HeaderName) -> Option<u8> {
        let i = match self.names.iter().position(|n| n == name) {
            Some(i) => i,
            None if self.names.len() < 64 => {
                self.names.push(name.clone());
                self.lengths |= 1 << (name.as_str().len() % 64);
                self.names.len() - 1
            }
            None => return None,
        };
        u8::try_from(i).ok()
    }

    /// The bits of the table's names that `headers` holds.
    fn present(&self, headers: &HeaderMap) -> u64 {
        if self.names.is_empty() {
            return 0;
        }
        let bits = |found: &mut dyn Iterator<Item = usize>| found.fold(0, |m, i| m | 1 << i);
        if headers.keys_len() > Self::SCAN_MAX {
            return bits(
                &mut (0..self.names.len()).filter(|&i| headers.contains_key(&self.names[i])),
            );
        }
        bits(&mut headers.keys().filter_map(|name| {
            if self.lengths & (1 << (name.as_str().len() % 64)) == 0 {
                return None;
            }
            self.names.iter().position(|n| n == name)
        }))
    }
}

#[derive(Clone, Debug)]
struct Policy {
    name: Arc<str>,
    /// Its position in `namespace/name` order ([`Decision::slot`]).
    slot: usize,
    rules: Vec<CompiledRule>,
}

impl Policy {
    /// `lenient`: DENY and AUDIT, where a test that cannot be made counts as matched.
    fn matches(&self, req: &Request<'_, '_>, lenient: bool) -> bool {
        self.rules.iter().any(|r| r.matches(req, lenient))
    }
}

/// A rule: every field of `all`, and one of the alternatives of each of `any_from` and
/// `any_to` that has any. A lone source or operation (the usual case) needs all its fields,
/// so they join the conditions in `all`, cheapest first.
#[derive(Clone, Debug)]
struct CompiledRule {
    all: Vec<Field>,
    /// Sources when there are several, any of which must match; each all of its fields.
    any_from: Vec<Vec<Field>>,
    /// Operations when there are several, likewise.
    any_to: Vec<Vec<Field>>,
    /// Tests an HTTP attribute somewhere.
    needs_http: bool,
    /// The [`HeaderTable`] bits of the headers an HTTP request must have to match: those
    /// `all` tests for `values`. Checked first, as most requests lack them.
    required_headers: u64,
    /// The [`PathTable`] bits of a path field of `all` whose values all have one and which
    /// has no `notPaths`: an HTTP request whose path matches none of them cannot match.
    path_guard: Option<u64>,
    /// Unusable (unknown condition key, or an invalid value in an ALLOW rule): never matches.
    broken: bool,
}

impl CompiledRule {
    fn reads_host(&self) -> bool {
        let host = |f: &Field| matches!(f, Field::Host(_) | Field::Header(HeaderKey::Authority, _));
        self.all
            .iter()
            .chain(self.any_from.iter().flatten())
            .chain(self.any_to.iter().flatten())
            .any(host)
    }

    #[inline]
    fn matches(&self, req: &Request<'_, '_>, lenient: bool) -> bool {
        if self.broken || (req.attrs.http.is_none() && self.needs_http && !lenient) {
            return false;
        }
        if req.attrs.http.is_some()
            && (self.required_headers & !req.headers != 0
                || self.path_guard.is_some_and(|g| g & req.paths == 0))
        {
            return false;
        }
        let field = |f: &Field| f.eval(req).unwrap_or(lenient);
        let any = |alternatives: &[Vec<Field>]| {
            alternatives.is_empty() || alternatives.iter().any(|a| a.iter().all(field))
        };
        self.all.iter().all(field) && any(&self.any_from) && any(&self.any_to)
    }
}

/// Compiles the rules of one policy.
struct Compiler<'a> {
    policy: &'a str,
    rule: usize,
    /// DENY / AUDIT: drop what cannot be compiled (the rule gets wider) instead of disabling
    /// the rule (ALLOW: it gets narrower).
    lenient: bool,
    broken: bool,
    /// The workload's header table, where header conditions get their bits.
    headers: &'a mut HeaderTable,
    /// The workload's path table, where literal path values get their bits.
    paths: &'a mut PathTable,
}

impl Compiler<'_> {
    fn rule(mut self, rule: &Rule) -> CompiledRule {
        let from: Vec<_> = rule
            .from
            .iter()
            .flatten()
            .map(|f| self.source(&f.source))
            .collect();
        let to: Vec<_> = rule
            .to
            .iter()
            .flatten()
            .map(|t| self.operation(&t.operation))
            .collect();
        let when: Vec<_> = rule
            .when
            .iter()
            .flatten()
            .filter_map(|c| self.condition(c))
            .collect();
        let needs_http = from
            .iter()
            .chain(&to)
            .flatten()
            .chain(&when)
            .any(Field::http_only);
        let mut all = when;
        let mut alternatives = |mut list: Vec<Vec<Field>>| {
            if list.len() == 1 {
                all.append(&mut list[0]);
                list.clear();
            }
            list
        };
        let (any_from, any_to) = (alternatives(from), alternatives(to));
        all.sort_by_key(Field::cost);
        let required_headers = all.iter().fold(0, |bits, f| match f {
            Field::Header(HeaderKey::Name(_, Some(bit)), set) if !set.values.is_empty() => {
                bits | 1 << bit
            }
            _ => bits,
        });
        let path_guard = all.iter().find_map(|f| match f {
            Field::Path(set) if set.not_values.is_empty() && !set.values.is_empty() => {
                set.values.iter().try_fold(0u64, |mask, v| match v {
                    PathMatch::Plain(m) => self.paths.bit(m).map(|b| mask | 1 << b),
                    PathMatch::Template { .. } => None,
                })
            }
            _ => None,
        });
        CompiledRule {
            all,
            any_from,
            any_to,
            needs_http,
            required_headers,
            path_guard,
            broken: self.broken,
        }
    }

    fn source(&mut self, s: &Source) -> Vec<Field> {
        [
            self.set("principals", &s.principals, &s.not_principals, str_match)
                .map(Field::SourcePrincipal),
            self.set(
                "requestPrincipals",
                &s.request_principals,
                &s.not_request_principals,
                str_match,
            )
            .map(Field::RequestPrincipal),
            self.set("namespaces", &s.namespaces, &s.not_namespaces, glob)
                .map(Field::SourceNamespace),
            self.set("ipBlocks", &s.ip_blocks, &s.not_ip_blocks, Cidr::parse)
                .map(Field::SourceIp),
            self.set(
                "remoteIpBlocks",
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
                Cidr::parse,
            )
            .map(Field::RemoteIp),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn operation(&mut self, o: &Operation) -> Vec<Field> {
        [
            self.set("hosts", &o.hosts, &o.not_hosts, host_match)
                .map(Field::Host),
            self.set("ports", &o.ports, &o.not_ports, port)
                .map(Field::DestinationPort),
            self.set("methods", &o.methods, &o.not_methods, str_match)
                .map(Field::Method),
            self.set("paths", &o.paths, &o.not_paths, PathMatch::parse)
                .map(Field::Path),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn condition(&mut self, c: &Condition) -> Option<Field> {
        let (key, v, nv) = (c.key.as_str(), &c.values, &c.not_values);
        match key {
            "source.ip" => self.set(key, v, nv, Cidr::parse).map(Field::SourceIp),
            "remote.ip" => self.set(key, v, nv, Cidr::parse).map(Field::RemoteIp),
            "destination.ip" => self.set(key, v, nv, Cidr::parse).map(Field::DestinationIp),
            "destination.port" => self.set(key, v, nv, port).map(Field::DestinationPort),
            "source.namespace" => self.set(key, v, nv, glob).map(Field::SourceNamespace),
            "source.principal" => self.set(key, v, nv, str_match).map(Field::SourcePrincipal),
            "request.auth.principal" => {
                self.set(key, v, nv, str_match).map(Field::RequestPrincipal)
            }
            "request.auth.audiences" => self.set(key, v, nv, str_match).map(Field::Audiences),
            "request.auth.presenter" => self.set(key, v, nv, str_match).map(Field::Presenter),
            _ if key.starts_with("request.headers") => {
                let name = bracketed(&key["request.headers".len()..]);
                let Some(name) = name.filter(|n| !n.is_empty()) else {
                    return self.invalid(key, "header name");
                };
                let header = HeaderKey::new(name, self.headers);
                self.set(key, v, nv, str_match)
                    .map(|s| Field::Header(header, s))
            }
            _ if key.starts_with("request.auth.claims") => {
                let Some(names) = claim_path(&key["request.auth.claims".len()..]) else {
                    return self.invalid(key, "claim name");
                };
                self.set(key, v, nv, str_match)
                    .map(|s| Field::Claim(names, s))
            }
            _ if key.starts_with("experimental.envoy.filters.") => Some(Field::Opaque),
            _ => {
                tracing::warn!(
                    policy = self.policy,
                    rule = self.rule,
                    key,
                    "unknown condition key; the rule never matches"
                );
                self.broken = true;
                None
            }
        }
    }

    /// A malformed key: like an uncompilable value.
    fn invalid(&mut self, key: &str, what: &str) -> Option<Field> {
        tracing::warn!(
            policy = self.policy,
            rule = self.rule,
            key,
            "malformed {what}"
        );
        self.broken |= !self.lenient;
        None
    }

    /// The compiled values of one field; `None` when nothing is left to test.
    fn set<M>(
        &mut self,
        field: &str,
        values: &[String],
        not_values: &[String],
        parse: impl Fn(&str) -> Option<M>,
    ) -> Option<Set<M>> {
        let mut compile = |list: &[String]| {
            let mut out = Vec::with_capacity(list.len());
            for v in list {
                match parse(v) {
                    Some(m) => out.push(m),
                    None => {
                        tracing::warn!(policy = self.policy, rule = self.rule, field, value = %v,
                            ignored = self.lenient, "invalid value in authorization policy");
                        self.broken |= !self.lenient;
                    }
                }
            }
            out
        };
        let set = Set {
            values: compile(values),
            not_values: compile(not_values),
        };
        (!set.values.is_empty() || !set.not_values.is_empty()).then_some(set)
    }
}

/// `[name]` -> `name`.
fn bracketed(s: &str) -> Option<&str> {
    s.strip_prefix('[')?.strip_suffix(']')
}

/// `[a][b]` -> `[a, b]`.
fn claim_path(s: &str) -> Option<Vec<String>> {
    let names: Vec<String> = bracketed(s)?.split("][").map(str::to_string).collect();
    names
        .iter()
        .all(|n| !n.is_empty() && !n.contains(['[', ']']))
        .then_some(names)
}

/// One attribute test of a source, operation or condition.
#[derive(Clone, Debug)]
enum Field {
    SourcePrincipal(Set<StrMatch>),
    SourceNamespace(Set<Glob>),
    SourceIp(Set<Cidr>),
    RemoteIp(Set<Cidr>),
    DestinationIp(Set<Cidr>),
    DestinationPort(Set<u16>),
    Host(Set<StrMatch>),
    Method(Set<StrMatch>),
    Path(Set<PathMatch>),
    Header(HeaderKey, Set<StrMatch>),
    RequestPrincipal(Set<StrMatch>),
    Audiences(Set<StrMatch>),
    Presenter(Set<StrMatch>),
    Claim(Vec<String>, Set<StrMatch>),
    /// `experimental.envoy.filters.*`: Envoy metadata this proxy does not have.
    Opaque,
}

impl Field {
    /// Only meaningful for HTTP requests (Istio: "is HTTP only").
    fn http_only(&self) -> bool {
        matches!(
            self,
            Field::Host(_)
                | Field::Method(_)
                | Field::Path(_)
                | Field::Header(..)
                | Field::RequestPrincipal(_)
                | Field::Audiences(_)
                | Field::Presenter(_)
                | Field::Claim(..)
        )
    }

    /// A rank of how much testing the field costs, for testing cheap ones first.
    fn cost(&self) -> u8 {
        match self {
            Field::DestinationPort(_) | Field::Method(_) => 0,
            Field::SourcePrincipal(_) | Field::RequestPrincipal(_) | Field::Host(_) => 1,
            Field::Path(_) | Field::SourceNamespace(_) => 2,
            Field::SourceIp(_) | Field::RemoteIp(_) | Field::DestinationIp(_) => 2,
            // A lookup and a split into elements when the request has the header.
            Field::Header(..) => 3,
            Field::Audiences(_) | Field::Presenter(_) | Field::Claim(..) | Field::Opaque => 4,
        }
    }

    /// Whether the request matches; `None` when it lacks the attribute's data altogether (an
    /// HTTP attribute of a TCP connection, an unknown destination address, Envoy metadata).
    #[inline]
    fn eval(&self, request: &Request<'_, '_>) -> Option<bool> {
        let req = request.attrs;
        let jwt = req.jwt;
        let text = |m: &StrMatch, c: &&str| m.matches(c);
        let ip = |c: &Cidr, a: &IpAddr| c.contains(*a);
        Some(match self {
            Field::SourcePrincipal(s) => s.test(|| req.source_principal, text),
            Field::SourceNamespace(s) => s.test(|| req.source_namespace, |g, c| g.matches(c)),
            Field::SourceIp(s) => s.one(req.source_ip, ip),
            Field::RemoteIp(s) => s.one(req.remote_ip, ip),
            Field::DestinationIp(s) => s.one(req.destination_ip?, ip),
            Field::DestinationPort(s) => s.one(req.destination_port, |p, q| p == q),
            Field::Host(s) => s.one(req.http?.host, text),
            Field::Method(s) => s.one(req.http?.method, text),
            Field::Path(s) => s.one(req.http?.path, |m, p| m.matches(p)),
            Field::Header(key, s) => key.test(s, &req.http?, request.headers),
            // The JWT is an HTTP attribute too: on a TCP connection these have no data.
            Field::RequestPrincipal(s) => {
                req.http?;
                s.test(|| jwt.map(|j| j.principal.as_str()), text)
            }
            Field::Audiences(s) => {
                req.http?;
                s.test(
                    || {
                        jwt.into_iter()
                            .flat_map(|j| j.audiences.iter().map(String::as_str))
                    },
                    text,
                )
            }
            Field::Presenter(s) => {
                req.http?;
                s.test(|| claim(jwt, &["azp"]), text)
            }
            Field::Claim(names, s) => {
                req.http?;
                s.test(|| claim(jwt, names), text)
            }
            Field::Opaque => return None,
        })
    }
}

/// The strings of a JWT claim at `names` (nested objects): a string, or a list's strings.
fn claim<'j, S: AsRef<str>>(
    jwt: Option<&'j JwtAttrs>,
    names: &[S],
) -> impl Iterator<Item = &'j str> {
    let mut v = jwt.map(|j| &j.claims);
    for n in names {
        v = v.and_then(|v| v.get(n.as_ref()));
    }
    let (one, many): (Option<&str>, &[Value]) = match v {
        Some(Value::String(s)) => (Some(s), &[]),
        Some(Value::Array(a)) => (None, a),
        _ => (None, &[]),
    };
    one.into_iter().chain(many.iter().filter_map(Value::as_str))
}

/// The positive and negative values of one field.
#[derive(Clone, Debug)]
struct Set<M> {
    values: Vec<M>,
    not_values: Vec<M>,
}

impl<M> Set<M> {
    /// [`Set::test`] for an attribute with exactly one value.
    #[inline]
    fn one<C>(&self, candidate: C, hit: impl Fn(&M, &C) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(|m| hit(m, &candidate)))
            && !self.not_values.iter().any(|m| hit(m, &candidate))
    }

    /// Some candidate matches some value (or there are none), and none matches a `not` value.
    /// A request without the attribute has no candidates: `values` fail, `notValues` pass.
    fn test<C, I: IntoIterator<Item = C>>(
        &self,
        candidates: impl Fn() -> I,
        hit: impl Fn(&M, &C) -> bool,
    ) -> bool {
        let any = |ms: &[M]| {
            !ms.is_empty()
                && candidates()
                    .into_iter()
                    .any(|c| ms.iter().any(|m| hit(m, &c)))
        };
        (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
    }
}

/// Which request header a `request.headers[...]` condition reads.
#[derive(Clone, Debug)]
enum HeaderKey {
    /// A header, with its bit in the workload's [`HeaderTable`] if it got one.
    Name(HeaderName, Option<u8>),
    /// `:method`, `:path`, `:authority`: Envoy's pseudo-headers, read from the request line.
    Method,
    Path,
    Authority,
    /// Not a valid header name: never present.
    Invalid,
}

impl HeaderKey {
    fn new(name: &str, table: &mut HeaderTable) -> HeaderKey {
        match name.to_ascii_lowercase().as_str() {
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            ":authority" => HeaderKey::Authority,
            n => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(name) => {
                    let bit = table.bit(&name);
                    HeaderKey::Name(name, bit)
                }
                Err(_) => HeaderKey::Invalid,
            },
        }
    }

    /// Every value of the header is a candidate, and so is each comma-separated element of a
    /// value (`x-role: a, b` offers `a, b`, `a` and `b`). `*` matches a present header, even
    /// an empty one (Envoy's `present_match`).
    /// `present`: the request's bits in the workload's [`HeaderTable`].
    fn test(&self, set: &Set<StrMatch>, h: &HttpAttrs<'_>, present: u64) -> bool {
        let hit = |m: &StrMatch, c: &&str| matches!(m, StrMatch::Present) || m.matches(c);
        let one = |v: &str| set.test(|| Some(v), hit);
        match self {
            HeaderKey::Name(_, Some(bit)) if present & (1 << bit) == 0 => {
                set.test(|| None::<&str>, hit)
            }
            HeaderKey::Name(name, _) => set.test(
                || {
                    h.headers.get_all(name).iter().flat_map(|v| {
                        // Non-UTF-8 values are present but match no text.
                        elements(std::str::from_utf8(v.as_bytes()).unwrap_or("\u{fffd}"))
                    })
                },
                hit,
            ),
            HeaderKey::Method => one(h.method),
            HeaderKey::Path => one(h.path),
            HeaderKey::Authority => one(h.host),
            HeaderKey::Invalid => set.test(|| None::<&str>, hit),
        }
    }
}

/// A header value, then its comma-separated elements if it has several.
fn elements(value: &str) -> impl Iterator<Item = &str> {
    let whole = value.trim();
    let several = whole.contains(',');
    std::iter::once(whole).chain(whole.split(',').map(str::trim).filter(move |_| several))
}

/// Istio's string match: `abc` exact, `abc*` prefix, `*abc` suffix, `*` any non-empty value.
/// A `*` elsewhere is literal.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl StrMatch {
    fn parse(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Present
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.to_string())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else {
            StrMatch::Exact(v.to_string())
        }
    }

    #[inline]
    fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == e,
            StrMatch::Prefix(p) => s.starts_with(p.as_str()),
            StrMatch::Suffix(x) => s.ends_with(x.as_str()),
            StrMatch::Present => !s.is_empty(),
        }
    }
}

fn str_match(v: &str) -> Option<StrMatch> {
    Some(StrMatch::parse(v))
}

/// Hosts compare case-insensitively and without port or trailing dot, on both sides:
/// `example.com:*` (Istio's advice for matching any port) means `example.com`.
fn host_match(v: &str) -> Option<StrMatch> {
    Some(StrMatch::parse(&normalize_host(v)))
}

fn port(v: &str) -> Option<u16> {
    v.trim().parse().ok()
}

/// A namespace pattern: Istio turns every `*` into `.*`, so `*` is a wildcard anywhere.
#[derive(Clone, Debug)]
struct Glob(Vec<String>);

fn glob(v: &str) -> Option<Glob> {
    Some(Glob(v.split('*').map(str::to_string).collect()))
}

impl Glob {
    fn matches(&self, s: &str) -> bool {
        let (first, rest) = match self.0.split_first() {
            Some(x) => x,
            None => return s.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            return s == first;
        };
        let Some(mut s) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some(end) = s.len().checked_sub(last.len()) else {
            return false;
        };
        if !s.ends_with(last.as_str()) {
            return false;
        }
        s = &s[..end];
        for part in middle {
            match s.find(part.as_str()) {
                Some(i) => s = &s[i + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// An IP or CIDR block (`10.0.0.1`, `10.0.0.0/8`, `fd00::/8`). IPv4-mapped IPv6 addresses
/// match as the IPv4 address they carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = match s.trim().split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s.trim(), None),
        };
        let ip: IpAddr = ip.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if l.bytes().all(|b| b.is_ascii_digit()) => l.parse().ok()?,
            Some(_) => return None,
        };
        if len > max {
            return None;
        }
        let (ip, len) = match ip {
            IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), len - 96),
                None => (ip, len),
            },
            _ => (ip, len),
        };
        Some(Cidr {
            net: mask(ip, len),
            len,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.len) == self.net
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// A `paths` value: Istio's string match, or a path template when it contains `{*}` or `{**}`.
///
/// Templates follow Istio (API reference, `Operation.paths`) on Envoy's URI template matcher:
/// `{*}` is exactly one non-empty segment, `{**}` any text including `/` (zero or more
/// segments), and may only be the last operator; other segments are literal and may not hold
/// `*`, `{` or `}`. `/foo/{**}` matches `/foo/` and `/foo/a/b` but not `/foo` (Envoy turns
/// `{**}` into a regex that may be empty but follows the `/`). Unlike Envoy, the operators
/// accept any character (Envoy's pchar class leaves out `*` and `=`). An invalid template
/// does not compile (see the module doc).
#[derive(Clone, Debug)]
enum PathMatch {
    Plain(StrMatch),
    Template {
        /// Segments before `{**}` (all of them without it).
        head: Vec<Segment>,
        /// With `{**}`: the literal text that must end the path after it (`""`, `/x/y`).
        tail: Option<String>,
    },
}

#[derive(Clone, Debug)]
enum Segment {
    Literal(String),
    One,
}

impl PathMatch {
    fn parse(v: &str) -> Option<PathMatch> {
        if !v.contains("{*}") && !v.contains("{**}") {
            return Some(PathMatch::Plain(StrMatch::parse(v)));
        }
        let mut head = Vec::new();
        let mut tail: Option<Vec<&str>> = None;
        for seg in v.strip_prefix('/')?.split('/') {
            match (seg, &mut tail) {
                ("{**}" | "{*}", Some(_)) => return None,
                ("{**}", None) => tail = Some(Vec::new()),
                ("{*}", None) => head.push(Segment::One),
                (lit, _) if lit.contains(['*', '{', '}']) => return None,
                (lit, Some(t)) => t.push(lit),
                (lit, None) => head.push(Segment::Literal(lit.to_string())),
            }
        }
        let tail = tail.map(|t| t.iter().map(|s| format!("/{s}")).collect());
        Some(PathMatch::Template { head, tail })
    }

    #[inline]
    fn matches(&self, path: &str) -> bool {
        let (head, tail) = match self {
            PathMatch::Plain(m) => return m.matches(path),
            PathMatch::Template { head, tail } => (head, tail),
        };
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let fits = |s: &Segment, x: &str| match s {
            Segment::Literal(l) => l == x,
            Segment::One => !x.is_empty(),
        };
        match tail {
            None => {
                let mut segs = rest.split('/');
                head.iter().all(|s| segs.next().is_some_and(|x| fits(s, x)))
                    && segs.next().is_none()
            }
            Some(tail) => {
                for s in head {
                    match rest.split_once('/') {
                        Some((x, r)) if fits(s, x) => rest = r,
                        _ => return false,
                    }
                }
                rest.ends_with(tail.as_str())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::path::normalize;
    use http::HeaderValue;
    use serde_json::json;
    use std::path::Path;
    use trellis_api::resources::{parse, Resource};

    const ROOT: &str = "istio-system";
    const FRONTEND: &str = "cluster.local/ns/edtech-production/sa/frontend-service";
    const OTHER: &str = "cluster.local/ns/edtech-production/sa/grades-service";

    fn load(yaml: &str) -> Vec<AuthorizationPolicy> {
        let (ok, errors) = parse(Path::new("t.yaml"), yaml);
        assert!(errors.is_empty(), "{yaml}\n{errors:?}");
        ok.into_iter()
            .map(|l| match l.resource {
                Resource::AuthorizationPolicy(p) => p,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// One policy document in namespace `app` (flow-style `spec`).
    fn doc(name: &str, spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: app }}\nspec: {spec}\n---\n")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn compile(yaml: &str) -> Authz {
        let policies = load(yaml);
        Authz::compile(&policies, "app", &labels(&[("app", "web")]), ROOT)
    }

    fn jwt() -> JwtAttrs {
        JwtAttrs {
            principal: "https://issuer.example/alice".into(),
            audiences: vec!["api".into(), "web".into()],
            claims: json!({
                "iss": "https://issuer.example", "sub": "alice", "azp": "portal",
                "groups": ["eng", "admin"], "org": { "role": "owner", "tier": ["gold"] },
                "email_verified": true,
            }),
        }
    }

    /// A request to test with: mTLS from `app/client`, `GET example.com/` on port 8080.
    struct Req {
        principal: Option<&'static str>,
        namespace: Option<&'static str>,
        source_ip: IpAddr,
        remote_ip: IpAddr,
        destination_ip: Option<IpAddr>,
        port: u16,
        http: bool,
        method: &'static str,
        host: String,
        path: String,
        headers: HeaderMap,
        jwt: Option<JwtAttrs>,
    }

    fn req() -> Req {
        Req {
            principal: Some("cluster.local/ns/app/sa/client"),
            namespace: Some("app"),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "203.0.113.7".parse().unwrap(),
            destination_ip: Some("10.0.0.9".parse().unwrap()),
            port: 8080,
            http: true,
            method: "GET",
            host: "example.com".into(),
            path: "/".into(),
            headers: HeaderMap::new(),
            jwt: None,
        }
    }

    impl Req {
        fn from(mut self, principal: &'static str) -> Self {
            self.principal = Some(principal);
            self.namespace = principal_namespace(principal);
            self
        }
        fn plaintext(mut self) -> Self {
            (self.principal, self.namespace) = (None, None);
            self
        }
        fn ip(mut self, ip: &str) -> Self {
            self.source_ip = ip.parse().unwrap();
            self
        }
        fn no_destination_ip(mut self) -> Self {
            self.destination_ip = None;
            self
        }
        fn port(mut self, port: u16) -> Self {
            self.port = port;
            self
        }
        fn tcp(mut self) -> Self {
            self.http = false;
            self
        }
        fn method(mut self, method: &'static str) -> Self {
            self.method = method;
            self
        }
        fn host(mut self, authority: &str) -> Self {
            self.host = normalize_host(authority).into_owned();
            self
        }
        fn path(mut self, raw: &str) -> Self {
            self.path = normalize(raw).unwrap();
            self
        }
        fn header(mut self, name: &'static str, value: &str) -> Self {
            self.headers
                .append(name, HeaderValue::from_bytes(value.as_bytes()).unwrap());
            self
        }
        fn jwt(mut self) -> Self {
            self.jwt = Some(jwt());
            self
        }
        fn attrs(&self) -> RequestAttrs<'_> {
            RequestAttrs {
                source_principal: self.principal,
                source_namespace: self.namespace,
                source_ip: self.source_ip,
                remote_ip: self.remote_ip,
                destination_ip: self.destination_ip,
                destination_port: self.port,
                http: self.http.then_some(HttpAttrs {
                    method: self.method,
                    host: &self.host,
                    path: &self.path,
                    headers: &self.headers,
                }),
                jwt: self.jwt.as_ref(),
            }
        }
    }

    /// Each `rule` alone in an ALLOW policy: does `req` match it?
    #[test]
    fn every_field_and_its_negation() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Req, bool)> = vec![
            // principals
            (r#"{ from: [{ source: { principals: ["cluster.local/ns/app/sa/client"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { principals: ["cluster.local/ns/app/sa/other"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { principals: ["cluster.local/ns/app/*"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { principals: ["*/sa/client"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { principals: ["cluster.local/*/sa/client"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { principals: ["*"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { principals: ["*"] } }] }"#, req().plaintext(), false),
            (r#"{ from: [{ source: { notPrincipals: ["cluster.local/ns/app/sa/client"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { notPrincipals: ["*"] } }] }"#, req().plaintext(), true),
            (r#"{ from: [{ source: { principals: ["*"], notPrincipals: ["*/sa/client"] } }] }"#, req(), false),
            // requestPrincipals
            (r#"{ from: [{ source: { requestPrincipals: ["https://issuer.example/alice"] } }] }"#, req().jwt(), true),
            (r#"{ from: [{ source: { requestPrincipals: ["https://issuer.example/*"] } }] }"#, req().jwt(), true),
            (r#"{ from: [{ source: { requestPrincipals: ["*"] } }] }"#, req().jwt(), true),
            (r#"{ from: [{ source: { requestPrincipals: ["*"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { notRequestPrincipals: ["*"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { notRequestPrincipals: ["*/alice"] } }] }"#, req().jwt(), false),
            // namespaces (a `*` anywhere is a wildcard, as in Istio)
            (r#"{ from: [{ source: { namespaces: ["app"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { namespaces: ["ap*"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { namespaces: ["a*p"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { namespaces: ["a*x"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { namespaces: ["*"] } }] }"#, req().plaintext(), false),
            (r#"{ from: [{ source: { notNamespaces: ["app"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { notNamespaces: ["app"] } }] }"#, req().plaintext(), true),
            // ipBlocks / remoteIpBlocks
            (r#"{ from: [{ source: { ipBlocks: ["10.0.0.0/8"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { ipBlocks: ["10.0.0.1"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { ipBlocks: ["10.0.0.2", "192.168.0.0/16"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { ipBlocks: ["10.0.0.0/8"] } }] }"#, req().ip("::ffff:10.1.2.3"), true),
            (r#"{ from: [{ source: { ipBlocks: ["fd00::/8"] } }] }"#, req().ip("fd00::1"), true),
            (r#"{ from: [{ source: { ipBlocks: ["fd00::/8"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { ipBlocks: ["0.0.0.0/0"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { notIpBlocks: ["10.0.0.0/24"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { remoteIpBlocks: ["203.0.113.0/24"] } }] }"#, req(), true),
            (r#"{ from: [{ source: { remoteIpBlocks: ["10.0.0.0/8"] } }] }"#, req(), false),
            (r#"{ from: [{ source: { notRemoteIpBlocks: ["203.0.113.7"] } }] }"#, req(), false),
            // several fields of one source: all must match
            (r#"{ from: [{ source: { namespaces: ["app"], ipBlocks: ["192.168.0.0/16"] } }] }"#, req(), false),
            // hosts (case-insensitive, port and trailing dot ignored)
            (r#"{ to: [{ operation: { hosts: ["example.com"] } }] }"#, req().host("Example.COM.:8080"), true),
            (r#"{ to: [{ operation: { hosts: ["EXAMPLE.com:*"] } }] }"#, req(), true),
            (r#"{ to: [{ operation: { hosts: ["*.example.com"] } }] }"#, req().host("api.example.com"), true),
            (r#"{ to: [{ operation: { hosts: ["*.example.com"] } }] }"#, req(), false),
            (r#"{ to: [{ operation: { hosts: ["example.*"] } }] }"#, req(), true),
            (r#"{ to: [{ operation: { notHosts: ["example.com"] } }] }"#, req(), false),
            // ports
            (r#"{ to: [{ operation: { ports: ["8080"] } }] }"#, req(), true),
            (r#"{ to: [{ operation: { ports: ["9090"] } }] }"#, req(), false),
            (r#"{ to: [{ operation: { notPorts: ["8080"] } }] }"#, req(), false),
            (r#"{ to: [{ operation: { notPorts: ["8080"] } }] }"#, req().port(9090), true),
            // methods (case-sensitive)
            (r#"{ to: [{ operation: { methods: ["GET", "HEAD"] } }] }"#, req(), true),
            (r#"{ to: [{ operation: { methods: ["get"] } }] }"#, req(), false),
            (r#"{ to: [{ operation: { notMethods: ["GET"] } }] }"#, req(), false),
            (r#"{ to: [{ operation: { notMethods: ["GET"] } }] }"#, req().method("POST"), true),
            // paths
            (r#"{ to: [{ operation: { paths: ["/api/*"] } }] }"#, req().path("/api/x/y"), true),
            (r#"{ to: [{ operation: { paths: ["/api/*"] } }] }"#, req().path("/api"), false),
            (r#"{ to: [{ operation: { paths: ["*/info"] } }] }"#, req().path("/a/info"), true),
            (r#"{ to: [{ operation: { paths: ["/admin"] } }] }"#, req().path("/ADMIN"), false),
            (r#"{ to: [{ operation: { paths: ["/admin"] } }] }"#, req().path("/admin;x"), false),
            (r#"{ to: [{ operation: { paths: ["/admin"] } }] }"#, req().path("//x/..//%61dmin"), true),
            (r#"{ to: [{ operation: { paths: ["/a/*/c"] } }] }"#, req().path("/a/b/c"), false),
            (r#"{ to: [{ operation: { paths: ["/a/*/c"] } }] }"#, req().path("/a/*/c"), true),
            (r#"{ to: [{ operation: { paths: ["/api/{*}/info"] } }] }"#, req().path("/api/7/info"), true),
            (r#"{ to: [{ operation: { paths: ["/api/{*}/info"] } }] }"#, req().path("/api/7/8/info"), false),
            (r#"{ to: [{ operation: { paths: ["/api/{*}"] } }] }"#, req().path("/api/"), false),
            (r#"{ to: [{ operation: { paths: ["/api/{**}"] } }] }"#, req().path("/api/7/8"), true),
            (r#"{ to: [{ operation: { paths: ["/api/{**}"] } }] }"#, req().path("/api/"), true),
            (r#"{ to: [{ operation: { paths: ["/api/{**}"] } }] }"#, req().path("/api"), false),
            (r#"{ to: [{ operation: { paths: ["/{*}/x/{**}/end"] } }] }"#, req().path("/a/x/b/c/end"), true),
            (r#"{ to: [{ operation: { paths: ["/{*}/x/{**}/end"] } }] }"#, req().path("/a/x/end"), false),
            (r#"{ to: [{ operation: { notPaths: ["/healthz"] } }] }"#, req().path("/healthz"), false),
            (r#"{ to: [{ operation: { notPaths: ["/healthz"] } }] }"#, req().path("/x"), true),
            (r#"{ to: [{ operation: { methods: ["GET"], paths: ["/x"] } }] }"#, req().path("/y"), false),
            // several sources / operations: any one
            (r#"{ from: [{ source: { namespaces: ["nope"] } }, { source: { ipBlocks: ["10.0.0.1"] } }] }"#, req(), true),
            (r#"{ to: [{ operation: { methods: ["PUT"] } }, { operation: { ports: ["8080"] } }] }"#, req(), true),
            // request.headers
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["admin"] }] }"#, req().header("x-role", "admin"), true),
            (r#"{ when: [{ key: "request.headers[X-Role]", values: ["admin"] }] }"#, req().header("x-role", "admin"), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["admin"] }] }"#, req().header("x-role", "Admin"), false),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["admin"] }] }"#, req(), false),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["adm*"] }] }"#, req().header("x-role", "admin"), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["admin"] }] }"#, req().header("x-role", "guest, admin"), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["admin"] }] }"#, req().header("x-role", "guest").header("x-role", "admin"), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["guest, admin"] }] }"#, req().header("x-role", "guest, admin"), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["*"] }] }"#, req().header("x-role", ""), true),
            (r#"{ when: [{ key: "request.headers[x-role]", values: ["*"] }] }"#, req(), false),
            (r#"{ when: [{ key: "request.headers[x-role]", notValues: ["admin"] }] }"#, req(), true),
            (r#"{ when: [{ key: "request.headers[x-role]", notValues: ["admin"] }] }"#, req().header("x-role", "guest,admin"), false),
            (r#"{ when: [{ key: "request.headers[x-role]", notValues: ["*"] }] }"#, req().header("x-role", ""), false),
            (r#"{ when: [{ key: "request.headers[:method]", values: ["GET"] }] }"#, req(), true),
            (r#"{ when: [{ key: "request.headers[:authority]", values: ["example.com"] }] }"#, req(), true),
            // other condition keys
            (r#"{ when: [{ key: source.ip, values: ["10.0.0.0/8"] }] }"#, req(), true),
            (r#"{ when: [{ key: source.ip, notValues: ["10.0.0.1"] }] }"#, req(), false),
            (r#"{ when: [{ key: remote.ip, values: ["203.0.113.7"] }] }"#, req(), true),
            (r#"{ when: [{ key: destination.ip, values: ["10.0.0.9"] }] }"#, req(), true),
            (r#"{ when: [{ key: destination.ip, values: ["10.0.0.8"] }] }"#, req(), false),
            (r#"{ when: [{ key: destination.ip, notValues: ["10.0.0.8"] }] }"#, req().no_destination_ip(), false),
            (r#"{ when: [{ key: destination.port, values: ["8080"] }] }"#, req(), true),
            (r#"{ when: [{ key: destination.port, notValues: ["8080"] }] }"#, req(), false),
            (r#"{ when: [{ key: source.namespace, values: ["app"] }] }"#, req(), true),
            (r#"{ when: [{ key: source.principal, values: ["*/sa/client"] }] }"#, req(), true),
            (r#"{ when: [{ key: source.principal, values: ["*"] }] }"#, req().plaintext(), false),
            (r#"{ when: [{ key: request.auth.principal, values: ["https://issuer.example/alice"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: request.auth.principal, values: ["*"] }] }"#, req(), false),
            (r#"{ when: [{ key: request.auth.audiences, values: ["web"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: request.auth.audiences, values: ["other"] }] }"#, req().jwt(), false),
            (r#"{ when: [{ key: request.auth.audiences, notValues: ["api"] }] }"#, req().jwt(), false),
            (r#"{ when: [{ key: request.auth.presenter, values: ["portal"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: "request.auth.claims[sub]", values: ["alice"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: "request.auth.claims[groups]", values: ["admin"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: "request.auth.claims[groups]", notValues: ["admin"] }] }"#, req().jwt(), false),
            (r#"{ when: [{ key: "request.auth.claims[groups]", values: ["ops"] }] }"#, req().jwt(), false),
            (r#"{ when: [{ key: "request.auth.claims[org][role]", values: ["owner"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: "request.auth.claims[org][tier]", values: ["gold"] }] }"#, req().jwt(), true),
            (r#"{ when: [{ key: "request.auth.claims[org][role]", values: ["owner"] }] }"#, req(), false),
            (r#"{ when: [{ key: "request.auth.claims[email_verified]", values: ["true"] }] }"#, req().jwt(), false),
            (r#"{ when: [{ key: "request.auth.claims[nope]", notValues: ["x"] }] }"#, req().jwt(), true),
            // conditions are ANDed
            (r#"{ when: [{ key: source.ip, values: ["10.0.0.1"] }, { key: destination.port, values: ["1"] }] }"#, req(), false),
            // Envoy metadata: not available here
            (r#"{ when: [{ key: "experimental.envoy.filters.network.mysql_proxy[db.table]", values: ["[update]"] }] }"#, req(), false),
        ];
        for (rule, r, want) in cases {
            let authz = compile(&doc("p", &format!("{{ rules: [{rule}] }}")));
            let d = authz.decide(&r.attrs());
            assert_eq!(d.allowed, want, "{rule}");
            let policy = want.then(|| Arc::from("app/p"));
            assert_eq!(d.policy, policy, "{rule}");
        }
    }

    /// The same tests in a DENY policy: a DENY must never turn into an allow when the data
    /// to decide is missing.
    #[test]
    fn deny_policies_fail_closed() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Req, bool)> = vec![
            (r#"{ when: [{ key: destination.ip, values: ["10.0.0.8"] }] }"#, req().no_destination_ip(), false),
            (r#"{ when: [{ key: destination.ip, values: ["10.0.0.8"] }] }"#, req(), true),
            (r#"{ when: [{ key: "experimental.envoy.filters.a[b]", values: ["c"] }] }"#, req(), false),
            (r#"{ to: [{ operation: { paths: ["/admin*"] } }] }"#, req().path("/admin/x"), false),
            (r#"{ to: [{ operation: { paths: ["/admin*"] } }] }"#, req().path("/%61dmin"), false),
            (r#"{ to: [{ operation: { paths: ["/admin*"] } }] }"#, req().path("/public"), true),
            // an invalid template is dropped: the operation is left empty and matches everything
            (r#"{ to: [{ operation: { paths: ["/a/{**}/{*}"] } }] }"#, req().path("/public"), false),
        ];
        for (rule, r, want) in cases {
            let authz = compile(&doc("d", &format!("{{ action: DENY, rules: [{rule}] }}")));
            let d = authz.decide(&r.attrs());
            assert_eq!(d.allowed, want, "{rule}");
            if !want {
                assert_eq!(d.policy.as_deref(), Some("app/d"), "{rule}");
            }
        }
        // In an ALLOW policy the same invalid template disables the rule.
        let authz = compile(&doc(
            "a",
            r#"{ rules: [{ to: [{ operation: { paths: ["/a/{**}/{*}", "/public"] } }] }] }"#,
        ));
        assert!(!authz.decide(&req().path("/public").attrs()).allowed);
    }

    #[test]
    fn unknown_condition_keys_never_match() {
        for action in [Action::Allow, Action::Deny] {
            let mut p = load(&doc(
                "p",
                r#"{ rules: [{ when: [{ key: source.ip, values: ["10.0.0.1"] }] }] }"#,
            ));
            p[0].spec.action = action;
            if let Some(when) = p[0].spec.rules[0].when.as_mut() {
                when[0].key = "connection.sni".into();
            }
            let authz = Authz::compile(&p, "app", &labels(&[]), ROOT);
            // ALLOW: nothing matches, so deny; DENY: nothing matches, so allow.
            assert_eq!(authz.decide(&req().attrs()).allowed, action == Action::Deny);
        }
    }

    #[test]
    fn evaluation_order() {
        let allow_get = doc(
            "allow-get",
            r#"{ rules: [{ to: [{ operation: { methods: ["GET"] } }] }] }"#,
        );
        let deny_admin = doc(
            "deny-admin",
            r#"{ action: DENY, rules: [{ to: [{ operation: { paths: ["/admin*"] } }] }] }"#,
        );
        let audit_all = doc("audit-all", "{ action: AUDIT, rules: [{}] }");
        let deny_all = doc("deny-all", "{}");
        let allow_all = doc("allow-all", "{ rules: [{}] }");
        let deny_nothing = doc("deny-nothing", "{ action: DENY }");
        let custom = doc(
            "ext",
            r#"{ action: CUSTOM, provider: { name: opa }, rules: [{}] }"#,
        );
        let get = || req();
        let post = || req().method("POST");
        let admin = || req().path("/admin");
        #[rustfmt::skip]
        let cases: Vec<(Vec<&String>, Req, bool, Option<&str>)> = vec![
            (vec![], get(), true, None),
            (vec![&allow_get], get(), true, Some("app/allow-get")),
            (vec![&allow_get], post(), false, None),
            (vec![&deny_admin], post(), true, None),
            (vec![&deny_admin], admin(), false, Some("app/deny-admin")),
            (vec![&allow_get, &deny_admin], admin(), false, Some("app/deny-admin")),
            (vec![&deny_all], get(), false, None),
            (vec![&allow_all], post(), true, Some("app/allow-all")),
            (vec![&deny_all, &allow_all], post(), true, Some("app/allow-all")),
            (vec![&allow_all, &deny_admin], admin(), false, Some("app/deny-admin")),
            (vec![&deny_nothing], admin(), true, None),
            (vec![&audit_all], post(), true, None),
            (vec![&audit_all, &allow_get], post(), false, None),
            (vec![&audit_all, &deny_admin], admin(), false, Some("app/deny-admin")),
            (vec![&custom], post(), true, None),
            (vec![&custom, &deny_all], post(), false, None),
        ];
        for (docs, r, allowed, policy) in cases {
            let yaml: String = docs.iter().map(|d| d.as_str()).collect();
            let authz = compile(&yaml);
            let d = authz.decide(&r.attrs());
            assert_eq!(
                (d.allowed, d.policy.as_deref()),
                (allowed, policy),
                "{yaml}"
            );
            assert_eq!(d.action, if allowed { Action::Allow } else { Action::Deny });
            assert_eq!(d.action_label(), if allowed { "allow" } else { "deny" });
            assert_eq!(d.policy_label(), policy.unwrap_or(""));
            let audited = docs.contains(&&audit_all);
            assert_eq!(d.audited(), audited, "{yaml}");
            if audited {
                assert_eq!(d.audit, [Arc::from("app/audit-all")]);
            }
        }
        assert!(compile("").is_empty());
        assert!(compile(&custom).is_empty());
    }

    #[test]
    fn the_first_matching_policy_by_name_is_reported() {
        let yaml =
            doc("b", "{ action: DENY, rules: [{}] }") + &doc("a", "{ action: DENY, rules: [{}] }");
        let d = compile(&yaml).decide(&req().attrs());
        assert_eq!(d.policy.as_deref(), Some("app/a"));
    }

    #[test]
    fn scope() {
        let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: mesh, namespace: istio-system }
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: mesh-web, namespace: istio-system }
spec: { selector: { matchLabels: { app: web } } }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ns, namespace: app }
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ns-web, namespace: app }
spec: { selector: { matchLabels: { app: web } } }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: all-in-ns, namespace: app }
spec: { selector: {} }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: elsewhere, namespace: other }
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: default-ns }
spec: {}
";
        let policies = load(yaml);
        let applying = |ns: &str, l: &[(&str, &str)]| -> Vec<String> {
            policies
                .iter()
                .filter(|p| applies_to(p, ns, &labels(l), ROOT))
                .map(|p| p.metadata.name.clone())
                .collect()
        };
        assert_eq!(
            applying("app", &[("app", "web")]),
            ["mesh", "mesh-web", "ns", "ns-web", "all-in-ns"]
        );
        assert_eq!(
            applying("app", &[("app", "db")]),
            ["mesh", "ns", "all-in-ns"]
        );
        assert_eq!(
            applying("third", &[("app", "web"), ("v", "1")]),
            ["mesh", "mesh-web"]
        );
        assert_eq!(applying("default", &[]), ["mesh", "default-ns"]);
        let authz = Authz::compile(&policies, "third", &labels(&[]), ROOT);
        assert_eq!(authz.allow.len(), 1);
    }

    #[test]
    fn tcp_connections() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Req, bool)> = vec![
            // ALLOW: a rule that tests HTTP attributes never matches a connection...
            (r#"{ rules: [{ to: [{ operation: { paths: ["/*"] } }] }] }"#, req().tcp(), false),
            (r#"{ rules: [{ from: [{ source: { requestPrincipals: ["*"] } }, { source: { namespaces: ["app"] } }] }] }"#, req().tcp(), false),
            (r#"{ rules: [{ from: [{ source: { namespaces: ["app"] } }], when: [{ key: "request.headers[x]", notValues: ["y"] }] }] }"#, req().tcp(), false),
            // ...while the other rules still do
            (r#"{ rules: [{ to: [{ operation: { methods: ["GET"] } }] }, { from: [{ source: { namespaces: ["app"] } }] }] }"#, req().tcp(), true),
            (r#"{ rules: [{ to: [{ operation: { ports: ["8080"] } }] }] }"#, req().tcp(), true),
            (r#"{ rules: [{ from: [{ source: { principals: ["*"] } }] }] }"#, req().tcp(), true),
            // DENY: the HTTP tests are dropped and the rest of the rule decides
            (r#"{ action: DENY, rules: [{ to: [{ operation: { methods: ["POST"] } }] }] }"#, req().tcp(), false),
            (r#"{ action: DENY, rules: [{ to: [{ operation: { notPaths: ["/public*"] } }] }] }"#, req().tcp(), false),
            (r#"{ action: DENY, rules: [{ from: [{ source: { namespaces: ["app"] } }], to: [{ operation: { paths: ["/admin*"] } }] }] }"#, req().tcp(), false),
            (r#"{ action: DENY, rules: [{ from: [{ source: { namespaces: ["other"] } }], to: [{ operation: { paths: ["/admin*"] } }] }] }"#, req().tcp(), true),
            (r#"{ action: DENY, rules: [{ to: [{ operation: { ports: ["9090"], methods: ["GET"] } }] }] }"#, req().tcp(), true),
        ];
        for (spec, r, want) in cases {
            let d = compile(&doc("p", spec)).decide(&r.attrs());
            assert_eq!(d.allowed, want, "{spec}");
        }
    }

    const USER_DATA: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: { name: user-data-protection }
spec:
  selector: { matchLabels: { app: user-service } }
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/edtech-production/sa/frontend-service"] } }]
  - to: [{ operation: { methods: ["GET", "PUT"], paths: ["/api/v1/users/*"] } }]
  - when: [{ key: "request.headers[x-user-role]", values: ["admin", "user-owner"] }]
"#;

    fn user_service(yaml: &str) -> Authz {
        let policies = load(yaml);
        let authz = Authz::compile(
            &policies,
            "default",
            &labels(&[("app", "user-service")]),
            ROOT,
        );
        assert!(!authz.is_empty());
        authz
    }

    /// The issue's policy: three independent rules, any of which allows.
    #[test]
    fn user_data_protection() {
        let authz = user_service(USER_DATA);
        let policy = Some("default/user-data-protection");
        #[rustfmt::skip]
        let cases: Vec<(Req, Option<&str>)> = vec![
            // second rule: anyone may GET or PUT a user
            (req().from(OTHER).path("/api/v1/users/7"), policy),
            (req().from(OTHER).method("PUT").path("/api/v1/users/7"), policy),
            (req().plaintext().path("/api/v1/users/7"), policy),
            (req().from(OTHER).method("POST").path("/api/v1/users/7"), None),
            (req().from(OTHER).path("/api/v1/users"), None),
            (req().from(OTHER).path("/api/v1/users/7/../../grades"), None),
            (req().from(OTHER).path("/API/v1/users/7"), None),
            // third rule: the role header
            (req().from(OTHER).method("POST").path("/api/v1/grades"), None),
            (req().from(OTHER).method("POST").path("/api/v1/grades").header("x-user-role", "admin"), policy),
            (req().from(OTHER).method("POST").path("/api/v1/grades").header("x-user-role", "user-owner"), policy),
            (req().from(OTHER).method("POST").path("/api/v1/grades").header("x-user-role", "guest"), None),
            (req().from(OTHER).method("POST").path("/api/v1/grades").header("x-user-role", ""), None),
            // first rule: the frontend may do anything
            (req().from(FRONTEND).method("DELETE").path("/api/v1/grades"), policy),
            (req().from(FRONTEND).method("POST").path("/admin").tcp(), policy),
            // a connection from anyone else: rules 2 and 3 test HTTP, so they never match
            (req().from(OTHER).tcp(), None),
        ];
        for (r, want) in cases {
            let d = authz.decide(&r.attrs());
            let ctx = format!("{:?} {} {} {:?}", r.principal, r.method, r.path, r.headers);
            assert_eq!(d.allowed, want.is_some(), "{ctx}");
            assert_eq!(d.policy.as_deref(), want, "{ctx}");
        }
        // Other workloads are not covered by it.
        let policies = load(USER_DATA);
        let other = Authz::compile(&policies, "default", &labels(&[("app", "grades")]), ROOT);
        assert!(other.is_empty());
    }

    /// With `notValues: [""]` the condition is "the header is not exactly empty". Istio
    /// builds it as `not(header x-user-role == "")`, and Envoy's header matcher does not match
    /// an absent header, so a request WITHOUT the header matches the rule and is allowed;
    /// only a present, empty header fails it.
    #[test]
    fn user_data_protection_with_not_values() {
        let yaml = USER_DATA.replace("values: [\"admin\", \"user-owner\"]", "notValues: [\"\"]");
        let authz = user_service(&yaml);
        let grades = || req().from(OTHER).method("POST").path("/api/v1/grades");
        #[rustfmt::skip]
        let cases: Vec<(Req, bool)> = vec![
            (grades(), true),
            (grades().header("x-user-role", ""), false),
            (grades().header("x-user-role", "guest"), true),
            (grades().header("x-user-role", "admin"), true),
            (grades().header("x-user-role", "guest").header("x-user-role", ""), false),
            (grades().tcp(), false),
        ];
        for (r, want) in cases {
            assert_eq!(authz.decide(&r.attrs()).allowed, want, "{:?}", r.headers);
        }
    }

    #[test]
    fn namespaces_of_principals() {
        assert_eq!(principal_namespace(FRONTEND), Some("edtech-production"));
        assert_eq!(principal_namespace("td/ns/a"), Some("a"));
        assert_eq!(principal_namespace("td/ns//sa/x"), None);
        assert_eq!(principal_namespace("td/sa/x"), None);
    }

    #[test]
    fn hosts_are_normalized() {
        for (authority, want) in [
            ("Example.COM", "example.com"),
            ("example.com:8080", "example.com"),
            ("example.com.", "example.com"),
            ("example.com.:80", "example.com"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("::1", "::1"),
            ("10.0.0.1:80", "10.0.0.1"),
        ] {
            assert_eq!(normalize_host(authority), want, "{authority}");
        }
    }

    #[test]
    fn cidrs() {
        let yes = [
            ("10.0.0.0/8", "10.255.0.1"),
            ("10.1.2.3/8", "10.9.9.9"),
            ("10.0.0.1", "10.0.0.1"),
            ("0.0.0.0/0", "192.0.2.1"),
            ("fd00::/8", "fd12::1"),
            ("::/0", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("10.0.0.0/8", "::ffff:10.0.0.1"),
            ("::ffff:10.0.0.0/104", "10.1.1.1"),
        ];
        for (cidr, ip) in yes {
            let c = Cidr::parse(cidr).unwrap();
            assert!(c.contains(ip.parse().unwrap()), "{cidr} {ip}");
        }
        let no = [
            ("10.0.0.0/8", "11.0.0.1"),
            ("10.0.0.1", "10.0.0.2"),
            ("0.0.0.0/0", "::1"),
            ("::/0", "10.0.0.1"),
        ];
        for (cidr, ip) in no {
            let c = Cidr::parse(cidr).unwrap();
            assert!(!c.contains(ip.parse().unwrap()), "{cidr} {ip}");
        }
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x",
            "",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn path_templates() {
        for bad in [
            "/a/{**}/{*}",
            "/{**}/{**}",
            "/a/{*}.txt",
            "/a*/{*}",
            "a/{*}",
            "/{*}/{",
        ] {
            assert!(PathMatch::parse(bad).is_none(), "{bad}");
        }
        let cases = [
            ("/foo/{*}", "/foo/bar", true),
            ("/foo/{*}", "/foo/bar/baz", false),
            ("/foo/{**}/", "/foo/bar/", true),
            ("/foo/{**}/", "/foo/bar/baz/", true),
            ("/foo/{**}/", "/foo/bar", false),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar", false),
            ("/{**}", "/", true),
            ("/{**}/x", "/x", false),
            ("/{**}/x", "/a/b/x", true),
            ("/{*}", "/", false),
            ("/a/{*}/c", "/a/b=1;x/c", true),
        ];
        for (template, path, want) in cases {
            let m = PathMatch::parse(template).unwrap();
            assert_eq!(m.matches(path), want, "{template} {path}");
        }
    }

    /// Header conditions decide the same whether the request's headers are scanned (few of
    /// them) or looked up (many), and for names past the table's 64 bits.
    #[test]
    fn header_conditions_with_few_many_and_untabled_headers() {
        let yaml: String = (0..70)
            .map(|i| {
                let spec = format!(
                    "{{ action: DENY, rules: [{{ when: [{{ key: 'request.headers[x-h{i}]', values: [on] }}] }}] }}"
                );
                doc(&format!("d{i:02}"), &spec)
            })
            .collect();
        let authz = compile(&yaml);
        assert_eq!(authz.headers.names.len(), 64);
        assert_eq!(authz.len(), 70);
        // Nine other headers: more than a scan takes, so the table's names are looked up.
        let with = |many: bool, name: &'static str, value: &str| {
            let mut r = req();
            for filler in ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
                .iter()
                .filter(|_| many)
            {
                r = r.header(filler, "x");
            }
            assert_eq!(r.headers.keys_len() > HeaderTable::SCAN_MAX, many);
            r.header(name, value)
        };
        for many in [false, true] {
            for i in [0, 9, 63, 64, 69] {
                let header: &'static str = format!("x-h{i}").leak();
                let d = authz.decide(&with(many, header, "on").attrs());
                assert!(!d.allowed, "{header} many={many}");
                let want: Arc<str> = format!("app/d{i:02}").into();
                assert_eq!(d.policy.as_ref(), Some(&want));
                assert_eq!(authz.policy(d.slot.unwrap()), Some(("deny", &want)));
                assert!(authz.decide(&with(many, header, "off").attrs()).allowed);
            }
            assert!(authz.decide(&with(many, "x-h1x", "on").attrs()).allowed);
        }
    }

    /// Rules on many literal paths: past the table's 64 bits, rules are evaluated in full;
    /// below, skipped on their path bits. Either way the decisions are the same.
    #[test]
    fn path_rules_with_and_without_table_bits() {
        let yaml: String = (0..40)
            .map(|i| {
                let spec = format!(
                    "{{ action: DENY, rules: [{{ to: [{{ operation: {{ paths: ['/d{i}', '/p{i}/*'] }} }}] }}] }}"
                );
                doc(&format!("d{i:02}"), &spec)
            })
            .collect();
        let authz = compile(&yaml);
        assert_eq!(authz.paths.bits, 64);
        // A full table takes no new prefix length (it would cost every request a lookup).
        let mut full = authz.paths.clone();
        let lengths = full.prefixes.len();
        assert_eq!(
            full.bit(&StrMatch::Prefix("/a/much/longer/prefix/".into())),
            None
        );
        assert_eq!(full.prefixes.len(), lengths);
        assert_eq!(
            full.bit(&StrMatch::Exact("/d0".into())),
            Some(0),
            "known values keep theirs"
        );
        let guarded = authz
            .deny
            .iter()
            .filter(|p| p.rules[0].path_guard.is_some())
            .count();
        assert_eq!(guarded, 32, "two bits per policy");
        for i in [0, 31, 32, 39] {
            for (path, denied) in [
                (format!("/d{i}"), true),
                (format!("/p{i}/x"), true),
                (format!("/p{i}/"), true),
                (format!("/p{i}"), false),
                (format!("/d{i}/x"), false),
            ] {
                let d = authz.decide(&req().path(&path).attrs());
                assert_eq!(!d.allowed, denied, "{path}");
                if denied {
                    assert_eq!(d.policy.as_deref(), Some(format!("app/d{i:02}").as_str()));
                }
            }
        }
        // On TCP the path tests drop out of a DENY rule: it denies.
        assert!(!authz.decide(&req().tcp().attrs()).allowed);
    }

    #[test]
    fn namespace_globs() {
        for (pattern, ns, want) in [
            ("prod", "prod", true),
            ("prod", "prod-x", false),
            ("prod-*", "prod-eu", true),
            ("*-eu", "prod-eu", true),
            ("team-*-prod", "team-a-prod", true),
            ("team-*-prod", "team-prod", false),
            ("*a*b*", "xaybz", true),
            ("*a*b*", "xbya", false),
            ("*", "", true),
        ] {
            assert_eq!(glob(pattern).unwrap().matches(ns), want, "{pattern} {ns}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::policy::path::normalize;
    use proptest::prelude::*;

    proptest! {
        /// A CIDR holds its own network address, and an address is in its own /32 or /128
        /// but in no other single-address block.
        #[test]
        fn path_table_bits_are_the_matches(
            values in proptest::collection::vec(("[ab/]{0,4}", any::<bool>()), 1..12),
            path in "[ab/]{0,6}",
        ) {
            let mut table = PathTable::default();
            let values: Vec<StrMatch> = values
                .into_iter()
                .map(|(v, prefix)| if prefix { StrMatch::Prefix(v) } else { StrMatch::Exact(v) })
                .collect();
            let bits: Vec<u8> = values.iter().map(|v| table.bit(v).unwrap()).collect();
            let matched = table.matched(&path);
            for (v, bit) in values.iter().zip(bits) {
                prop_assert_eq!(matched & 1 << bit != 0, v.matches(&path), "{:?}", v);
            }
        }

        #[test]
        fn cidr_membership(a in any::<u32>(), b in any::<u32>(), len in 0u8..=32) {
            let (a4, b4) = (IpAddr::V4(a.into()), IpAddr::V4(b.into()));
            let block = Cidr::parse(&format!("{a4}/{len}")).unwrap();
            prop_assert!(block.contains(a4));
            let shift = 32 - u32::from(len);
            let same_net = a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0);
            prop_assert_eq!(block.contains(b4), same_net);
            prop_assert_eq!(Cidr::parse(&a4.to_string()).unwrap().contains(b4), a == b);
        }

        /// Istio string matches agree with their plain-string meaning.
        #[test]
        fn string_matches(value in "[a-c/]{0,6}", s in "[a-c/]{0,6}") {
            prop_assert_eq!(StrMatch::parse(&value).matches(&s), value == s);
            // With an empty value both spell `*`: any non-empty string.
            let (prefix, suffix) = if value.is_empty() {
                (!s.is_empty(), !s.is_empty())
            } else {
                (s.starts_with(&value), s.ends_with(&value))
            };
            prop_assert_eq!(StrMatch::parse(&format!("{value}*")).matches(&s), prefix);
            prop_assert_eq!(StrMatch::parse(&format!("*{value}")).matches(&s), suffix);
        }

        /// `/{**}` matches every normalized path; `{*}` consumes exactly one segment.
        #[test]
        fn templates_count_segments(raw in "(/[a-z.]{0,3}){0,5}") {
            let path = normalize(&raw).unwrap();
            let any = PathMatch::parse("/{**}").unwrap().matches(&path);
            prop_assert!(any, "{}", path);
            let segments = path.split('/').skip(1).filter(|s| !s.is_empty()).count();
            let trailing = path.len() > 1 && path.ends_with('/');
            let one = PathMatch::parse("/{*}").unwrap().matches(&path);
            prop_assert_eq!(one, segments == 1 && !trailing);
            let two = PathMatch::parse("/{*}/{*}").unwrap().matches(&path);
            prop_assert_eq!(two, segments == 2 && !trailing);
        }
    }
}
