//! The static bootstrap file (`trellis proxy --config FILE`).
//!
//! Parsed once into typed structs; every error names the file, the line and the field
//! (`upstreams[1].endpoints[0]`). Fields that later parts of Trellis will read are refused by
//! name until they work, rather than silently ignored.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use trellis_api::duration::Duration;
use trellis_api::names::{ServiceKey, DEFAULT_CLUSTER_DOMAIN, DEFAULT_NAMESPACE};
use trellis_identity::SpiffeId;

/// A bootstrap file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Resource files hold errors (each names file, line, object and field).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Resources(Vec<trellis_api::resources::ResourceError>),
    /// The file was read but a field is wrong.
    #[error("{file}:{line}: {field}: {message}", line = line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the offending field, when known.
        line: Option<usize>,
        /// Path of the field, e.g. `upstreams[0].endpoints[1]`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// How a listener treats accepted connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Detect HTTP/1, HTTP/2 (prior knowledge), TLS or opaque TCP from the first bytes.
    #[default]
    Auto,
    /// HTTP/1.x only.
    Http1,
    /// HTTP/2 with prior knowledge only.
    Http2,
    /// gRPC: HTTP/2 with prior knowledge.
    Grpc,
    /// Opaque TCP, no detection.
    Tcp,
}

impl Protocol {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The whole bootstrap file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// This workload's service name.
    pub service: String,
    /// This workload's namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// This workload's service account (defaults to the service name).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Labels of this workload (`app`, `version`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Cluster domain used in fully qualified hosts.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Admin listener address.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Inbound listeners: public port -> local app.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// The outbound HTTP proxy listener.
    #[serde(default)]
    pub outbound: Outbound,
    /// Services this workload may call.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Timeouts and limits shared by all listeners.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Largest request head (request line + headers) accepted, in bytes; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Trust domain of mesh identities.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Static mTLS material (with a control plane the certificate is issued instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFiles>,
    /// Inbound mTLS mode; by default STRICT when the proxy has an identity, else DISABLE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// HTTP path of the local app's readiness check (on the first inbound port's app),
    /// probed every second; while it fails the control plane marks this endpoint unready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
    /// Files or directories of Istio resources applied locally (PeerAuthentication,
    /// AuthorizationPolicy, RequestAuthentication, RateLimit, VirtualService, DestinationRule).
    /// Relative paths are relative to the bootstrap file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<PathBuf>,
    /// Namespace whose selector-less policies apply mesh-wide (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// How often remote JWKS (RequestAuthentication `jwksUri`) are refetched.
    #[serde(default)]
    pub jwks: Jwks,
    /// The resources read from `resources`.
    #[serde(skip)]
    pub loaded: Vec<trellis_api::resources::Loaded>,
}

/// Files holding a static workload identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first (PEM). Relative paths are relative to the bootstrap file.
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Trusted roots (PEM).
    pub trust_bundle: PathBuf,
}

/// Istio's PeerAuthentication modes for the inbound side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS; plaintext connections are refused.
    Strict,
    /// mTLS and plaintext on the same port (detected by the ClientHello).
    Permissive,
    /// No mTLS; TLS from clients passes through to the app untouched.
    Disable,
}

/// One inbound listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Public address of this workload.
    pub listen: SocketAddr,
    /// The local application.
    pub app: SocketAddr,
    /// Protocol handling for this port.
    #[serde(default)]
    pub protocol: Protocol,
    /// Time limit for the app's response headers; 504 past it. None = no limit.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// The outbound HTTP proxy listener (absolute-form requests and CONNECT).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Address to listen on; `null` disables the HTTP proxy listener.
    #[serde(default = "default_outbound")]
    pub listen: Option<SocketAddr>,
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            listen: default_outbound(),
        }
    }
}

/// A service this workload calls.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Service name.
    pub service: String,
    /// Namespace (defaults to this workload's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Optional local port that forwards everything to this service.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Protocol handling for `listen`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Endpoint addresses (`ip:port`).
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Time limit for the response headers; 504 past it. None = no limit.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// The SPIFFE ID the service's endpoints must present; when set, traffic to it is mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
}

/// Timeouts shared by all listeners and pools.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to an upstream endpoint; 504 past it.
    #[serde(default = "default_connect")]
    pub connect: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(default = "default_idle")]
    pub idle: Duration,
    /// How long protocol detection waits for the client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    #[serde(default = "default_detect")]
    pub detect: Duration,
    /// Time allowed for a client to send a whole HTTP/1 request head.
    #[serde(default = "default_header_read")]
    pub header_read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            idle: default_idle(),
            detect: default_detect(),
            header_read: default_header_read(),
        }
    }
}

/// How the proxy refetches remote JSON Web Key Sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwks {
    /// Time between two scheduled fetches of a key set (rotations are picked up within it).
    #[serde(default = "default_jwks_refresh")]
    pub refresh_interval: Duration,
    /// Least time between two early fetches asked for by tokens naming an unknown key id
    /// (bounds how often unknown-`kid` tokens can make the proxy hit the key server).
    #[serde(default = "default_jwks_min_refetch")]
    pub min_refetch_interval: Duration,
}

impl Default for Jwks {
    fn default() -> Self {
        Self {
            refresh_interval: default_jwks_refresh(),
            min_refetch_interval: default_jwks_min_refetch(),
        }
    }
}

impl Jwks {
    /// The settings for the proxy's [`crate::policy::jwt::JwksCache`].
    pub fn settings(&self) -> crate::policy::jwt::JwksSettings {
        crate::policy::jwt::JwksSettings {
            refresh_interval: self.refresh_interval.0,
            min_refetch_interval: self.min_refetch_interval.0,
        }
    }
}

fn default_jwks_refresh() -> Duration {
    Duration(crate::policy::jwt::JWKS_REFRESH_INTERVAL)
}
fn default_jwks_min_refetch() -> Duration {
    Duration(crate::policy::jwt::JWKS_MIN_REFETCH_INTERVAL)
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}
fn default_cluster_domain() -> String {
    DEFAULT_CLUSTER_DOMAIN.to_string()
}
fn default_root_namespace() -> String {
    "istio-system".to_string()
}
fn default_trust_domain() -> String {
    DEFAULT_CLUSTER_DOMAIN.to_string()
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4191))
}
fn default_outbound() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 15001)))
}
fn default_connect() -> Duration {
    Duration::from_secs(10)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_detect() -> Duration {
    Duration::from_millis(500)
}
fn default_header_read() -> Duration {
    Duration::from_secs(30)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}

impl Bootstrap {
    /// Reads and validates a bootstrap file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut boot = Self::parse(path, &text)?;
        let mut errors = Vec::new();
        for p in &boot.resources {
            if !p.exists() {
                return Err(ConfigError::Read {
                    file: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "resources: no such file or directory",
                    ),
                });
            }
            let (ok, errs) = trellis_api::resources::load(p);
            errors.extend(errs);
            for loaded in ok {
                // Never silently ignore a resource: refuse the kinds the proxy does not apply.
                use trellis_api::resources::Resource;
                match &loaded.resource {
                    Resource::PeerAuthentication(_)
                    | Resource::AuthorizationPolicy(_)
                    | Resource::RequestAuthentication(_)
                    | Resource::RateLimit(_)
                    | Resource::VirtualService(_)
                    | Resource::DestinationRule(_)
                    | Resource::HttpRoute(_) => boot.loaded.push(loaded),
                    other => errors.push(trellis_api::resources::ResourceError {
                        source: loaded.source.clone(),
                        object: {
                            let (kind, meta) = trellis_api::analyze::kind_and_meta(other);
                            format!("{kind}/{}", meta.name)
                        },
                        field: "kind".into(),
                        message: "the proxy does not apply this kind in static mode yet (PeerAuthentication, AuthorizationPolicy, RequestAuthentication, RateLimit, VirtualService, DestinationRule and HTTPRoute only)".into(),
                    }),
                }
            }
        }
        if errors.is_empty() {
            Ok(boot)
        } else {
            Err(ConfigError::Resources(errors))
        }
    }

    /// Parses and validates bootstrap text; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut boot: Bootstrap = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map(|l| l.line());
            let message = trellis_api::resources::clean_yaml_message(&inner.to_string(), &field);
            ConfigError::Invalid {
                file: file.to_path_buf(),
                line,
                field: if field == "." { "(top)".into() } else { field },
                message,
            }
        })?;
        boot.validate()
            .map_err(|(field, needle, message)| ConfigError::Invalid {
                file: file.to_path_buf(),
                line: find_line(text, &needle),
                field,
                message,
            })?;
        boot.resolve_paths(file);
        Ok(boot)
    }

    /// Makes the identity file paths absolute, relative to the bootstrap file's directory.
    pub fn resolve_paths(&mut self, bootstrap: &Path) {
        let base = bootstrap.parent().unwrap_or(Path::new("."));
        if let Some(files) = &mut self.identity {
            for p in [&mut files.cert, &mut files.key, &mut files.trust_bundle] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        for p in &mut self.resources {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// This workload's SPIFFE ID (service account defaults to the service name).
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        SpiffeId::new(
            &self.trust_domain,
            &self.namespace,
            self.service_account.as_deref().unwrap_or(&self.service),
        )
        .ok()
    }

    /// The service this workload runs.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey::new(&self.service, &self.namespace)
    }

    /// The key of an upstream, with the namespace defaulted to this workload's.
    pub fn upstream_key(&self, u: &Upstream) -> ServiceKey {
        ServiceKey::new(
            &u.service,
            u.namespace.as_deref().unwrap_or(&self.namespace),
        )
    }

    /// Cross-field checks. Errors are (field path, text to locate the line, message).
    fn validate(&self) -> Result<(), (String, String, String)> {
        check_name("service", &self.service)?;
        check_name("namespace", &self.namespace)?;
        let mut listens: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut claim = |addr: SocketAddr, field: String| {
            if let Some(prev) = listens.insert(addr, field.clone()) {
                return Err((
                    field,
                    addr.to_string(),
                    format!("address {addr} is already used by {prev}"),
                ));
            }
            Ok(())
        };
        claim(self.admin, "admin".into())?;
        if let Some(addr) = self.outbound.listen {
            claim(addr, "outbound.listen".into())?;
        }
        for (i, inb) in self.inbound.iter().enumerate() {
            claim(inb.listen, format!("inbound[{i}].listen"))?;
        }
        let mut seen = BTreeMap::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            check_name(&format!("upstreams[{i}].service"), &u.service)?;
            if let Some(ns) = &u.namespace {
                check_name(&format!("upstreams[{i}].namespace"), ns)?;
            }
            if let Some(id) = &u.identity {
                if id.trust_domain != self.trust_domain {
                    return Err((
                        format!("upstreams[{i}].identity"),
                        id.to_string(),
                        format!(
                            "identity {id} is outside this mesh's trust domain {}",
                            self.trust_domain
                        ),
                    ));
                }
            }
            if let Some(addr) = u.listen {
                claim(addr, format!("upstreams[{i}].listen"))?;
            }
            if let Some(prev) = seen.insert(self.upstream_key(u), i) {
                return Err((
                    format!("upstreams[{i}].service"),
                    format!("service: {}", u.service),
                    format!(
                        "service {} is declared twice (also upstreams[{prev}])",
                        self.upstream_key(u)
                    ),
                ));
            }
        }
        for (name, value) in [
            ("refresh_interval", self.jwks.refresh_interval),
            ("min_refetch_interval", self.jwks.min_refetch_interval),
        ] {
            if value.0 < std::time::Duration::from_secs(1) {
                return Err((
                    format!("jwks.{name}"),
                    format!("{name}:"),
                    format!("{value} is too short: must be at least 1s"),
                ));
            }
        }
        if self.jwks.min_refetch_interval > self.jwks.refresh_interval {
            return Err((
                "jwks.min_refetch_interval".into(),
                "min_refetch_interval:".into(),
                format!(
                    "{} must not exceed jwks.refresh_interval ({})",
                    self.jwks.min_refetch_interval, self.jwks.refresh_interval
                ),
            ));
        }
        if self.max_header_bytes < 8192 {
            return Err((
                "max_header_bytes".into(),
                "max_header_bytes".into(),
                "must be at least 8192".into(),
            ));
        }
        Ok(())
    }
}

fn check_name(field: &str, name: &str) -> Result<(), (String, String, String)> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err((
            field.into(),
            name.into(),
            format!(
                "{name:?} is not a valid name (lower-case letters, digits and '-', at most 63)"
            ),
        ))
    }
}

/// The first line holding `needle`, 1-based.
fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Bootstrap, ConfigError> {
        Bootstrap::parse(Path::new("proxy.yaml"), text)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let b = parse("service: frontend\n").unwrap();
        assert_eq!(b.namespace, "default");
        assert_eq!(b.admin.port(), 4191);
        assert_eq!(b.outbound.listen.unwrap().port(), 15001);
        assert_eq!(b.timeouts.connect, Duration::from_secs(10));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "service: frontend\nupstreams:\n  - service: users\n    endpoints: [127.0.0.1:1, nonsense]\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("proxy.yaml:4: upstreams[0].endpoints[1]:"),
            "{msg}"
        );

        let msg = parse("service: frontend\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("proxy.yaml:2: bogus"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");

        let text = "service: frontend\nupstreams:\n  - service: a\n  - service: a\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("proxy.yaml:3: upstreams[1].service"),
            "{msg}"
        );

        let msg = parse("service: Front_End\n").unwrap_err().to_string();
        assert!(msg.starts_with("proxy.yaml:1: service:"), "{msg}");

        let msg = parse("service: a\ntimeouts:\n  connect: soon\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("proxy.yaml:3: timeouts.connect:"), "{msg}");
    }

    #[test]
    fn jwks_intervals_default_and_are_checked() {
        let b = parse("service: a\n").unwrap();
        assert_eq!(b.jwks.refresh_interval, Duration::from_secs(600));
        assert_eq!(b.jwks.min_refetch_interval, Duration::from_secs(30));
        assert_eq!(
            b.jwks.settings(),
            crate::policy::jwt::JwksSettings::default()
        );

        let b = parse("service: a\njwks: { refresh_interval: 1s, min_refetch_interval: 1s }\n")
            .unwrap();
        assert_eq!(b.jwks.refresh_interval, Duration::from_secs(1));
        let b = parse("service: a\njwks:\n  refresh_interval: 1h\n").unwrap();
        assert_eq!(b.jwks.min_refetch_interval, Duration::from_secs(30));

        let msg = parse("service: a\njwks:\n  refresh_interval: 500ms\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("proxy.yaml:3: jwks.refresh_interval: 500ms is too short"),
            "{msg}"
        );
        let msg = parse("service: a\njwks:\n  min_refetch_interval: 0s\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("proxy.yaml:3: jwks.min_refetch_interval: 0s is too short"),
            "{msg}"
        );
        let text = "service: a\njwks:\n  refresh_interval: 10s\n  min_refetch_interval: 1m\n";
        let msg = parse(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("proxy.yaml:4: jwks.min_refetch_interval: 60s must not exceed"),
            "{msg}"
        );
        let msg = parse("service: a\njwks:\n  refresh: 1m\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("proxy.yaml:3: jwks"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");
        let msg = parse("service: a\njwks:\n  refresh_interval: often\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("proxy.yaml:3: jwks.refresh_interval:"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let msg = parse("service: a\nresources: 3\n").unwrap_err().to_string();
        assert!(msg.starts_with("proxy.yaml:2: resources:"), "{msg}");
        let msg = parse("service: a\nmtls: SOMETIMES\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("proxy.yaml:2: mtls:"), "{msg}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No file content panics the bootstrap parser; errors always name the file.
        #[test]
        fn parse_is_total(text in "\\PC{0,200}") {
            if let Err(e) = Bootstrap::parse(Path::new("p.yaml"), &text) {
                prop_assert!(e.to_string().starts_with("p.yaml"));
            }
        }
    }
}
