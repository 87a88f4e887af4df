//! Istio's `AuthorizationPolicy`: which requests a workload accepts.
//!
//! Scope follows Istio (root namespace: mesh, other namespaces: that namespace, `selector`:
//! the selected workloads). A rule matches when all its `from`, `to` and `when` match; an
//! ALLOW policy with no rules allows nothing (deny-all), `rules: [{}]` matches everything.
//! `CUSTOM` is read so that `trellis analyze` can reject it with a precise message.

use super::common::{check_non_empty, check_port, Invalid};
use super::{ObjectMeta, Unsupported, WorkloadSelector};
use serde::{Deserialize, Serialize};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 2] = super::peer_authentication::API_VERSIONS;

/// Attributes a `when` condition may test; `[...]` ones take a name in brackets.
const CONDITION_KEYS: [&str; 11] = [
    "request.headers[",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[",
    "destination.ip",
    "destination.port",
];

/// The resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// `security.istio.io/v1` or `v1beta1`.
    pub api_version: String,
    /// `AuthorizationPolicy`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads this applies to; absent: the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Gateway API attachment: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Unsupported>,
    /// Gateway API attachment: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Unsupported>,
    /// Rules; a request matching any of them gets `action`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What a match means.
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a `CUSTOM` policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
}

/// Policy actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching requests (once a workload has ALLOW policies, others are denied).
    #[default]
    Allow,
    /// Deny matching requests (evaluated before ALLOW).
    Deny,
    /// Log matching requests.
    Audit,
    /// Ask an external authorizer (`provider`).
    Custom,
}

/// `{ name: <extension provider> }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Name of an extension provider of the mesh config.
    pub name: String,
}

/// One rule: every given part must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources; any one must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RuleFrom>>,
    /// Operations; any one must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RuleTo>>,
    /// Conditions; all must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// `{ source: ... }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    pub source: Source,
}

/// Who sends the request. Lists match any value (`*` prefix/suffix wildcards); `not*` lists
/// must not match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities (`cluster.local/ns/<ns>/sa/<sa>`), from mTLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Negation of `principals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT `<iss>/<sub>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Negation of `requestPrincipals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces, from mTLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Negation of `namespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negation of `ipBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs or CIDRs (X-Forwarded-For / PROXY protocol).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negation of `remoteIpBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    /// Peer service accounts: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Unsupported>,
    /// Negation of `serviceAccounts`: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_service_accounts: Option<Unsupported>,
}

/// `{ operation: ... }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    pub operation: Operation,
}

/// What the request does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Hosts (authority).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negation of `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Negation of `ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (gRPC: always `POST`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Negation of `methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Paths (without query), `*` prefix/suffix wildcards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Negation of `paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `{ key, values | notValues }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute, e.g. `request.headers[x-user-role]`, `source.ip`.
    pub key: String,
    /// Matches when the attribute equals any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Matches when the attribute equals none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

fn check_ip_blocks(blocks: &[String], path: &str) -> Result<(), Invalid> {
    for (i, b) in blocks.iter().enumerate() {
        let (ip, len) = b.split_once('/').unwrap_or((b, ""));
        let addr = ip.parse::<std::net::IpAddr>().ok();
        let max = if addr.is_some_and(|a| a.is_ipv4()) {
            32
        } else {
            128
        };
        let len_ok = len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max);
        if addr.is_none() || !len_ok {
            return Err((
                format!("{path}[{i}]"),
                format!("{b:?} is not an IP address or CIDR"),
            ));
        }
    }
    Ok(())
}

fn check_ports(ports: &[String], path: &str) -> Result<(), Invalid> {
    for (i, p) in ports.iter().enumerate() {
        let n = p.parse::<u32>().map_err(|_| {
            (
                format!("{path}[{i}]"),
                format!("{p:?} is not a port number"),
            )
        })?;
        check_port(n, &format!("{path}[{i}]"))?;
    }
    Ok(())
}

impl AuthorizationPolicy {
    /// Checks what Istio's validation checks: non-empty sources, operations and conditions,
    /// known condition keys, IP blocks, ports, and `provider` exactly with `CUSTOM`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let spec = &self.spec;
        match (spec.action, &spec.provider) {
            (Action::Custom, None) => {
                return Err((
                    "spec.provider".into(),
                    "action CUSTOM needs a provider".into(),
                ))
            }
            (Action::Custom, Some(p)) => {
                check_non_empty(&p.name, "spec.provider.name", "provider name")?
            }
            (_, Some(_)) => {
                return Err((
                    "spec.provider".into(),
                    "provider is only allowed with action CUSTOM".into(),
                ))
            }
            (_, None) => {}
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            validate_rule(rule, &format!("spec.rules[{i}]"))?;
        }
        Ok(())
    }
}

fn validate_rule(rule: &Rule, path: &str) -> Result<(), Invalid> {
    if let Some(from) = &rule.from {
        if from.is_empty() {
            return Err((
                format!("{path}.from"),
                "from must not be empty (omit it to match any source)".into(),
            ));
        }
        for (j, f) in from.iter().enumerate() {
            let p = format!("{path}.from[{j}].source");
            if f.source == Source::default() {
                return Err((p, "source must not be empty".into()));
            }
            let s = &f.source;
            for (name, blocks) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                check_ip_blocks(blocks, &format!("{p}.{name}"))?;
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return Err((
                format!("{path}.to"),
                "to must not be empty (omit it to match any operation)".into(),
            ));
        }
        for (j, t) in to.iter().enumerate() {
            let p = format!("{path}.to[{j}].operation");
            if t.operation == Operation::default() {
                return Err((p, "operation must not be empty".into()));
            }
            check_ports(&t.operation.ports, &format!("{p}.ports"))?;
            check_ports(&t.operation.not_ports, &format!("{p}.notPorts"))?;
        }
    }
    if let Some(when) = &rule.when {
        if when.is_empty() {
            return Err((
                format!("{path}.when"),
                "when must not be empty (omit it to match always)".into(),
            ));
        }
        for (j, c) in when.iter().enumerate() {
            validate_condition(c, &format!("{path}.when[{j}]"))?;
        }
    }
    Ok(())
}

fn validate_condition(c: &Condition, path: &str) -> Result<(), Invalid> {
    let known = CONDITION_KEYS.iter().any(|k| match k.strip_suffix('[') {
        Some(prefix) => c
            .key
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|n| !n.is_empty()),
        None => c.key == *k,
    }) || c.key.starts_with("experimental.envoy.filters.");
    if !known {
        return Err((format!("{path}.key"), format!("unknown attribute {:?} (e.g. request.headers[<name>], source.ip, request.auth.claims[<claim>], destination.port)", c.key)));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((path.into(), "set values or notValues".into()));
    }
    match c.key.as_str() {
        "source.ip" | "remote.ip" | "destination.ip" => {
            check_ip_blocks(&c.values, &format!("{path}.values"))?;
            check_ip_blocks(&c.not_values, &format!("{path}.notValues"))
        }
        "destination.port" => {
            check_ports(&c.values, &format!("{path}.values"))?;
            check_ports(&c.not_values, &format!("{path}.notValues"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Resource};
    use super::Action;
    use std::path::Path;

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

    #[test]
    fn real_policies_load_unchanged() {
        let not_values =
            USER_DATA.replace("values: [\"admin\", \"user-owner\"]", "notValues: [\"\"]");
        let deny_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: deny-all, namespace: edtech }\nspec: {}\n";
        let allow_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: allow-all }\nspec:\n  action: ALLOW\n  rules: [{}]\n";
        let custom = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: ext }\nspec:\n  action: CUSTOM\n  provider: { name: opa }\n  rules: [{ to: [{ operation: { paths: [/admin/*], ports: [\"8080\"] } }] }]\n";
        for text in [USER_DATA, &not_values, deny_all, allow_all, custom] {
            let (ok, errors) = parse(Path::new("x.yaml"), text);
            assert!(errors.is_empty(), "{text}\n{errors:?}");
            assert_eq!(ok.len(), 1);
        }
        let (ok, _) = parse(Path::new("x.yaml"), &not_values);
        let Resource::AuthorizationPolicy(p) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        assert_eq!(p.spec.action, Action::Allow);
        assert_eq!(p.spec.rules[2].when.as_ref().unwrap()[0].not_values, [""]);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("request.headers[x-user-role]", "request.header[x-user-role]", "x.yaml:9: AuthorizationPolicy/user-data-protection: spec.rules[2].when[0].key: unknown attribute"),
            ("methods: [\"GET\", \"PUT\"]", "method: [GET]", "x.yaml:8: AuthorizationPolicy/user-data-protection: spec.rules[1].to[0].operation.method: unknown field `method`"),
            ("  rules:", "  action: REJECT\n  rules:", "x.yaml:6: AuthorizationPolicy/user-data-protection: spec.action: unknown variant `REJECT`"),
            ("principals: [", "ipBlocks: [\"10.0.0.0/33\", ", "x.yaml:7: AuthorizationPolicy/user-data-protection: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not"),
            ("  rules:", "  targetRef: { kind: Gateway, name: gw }\n  rules:", "x.yaml:6: AuthorizationPolicy/user-data-protection: spec.targetRef: not supported"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &USER_DATA.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}
