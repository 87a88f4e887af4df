//! AuthorizationPolicy rules: `custom-action`, `single-clause-rules`, `path-wildcard`,
//! `not-values-empty`, `empty-allow` and `foreign-trust-domain`.
//!
//! - `single-clause-rules`: in Istio a request matches a policy when it matches *any* rule,
//!   and a rule when it matches *all* its `from`, `to` and `when`. Splitting one intended rule
//!   into `- from`, `- to`, `- when` list items therefore allows any caller that satisfies one
//!   of them. Reported for ALLOW policies with two or more rules that each carry exactly one
//!   clause.
//! - `path-wildcard`: Istio paths support `*` only as a whole prefix or suffix (`/api/*`,
//!   `*.png`); elsewhere it is matched literally. Path templates (`{*}`, `{**}`) are fine.
//! - `not-values-empty`: `notValues: [""]` excludes only an empty value; a request without the
//!   header at all still matches.
//! - `foreign-trust-domain`: a principal of another trust domain than the mesh's (the `Mesh`
//!   resource's `trustDomain`, else `cluster.local`) never matches a mesh identity.

use super::{finding, Finding, Level};
use crate::resources::authorization_policy::{Action, Rule};
use crate::resources::{Loaded, Resource};

/// Runs the AuthorizationPolicy rules.
pub fn check(loaded: &[Loaded], out: &mut Vec<Finding>) {
    let trust_domain = loaded
        .iter()
        .find_map(|l| match &l.resource {
            Resource::Mesh(m) => Some(m.spec.trust_domain.clone()),
            _ => None,
        })
        .unwrap_or_else(|| crate::names::DEFAULT_CLUSTER_DOMAIN.to_string());
    for l in loaded {
        let Resource::AuthorizationPolicy(p) = &l.resource else {
            continue;
        };
        let spec = &p.spec;
        let mut push = |level, code, message: String| out.push(finding(l, level, code, message));
        if spec.action == Action::Custom {
            push(
                Level::Error,
                "custom-action",
                "spec.action: action CUSTOM (external authorization) is not supported by Trellis; use ALLOW or DENY policies".into(),
            );
        }
        if spec.action == Action::Allow && spec.rules.is_empty() {
            push(
                Level::Warning,
                "empty-allow",
                "spec.rules: an ALLOW policy without rules denies every request to the selected workloads (locks out every caller)".into(),
            );
        }
        if spec.action == Action::Allow
            && spec.rules.len() >= 2
            && spec.rules.iter().all(|r| clauses(r) == 1)
        {
            push(
                Level::Warning,
                "single-clause-rules",
                "spec.rules: each rule matches on its own (any one of them allows); did you mean one rule with from, to and when together?".into(),
            );
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            for (j, to) in rule.to.iter().flatten().enumerate() {
                let op = &to.operation;
                for (field, paths) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                    for (k, path) in paths.iter().enumerate() {
                        if middle_wildcard(path) {
                            push(
                                Level::Warning,
                                "path-wildcard",
                                format!(
                                    "spec.rules[{i}].to[{j}].operation.{field}[{k}]: {path:?}: Istio matches `*` in the middle literally; use the path template {} (one segment) or `{{**}}`",
                                    suggestion(path)
                                ),
                            );
                        }
                    }
                }
            }
            for (j, from) in rule.from.iter().flatten().enumerate() {
                let src = &from.source;
                for (field, list) in [
                    ("principals", &src.principals),
                    ("notPrincipals", &src.not_principals),
                ] {
                    for (k, principal) in list.iter().enumerate() {
                        let td = principal.split('/').next().unwrap_or("");
                        if principal.contains("/ns/") && !td.contains('*') && td != trust_domain {
                            push(
                                Level::Warning,
                                "foreign-trust-domain",
                                format!(
                                    "spec.rules[{i}].from[{j}].source.{field}[{k}]: {principal:?} is in trust domain {td:?}, but this mesh's is {trust_domain:?}: it never matches"
                                ),
                            );
                        }
                    }
                }
            }
            for (j, c) in rule.when.iter().flatten().enumerate() {
                if c.not_values.iter().any(String::is_empty) {
                    push(
                        Level::Warning,
                        "not-values-empty",
                        format!(
                            "spec.rules[{i}].when[{j}]: notValues [\"\"] on {} does not require the header to be present: a request without the header matches",
                            c.key
                        ),
                    );
                }
            }
        }
    }
}

/// How many of `from`, `to` and `when` a rule carries.
fn clauses(r: &Rule) -> usize {
    [r.from.is_some(), r.to.is_some(), r.when.is_some()]
        .into_iter()
        .filter(|c| *c)
        .count()
}

/// Whether `path` has a `*` other than a leading or trailing one (path templates aside).
fn middle_wildcard(path: &str) -> bool {
    let bare = path.replace("{**}", "").replace("{*}", "");
    let bare = bare.strip_prefix('*').unwrap_or(&bare);
    let bare = bare.strip_suffix('*').unwrap_or(bare);
    bare.contains('*')
}

/// `path` with its whole-segment `*`s in the middle written as `{*}`.
fn suggestion(path: &str) -> String {
    let segs: Vec<&str> = path.split('/').collect();
    let last = segs.len() - 1;
    let t: Vec<&str> = segs
        .iter()
        .enumerate()
        .map(|(i, s)| if *s == "*" && i != last { "{*}" } else { s })
        .collect();
    let t = t.join("/");
    if middle_wildcard(&t) {
        "syntax (`{*}` for exactly one whole segment)".into()
    } else {
        format!("`{t}`")
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{codes, run};
    use super::*;

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
    fn split_rules_are_reported() {
        let f = run(USER_DATA);
        assert_eq!(codes(&f), ["single-clause-rules@1"]);
        assert_eq!(
            f[0].to_string(),
            "warning[single-clause-rules] x.yaml:1: AuthorizationPolicy/default/user-data-protection: spec.rules: each rule matches on its own (any one of them allows); did you mean one rule with from, to and when together?"
        );
        let not_values =
            USER_DATA.replace("values: [\"admin\", \"user-owner\"]", "notValues: [\"\"]");
        let f = run(&not_values);
        assert_eq!(codes(&f), ["single-clause-rules@1", "not-values-empty@1"]);
        assert!(f[1]
            .message
            .ends_with("a request without the header matches"));
        // One rule with all three: clean.
        let joined = USER_DATA
            .replace("  - to:", "    to:")
            .replace("  - when:", "    when:");
        assert!(run(&joined).is_empty(), "{:?}", run(&joined));
    }

    #[test]
    fn wildcards_in_the_middle() {
        assert!(!middle_wildcard("/api/v1/users/*"));
        assert!(!middle_wildcard("*/health"));
        assert!(!middle_wildcard("*"));
        assert!(!middle_wildcard("/api/{*}/users"));
        assert!(!middle_wildcard("/api/{**}"));
        assert!(middle_wildcard("/api/*/users"));
        assert!(middle_wildcard("/api/v*/users"));
        assert_eq!(suggestion("/api/*/users"), "`/api/{*}/users`");
        let f = run(&USER_DATA.replace("/api/v1/users/*", "/api/*/users"));
        assert_eq!(codes(&f), ["single-clause-rules@1", "path-wildcard@1"]);
        assert!(f[1].message.starts_with("spec.rules[1].to[0].operation.paths[0]: \"/api/*/users\": Istio matches `*` in the middle literally; use the path template `/api/{*}/users` (one segment) or `{**}`"), "{}", f[1].message);
    }

    #[test]
    fn custom_and_empty_allow() {
        let custom = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: ext }\nspec:\n  action: CUSTOM\n  provider: { name: opa }\n  rules: [{ to: [{ operation: { paths: [/admin/*] } }] }]\n";
        let f = run(custom);
        assert_eq!(codes(&f), ["custom-action@1"]);
        assert_eq!(f[0].level, Level::Error);
        let deny_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: deny-all, namespace: edtech }\nspec: {}\n";
        assert_eq!(codes(&run(deny_all)), ["empty-allow@1"]);
        let foreign = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: f }\nspec:\n  rules:\n  - from: [{ source: { principals: [\"other.local/ns/a/sa/b\", \"cluster.local/ns/a/sa/b\", \"*\"] } }]\n";
        assert_eq!(codes(&run(foreign)), ["foreign-trust-domain@1"]);
        let allow_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: allow-all }\nspec:\n  action: ALLOW\n  rules: [{}]\n";
        assert!(run(allow_all).is_empty());
    }
}
