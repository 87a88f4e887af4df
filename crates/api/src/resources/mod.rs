//! Resources as users write them: Kubernetes-style YAML documents (Istio's schemas), in
//! multi-document files or directory trees.
//!
//! Every document is read into a typed struct; a field we do not support is an error naming
//! the field, the kind, the file and the line (never silently ignored). Kinds this version
//! does not implement yet are refused by name the same way.

pub mod peer_authentication;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use peer_authentication::{PeerAuthentication, PeerMode};

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
#[serde(tag = "kind")]
pub enum Resource {
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
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
const KNOWN_LATER: [&str; 7] = [
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "HTTPRoute",
    "Mesh",
];

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
        let line = inner
            .location()
            .map_or(source.line, |l| source.line + l.line() - 1);
        let message = clean_yaml_message(&inner.to_string(), &field);
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
        let result = match kind.as_str() {
            "PeerAuthentication" => {
                if !peer_authentication::API_VERSIONS.contains(&api.as_str()) {
                    Err(err(
                        "apiVersion",
                        format!(
                            "unsupported apiVersion {api:?} for PeerAuthentication (use {})",
                            peer_authentication::API_VERSIONS.join(" or ")
                        ),
                    ))
                } else {
                    typed::<PeerAuthentication>(&doc, &source, &object)
                        .and_then(|p| p.validate().map(|()| p).map_err(|(f, m)| err(&f, m)))
                        .map(Resource::PeerAuthentication)
                }
            }
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
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: a }\nspec:\n  mtls: { mode: STRICT }\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: b\nspec:\n  mtls:\n    mode: SOMETIMES\n---\nkind: VirtualService\nmetadata: { name: vs }\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: c }\nspec:\n  mtls: { mode: STRICT, extra: 1 }\n";
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
            msgs[1].starts_with(
                "pa.yaml:15: VirtualService/vs: kind: VirtualService is not supported"
            ),
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
    fn kubectl_output_metadata_loads() {
        let text = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\n  uid: 1234\n  resourceVersion: \"99\"\n  generation: 1\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n  mtls:\n    mode: STRICT\n";
        let (ok, errors) = parse(Path::new("x.yaml"), text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ok.len(), 1);
    }
}
