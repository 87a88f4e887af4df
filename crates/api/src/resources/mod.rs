//! Resources as users write them: Kubernetes-style YAML documents (Istio's schemas), in
//! multi-document files or directory trees.
//!
//! Every document is read into a typed struct; a field we do not support is an error naming
//! the field, the kind, the file and the line (never silently ignored). Kinds this version
//! does not implement yet are refused by name the same way.

pub mod authorization_policy;
pub mod common;
pub mod destination_rule;
pub mod http_match;
pub mod http_policy;
pub mod http_route;
pub mod http_route_filter;
pub mod load_balancer;
mod locate;
pub mod mesh;
pub mod peer_authentication;
pub mod rate_limit;
pub mod request_authentication;
pub mod service_entry;
pub mod traffic_policy;
pub mod virtual_service;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use authorization_policy::AuthorizationPolicy;
pub use common::Unsupported;
pub use destination_rule::DestinationRule;
pub use http_route::HttpRoute;
pub use mesh::Mesh;
pub use peer_authentication::{PeerAuthentication, PeerMode};
pub use rate_limit::RateLimit;
pub use request_authentication::RequestAuthentication;
pub use service_entry::ServiceEntry;
pub use virtual_service::VirtualService;

/// Where a resource came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The file.
    pub file: PathBuf,
    /// 1-based line where the document starts.
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Kubernetes object metadata: what we read, and the server-managed fields we accept and
/// ignore (so `kubectl get -o yaml` output loads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace (`default` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    uid: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    resource_version: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    generation: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    creation_timestamp: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    managed_fields: Option<serde_yaml_ng::Value>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.namespace
            .as_deref()
            .unwrap_or(crate::names::DEFAULT_NAMESPACE)
    }
}

/// A selector of workloads by labels (`selector.matchLabels`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Every label must match.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// One loaded resource.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)] // each kind carries its own `kind` field
#[non_exhaustive]
pub enum Resource {
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// `security.istio.io` RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
    /// `networking.istio.io` VirtualService.
    VirtualService(VirtualService),
    /// `networking.istio.io` DestinationRule.
    DestinationRule(DestinationRule),
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry(ServiceEntry),
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute(HttpRoute),
    /// `trellis.dev` Mesh.
    Mesh(Mesh),
    /// `trellis.dev` RateLimit.
    RateLimit(RateLimit),
}

/// A resource and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Loaded {
    /// The resource.
    pub resource: Resource,
    /// Its file and line.
    pub source: Source,
}

/// Why a document was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceError {
    /// File and line.
    pub source: Source,
    /// `Kind/name` when known.
    pub object: String,
    /// Field path, e.g. `spec.mtls.mode`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.source)?;
        if !self.object.is_empty() {
            write!(f, "{}: ", self.object)?;
        }
        if !self.field.is_empty() && self.field != "." {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ResourceError {}

/// The kinds users may write that a later version of Trellis implements.
const KNOWN_LATER: [&str; 4] = ["Gateway", "Sidecar", "WorkloadEntry", "Telemetry"];

#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_yaml_ng::Value>,
}

/// Splits YAML text into documents with their 1-based start lines.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let (mut start, mut cur) = (1, String::new());
    for (i, line) in text.lines().enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare == "..." {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Turns a serde_yaml message into ours: without its "at line N column M" suffix (we print
/// the line) and without its own path prefix when that is (a parent of) `field`.
pub fn clean_yaml_message(msg: &str, field: &str) -> String {
    let msg = msg.find(" at line ").map_or(msg, |i| &msg[..i]);
    if let Some((prefix, rest)) = msg.split_once(": ") {
        let is_parent = field == prefix
            || field
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('.') || r.starts_with('['));
        if is_parent {
            return rest.to_string();
        }
    }
    msg.to_string()
}

/// Deserializes a typed document, mapping errors to file, line and field.
fn typed<T: for<'de> Deserialize<'de>>(
    doc: &str,
    source: &Source,
    object: &str,
) -> Result<T, ResourceError> {
    let de = serde_yaml_ng::Deserializer::from_str(doc);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = clean_yaml_message(&inner.to_string(), &field);
        // A value refused after it was read (a bad duration) carries its parent's position;
        // the field's own line is better. An unknown field is best shown at its key, where
        // the YAML position already is.
        let exact = if message.starts_with("unknown field") {
            None
        } else {
            locate::exact_line_of(doc, &field)
        };
        let line = exact
            .or_else(|| inner.location().map(|l| l.line()))
            .map_or(source.line, |l| source.line + l - 1);
        ResourceError {
            source: Source {
                file: source.file.clone(),
                line,
            },
            object: object.to_string(),
            field,
            message,
        }
    })
}

/// What the loader needs from each kind it implements.
trait Kind: for<'de> Deserialize<'de> {
    /// The apiVersions accepted.
    const API_VERSIONS: &'static [&'static str];
    /// Checks what serde cannot, returning (field path, message).
    fn check(&self) -> Result<(), (String, String)>;
}

macro_rules! kinds {
    ($($ty:ident in $module:ident),* $(,)?) => {$(
        impl Kind for $ty {
            const API_VERSIONS: &'static [&'static str] = &$module::API_VERSIONS;
            fn check(&self) -> Result<(), (String, String)> {
                self.validate()
            }
        }
    )*};
}

kinds!(
    PeerAuthentication in peer_authentication,
    AuthorizationPolicy in authorization_policy,
    RequestAuthentication in request_authentication,
    VirtualService in virtual_service,
    DestinationRule in destination_rule,
    ServiceEntry in service_entry,
    HttpRoute in http_route,
    Mesh in mesh,
    RateLimit in rate_limit,
);

/// One document being read: its text, where it is, `Kind/name`, kind and apiVersion.
struct Doc<'a> {
    text: &'a str,
    source: &'a Source,
    object: &'a str,
    kind: &'a str,
    api: &'a str,
}

/// Reads one document of a kind we implement: checks its apiVersion, deserializes it and runs
/// its checks (whose errors point at the line of the field they name).
fn load_kind<T: Kind>(d: &Doc<'_>) -> Result<T, ResourceError> {
    let err = |field: String, message: String| ResourceError {
        source: Source {
            file: d.source.file.clone(),
            line: locate::line_of(d.text, &field).map_or(d.source.line, |l| d.source.line + l - 1),
        },
        object: d.object.to_string(),
        field,
        message,
    };
    if !T::API_VERSIONS.contains(&d.api) {
        let what = if d.api.is_empty() {
            "missing apiVersion".to_string()
        } else {
            format!("unsupported apiVersion {:?}", d.api)
        };
        let use_ = T::API_VERSIONS.join(" or ");
        return Err(err(
            "apiVersion".into(),
            format!("{what} for {} (use {use_})", d.kind),
        ));
    }
    let value: T = typed(d.text, d.source, d.object)?;
    value.check().map_err(|(f, m)| err(f, m))?;
    Ok(value)
}

/// Parses every document of one file's text.
pub fn parse(file: &Path, text: &str) -> (Vec<Loaded>, Vec<ResourceError>) {
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for (line, doc) in documents(text) {
        let source = Source {
            file: file.to_path_buf(),
            line,
        };
        let header: Header = match typed(&doc, &source, "") {
            Ok(h) => h,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let kind = header.kind.unwrap_or_default();
        let name = header
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let object = format!("{kind}/{name}");
        let api = header.api_version.unwrap_or_default();
        let err = |field: &str, message: String| ResourceError {
            source: source.clone(),
            object: object.clone(),
            field: field.to_string(),
            message,
        };
        let d = Doc {
            text: &doc,
            source: &source,
            object: &object,
            kind: &kind,
            api: &api,
        };
        let result = match kind.as_str() {
            "PeerAuthentication" => load_kind(&d).map(Resource::PeerAuthentication),
            "AuthorizationPolicy" => load_kind(&d).map(Resource::AuthorizationPolicy),
            "RequestAuthentication" => load_kind(&d).map(Resource::RequestAuthentication),
            "VirtualService" => load_kind(&d).map(Resource::VirtualService),
            "DestinationRule" => load_kind(&d).map(Resource::DestinationRule),
            "ServiceEntry" => load_kind(&d).map(Resource::ServiceEntry),
            "HTTPRoute" => load_kind(&d).map(Resource::HttpRoute),
            "Mesh" => load_kind(&d).map(Resource::Mesh),
            "RateLimit" => load_kind(&d).map(Resource::RateLimit),
            "" => Err(err("kind", "missing kind".into())),
            k if KNOWN_LATER.contains(&k) => Err(err(
                "kind",
                format!("{k} is not supported by this version of trellis yet"),
            )),
            k => Err(err("kind", format!("unknown kind {k:?}"))),
        };
        match result {
            Ok(resource) => ok.push(Loaded { resource, source }),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors)
}

/// Loads a file, or every `.yaml`/`.yml` file under a directory (sorted, recursively).
pub fn load(path: &Path) -> (Vec<Loaded>, Vec<ResourceError>) {
    let mut files = Vec::new();
    collect(path, &mut files);
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (o, e) = parse(&file, &text);
                ok.extend(o);
                errors.extend(e);
            }
            Err(e) => errors.push(ResourceError {
                source: Source {
                    file: file.clone(),
                    line: 0,
                },
                object: String::new(),
                field: String::new(),
                message: e.to_string(),
            }),
        }
    }
    (ok, errors)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                collect(&e, out);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_lines() {
        let docs = documents("a: 1\n---\n# only a comment\n---\nb: 2\n...\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, 1);
        assert_eq!(docs[1].0, 5);
    }

    #[test]
    fn errors_name_file_line_kind_and_field() {
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: a }\nspec:\n  mtls: { mode: STRICT }\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: b\nspec:\n  mtls:\n    mode: SOMETIMES\n---\nkind: Sidecar\nmetadata: { name: vs }\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: c }\nspec:\n  mtls: { mode: STRICT, extra: 1 }\n";
        let (ok, errors) = parse(Path::new("pa.yaml"), text);
        assert_eq!(ok.len(), 1);
        let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs[0].starts_with(
                "pa.yaml:13: PeerAuthentication/b: spec.mtls.mode: unknown variant `SOMETIMES`"
            ),
            "{}",
            msgs[0]
        );
        assert!(
            msgs[1].starts_with("pa.yaml:15: Sidecar/vs: kind: Sidecar is not supported"),
            "{}",
            msgs[1]
        );
        assert!(
            msgs[2].starts_with(
                "pa.yaml:22: PeerAuthentication/c: spec.mtls.extra: unknown field `extra`"
            ),
            "{}",
            msgs[2]
        );
    }

    #[test]
    fn kinds_share_one_file_and_need_their_api_version() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r }\nspec:\n  host: r\n  subsets: [{ name: v1, labels: { version: v1 } }]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: r }\nspec:\n  hosts: [r]\n  http: [{ route: [{ destination: { host: r, subset: v1 } }] }]\n---\nkind: ServiceEntry\nmetadata: { name: e }\nspec: { hosts: [e.example.com] }\n---\napiVersion: security.istio.io/v1\nkind: VirtualService\nmetadata: { name: w }\n";
        let (ok, errors) = parse(Path::new("m.yaml"), text);
        assert_eq!(ok.len(), 2, "{errors:?}");
        assert!(matches!(ok[1].resource, Resource::VirtualService(_)));
        assert_eq!(ok[1].source.line, 8);
        let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "m.yaml:15: ServiceEntry/e: apiVersion: missing apiVersion for ServiceEntry (use networking.istio.io/v1 or networking.istio.io/v1beta1 or networking.istio.io/v1alpha3)",
                "m.yaml:19: VirtualService/w: apiVersion: unsupported apiVersion \"security.istio.io/v1\" for VirtualService (use networking.istio.io/v1 or networking.istio.io/v1beta1 or networking.istio.io/v1alpha3)",
            ]
        );
    }

    #[test]
    fn kubectl_output_metadata_loads() {
        let text = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\n  uid: 1234\n  resourceVersion: \"99\"\n  generation: 1\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n  mtls:\n    mode: STRICT\n";
        let (ok, errors) = parse(Path::new("x.yaml"), text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ok.len(), 1);
    }
}
