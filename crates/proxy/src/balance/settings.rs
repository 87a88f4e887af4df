//! From Istio's `trafficPolicy.loadBalancer` to a [`Policy`] and what to hash ([`HashOn`]).

use super::{hash_ip, hash_key, Policy, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MIN_RING_SIZE};
use http::HeaderName;
use std::net::IpAddr;
use std::time::Duration;
use trellis_api::resources::load_balancer::{LoadBalancerSettings, SimpleLb};

/// What part of a request a consistent-hash policy hashes for affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HashOn {
    /// Nothing: the policy is not a consistent hash.
    #[default]
    None,
    /// The first value of this request header.
    Header(HeaderName),
    /// The value of this cookie. With a `ttl`, the proxy should set the cookie (with `path`)
    /// on responses to requests that lacked it, so the next request carries affinity.
    Cookie {
        /// Cookie name.
        name: String,
        /// Path of a generated cookie.
        path: Option<String>,
        /// Lifetime of a generated cookie; `None`: never generated.
        ttl: Option<Duration>,
    },
    /// The client's IP address.
    SourceIp,
    /// The first value of this query parameter (compared and hashed as sent, undecoded).
    QueryParameter(String),
}

/// Why load-balancer settings cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LbConfigError {
    /// `consistentHash.httpHeaderName` is not a valid header name.
    #[error("consistentHash.httpHeaderName {0:?} is not a valid header name")]
    HeaderName(String),
}

/// The policy and hash input for Istio load-balancer settings (validated by
/// `LoadBalancerSettings::validate`).
///
/// `simple`: absent or `UNSPECIFIED` -> [`Policy::P2cPeakEwma`] (our default), `ROUND_ROBIN`,
/// `LEAST_REQUEST` (and its old alias `LEAST_CONN`), `RANDOM` -> the policy of that name.
/// `PASSTHROUGH` (Envoy's original-destination cluster) has no equivalent: a Trellis proxy is
/// addressed by service name, never given an intercepted destination, so it gets the default.
/// `consistentHash`: `maglev` -> [`Policy::Maglev`], otherwise [`Policy::RingHash`] (as in
/// Istio), sized by `ringHash.minimumRingSize`, then the deprecated `minimumRingSize`; the
/// hash input is the one key set (header, cookie, source IP, query parameter, checked in
/// that order).
pub fn policy_from(lb: &LoadBalancerSettings) -> Result<(Policy, HashOn), LbConfigError> {
    let Some(h) = &lb.consistent_hash else {
        let policy = match lb.simple {
            None | Some(SimpleLb::Unspecified | SimpleLb::Passthrough) => Policy::P2cPeakEwma,
            Some(SimpleLb::RoundRobin) => Policy::RoundRobin,
            Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) => Policy::LeastRequest,
            Some(SimpleLb::Random) => Policy::Random,
        };
        return Ok((policy, HashOn::None));
    };
    let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let policy = match &h.maglev {
        Some(m) => Policy::Maglev {
            table_size: m.table_size.map_or(DEFAULT_MAGLEV_TABLE_SIZE, size),
        },
        None => Policy::RingHash {
            min_ring_size: h
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(h.minimum_ring_size)
                .map_or(DEFAULT_MIN_RING_SIZE, size),
        },
    };
    let on = if let Some(name) = &h.http_header_name {
        HashOn::Header(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| LbConfigError::HeaderName(name.clone()))?,
        )
    } else if let Some(c) = &h.http_cookie {
        HashOn::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.map(|d| d.0),
        }
    } else if h.use_source_ip == Some(true) {
        HashOn::SourceIp
    } else if let Some(q) = &h.http_query_parameter_name {
        HashOn::QueryParameter(q.clone())
    } else {
        HashOn::None
    };
    Ok((policy, on))
}

impl HashOn {
    /// The hash key of a request from `source`, for [`super::Balancer::pick`]; `None` when
    /// the request lacks the header, cookie or parameter (the balancer then picks at random).
    pub fn key_of<B>(&self, req: &http::Request<B>, source: IpAddr) -> Option<u64> {
        match self {
            Self::None => None,
            Self::Header(name) => req.headers().get(name).map(|v| hash_key(v.as_bytes())),
            Self::Cookie { name, .. } => cookie(req.headers(), name).map(hash_key),
            Self::SourceIp => Some(hash_ip(source)),
            Self::QueryParameter(name) => {
                let query = req.uri().query()?;
                query.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then(|| hash_key(v.as_bytes()))
                })
            }
        }
    }
}

/// The value of the first cookie called `name` in the `Cookie` headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            (k.trim_ascii_end() == name.as_bytes()).then(|| v.trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(yaml: &str) -> LoadBalancerSettings {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn policy(yaml: &str) -> (Policy, HashOn) {
        policy_from(&lb(yaml)).unwrap()
    }

    #[test]
    fn simple_algorithms_map_by_name_and_default_to_p2c() {
        assert_eq!(policy("{}").0, Policy::P2cPeakEwma);
        assert_eq!(policy("simple: UNSPECIFIED").0, Policy::P2cPeakEwma);
        assert_eq!(policy("simple: PASSTHROUGH").0, Policy::P2cPeakEwma);
        assert_eq!(policy("simple: ROUND_ROBIN").0, Policy::RoundRobin);
        assert_eq!(policy("simple: LEAST_REQUEST").0, Policy::LeastRequest);
        assert_eq!(policy("simple: LEAST_CONN").0, Policy::LeastRequest);
        assert_eq!(policy("simple: RANDOM"), (Policy::Random, HashOn::None));
    }

    #[test]
    fn consistent_hash_is_ring_hash_unless_maglev() {
        let (p, on) = policy("consistentHash: { httpHeaderName: X-User }");
        assert_eq!(p, Policy::RING_HASH);
        assert_eq!(on, HashOn::Header(HeaderName::from_static("x-user")));
        let (p, _) =
            policy("consistentHash: { useSourceIp: true, ringHash: { minimumRingSize: 4096 } }");
        assert_eq!(
            p,
            Policy::RingHash {
                min_ring_size: 4096
            }
        );
        let (p, _) = policy("consistentHash: { useSourceIp: true, minimumRingSize: 2048 }");
        assert_eq!(
            p,
            Policy::RingHash {
                min_ring_size: 2048
            }
        );
        let (p, on) = policy("consistentHash: { httpQueryParameterName: u, maglev: {} }");
        assert_eq!(p, Policy::MAGLEV);
        assert_eq!(on, HashOn::QueryParameter("u".into()));
        let (p, on) = policy(
            "consistentHash: { httpCookie: { name: s, path: /, ttl: 60s }, maglev: { tableSize: 1009 } }",
        );
        assert_eq!(p, Policy::Maglev { table_size: 1009 });
        assert_eq!(
            on,
            HashOn::Cookie {
                name: "s".into(),
                path: Some("/".into()),
                ttl: Some(Duration::from_secs(60))
            }
        );
    }

    #[test]
    fn an_invalid_header_name_is_an_error() {
        assert_eq!(
            policy_from(&lb("consistentHash: { httpHeaderName: \"bad name\" }")),
            Err(LbConfigError::HeaderName("bad name".into()))
        );
    }

    #[test]
    fn keys_come_from_the_configured_part_of_the_request() {
        let src: IpAddr = "10.0.0.9".parse().unwrap();
        let req = http::Request::get("/p?a=1&user=bob&b")
            .header("x-user", "alice")
            .header("cookie", "theme=dark; session = s1 ")
            .header("cookie", "session=s2")
            .body(())
            .unwrap();
        let header = HashOn::Header(HeaderName::from_static("x-user"));
        assert_eq!(header.key_of(&req, src), Some(hash_key(b"alice")));
        let cookie = HashOn::Cookie {
            name: "session".into(),
            path: None,
            ttl: None,
        };
        assert_eq!(cookie.key_of(&req, src), Some(hash_key(b"s1")));
        let query = HashOn::QueryParameter("user".into());
        assert_eq!(query.key_of(&req, src), Some(hash_key(b"bob")));
        assert_eq!(
            HashOn::QueryParameter("b".into()).key_of(&req, src),
            Some(hash_key(b""))
        );
        assert_eq!(HashOn::SourceIp.key_of(&req, src), Some(hash_ip(src)));
        assert_eq!(HashOn::None.key_of(&req, src), None);

        let bare = http::Request::get("/").body(()).unwrap();
        for on in [header, cookie, query] {
            assert_eq!(on.key_of(&bare, src), None, "{on:?}");
        }
    }
}
