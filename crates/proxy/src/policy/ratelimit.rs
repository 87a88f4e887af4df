//! Local rate limiting (`trellis.dev/v1alpha1` `RateLimit`): the token buckets of one
//! workload's inbound HTTP requests, compiled once per config.
//!
//! Every limit is a bucket of `burst` tokens (default `requestsPerUnit`) refilled at
//! `requestsPerUnit` per unit, continuously (by elapsed time, not in steps). A request takes
//! one token from every limit it matches; when any of them is empty it is refused and the
//! tokens it took from the others are given back. Buckets are per proxy, and survive a
//! config push when the limit (its label, rate and size) did not change. TCP connections
//! are not limited.

use crate::route::matcher::Str;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_api::resources::rate_limit::Limit;
use trellis_api::resources::RateLimit;

/// Whether `limit` applies to a workload: AuthorizationPolicy's scope rules (root namespace:
/// mesh-wide; other namespaces: their own; `selector` narrows to matching labels).
pub fn applies_to(
    limit: &RateLimit,
    workload_namespace: &str,
    workload_labels: &BTreeMap<String, String>,
    root_namespace: &str,
) -> bool {
    let ns = limit.metadata.namespace();
    (ns == root_namespace || ns == workload_namespace)
        && limit
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(workload_labels))
}

/// A token bucket refilled by elapsed time. Tokens are kept in nano-tokens (1e-9 token) so
/// that slow rates (per hour) refill without rounding away.
#[derive(Debug)]
pub struct TokenBucket {
    /// Size, in nano-tokens.
    capacity: u128,
    /// Refill: `per_unit` tokens every `unit_nanos` nanoseconds.
    per_unit: u128,
    unit_nanos: u128,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// Nano-tokens available at `at`.
    tokens: u128,
    at: Instant,
}

const NANO: u128 = 1_000_000_000;

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilled at `per_unit` tokens per `unit`.
    pub fn new(capacity: u64, per_unit: u64, unit: Duration, now: Instant) -> Self {
        let capacity = u128::from(capacity.max(1)) * NANO;
        Self {
            capacity,
            per_unit: u128::from(per_unit.max(1)),
            unit_nanos: unit.as_nanos().max(1),
            state: Mutex::new(BucketState {
                tokens: capacity,
                at: now,
            }),
        }
    }

    fn refill(&self, s: &mut BucketState, now: Instant) {
        // A clock that went backwards (another thread's `now`) adds nothing.
        let elapsed = now.saturating_duration_since(s.at).as_nanos();
        if elapsed == 0 {
            return;
        }
        let added = elapsed.saturating_mul(self.per_unit).saturating_mul(NANO) / self.unit_nanos;
        s.tokens = s.tokens.saturating_add(added).min(self.capacity);
        s.at = now;
    }

    /// Takes one token at `now`; when the bucket is empty, returns how long until one is
    /// there.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s, now);
        if s.tokens >= NANO {
            s.tokens -= NANO;
            return Ok(());
        }
        let missing = NANO - s.tokens;
        // Nanoseconds for `missing` nano-tokens, rounded up.
        let denom = self.per_unit * NANO;
        let wait = (missing * self.unit_nanos).div_ceil(denom);
        Err(Duration::from_nanos(
            u64::try_from(wait).unwrap_or(u64::MAX),
        ))
    }

    /// Gives back a token taken by [`TokenBucket::try_take`].
    pub fn give_back(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.tokens = (s.tokens + NANO).min(self.capacity);
    }

    /// Whole tokens available at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s, now);
        u64::try_from(s.tokens / NANO).unwrap_or(u64::MAX)
    }

    fn same_shape(&self, other: &TokenBucket) -> bool {
        (self.capacity, self.per_unit, self.unit_nanos)
            == (other.capacity, other.per_unit, other.unit_nanos)
    }
}

/// One compiled limit.
#[derive(Debug)]
struct CompiledLimit {
    /// `namespace/name` or `namespace/name/limit`: the `limit` label.
    label: Arc<str>,
    path: Option<Str>,
    method: Option<String>,
    bucket: Arc<TokenBucket>,
}

impl CompiledLimit {
    fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self.path.as_ref().is_none_or(|p| p.matches(path))
    }
}

/// A refused request: the limit whose bucket was empty, and when it has a token again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// The `limit` label.
    pub limit: Arc<str>,
    /// Time until that bucket has a token.
    pub retry_after: Duration,
}

impl Limited {
    /// `retry-after` in whole seconds (rounded up, at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// The rate limits of one workload.
#[derive(Debug, Default)]
pub struct RateLimits {
    limits: Vec<CompiledLimit>,
}

impl RateLimits {
    /// Compiles the limits among `resources` that apply to the workload, in `namespace/name`
    /// order. A limit also in `previous` with the same label, rate and size keeps its bucket.
    pub fn compile<'r>(
        resources: impl IntoIterator<Item = &'r RateLimit>,
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
        root_namespace: &str,
        previous: Option<&RateLimits>,
        now: Instant,
    ) -> RateLimits {
        let mut applicable: Vec<&RateLimit> = resources
            .into_iter()
            .filter(|r| applies_to(r, workload_namespace, workload_labels, root_namespace))
            .collect();
        applicable.sort_by(|a, b| {
            (a.metadata.namespace(), &a.metadata.name)
                .cmp(&(b.metadata.namespace(), &b.metadata.name))
        });
        let mut limits = Vec::new();
        for r in applicable {
            for (i, l) in r.spec.limits.iter().enumerate() {
                let label: Arc<str> = match &l.name {
                    Some(n) => format!("{}/{}/{n}", r.metadata.namespace(), r.metadata.name),
                    None if r.spec.limits.len() == 1 => {
                        format!("{}/{}", r.metadata.namespace(), r.metadata.name)
                    }
                    None => format!("{}/{}/{i}", r.metadata.namespace(), r.metadata.name),
                }
                .into();
                match compile_limit(l, label.clone(), previous, now) {
                    Ok(c) => limits.push(c),
                    Err(e) => {
                        tracing::warn!(limit = %label, error = %e, "rate limit skipped");
                    }
                }
            }
        }
        RateLimits { limits }
    }

    /// Whether no limit applies.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes a token from every limit matching `method` and (normalized) `path` at `now`; on
    /// refusal gives back what it took.
    pub fn check(&self, method: &str, path: &str, now: Instant) -> Result<(), Limited> {
        for (i, l) in self.limits.iter().enumerate() {
            if !l.matches(method, path) {
                continue;
            }
            if let Err(retry_after) = l.bucket.try_take(now) {
                for taken in self.limits[..i].iter().filter(|t| t.matches(method, path)) {
                    taken.bucket.give_back();
                }
                return Err(Limited {
                    limit: l.label.clone(),
                    retry_after,
                });
            }
        }
        Ok(())
    }
}

fn compile_limit(
    l: &Limit,
    label: Arc<str>,
    previous: Option<&RateLimits>,
    now: Instant,
) -> Result<CompiledLimit, String> {
    let (path, method) = match &l.r#match {
        Some(m) => (
            m.path
                .as_ref()
                .map(|p| Str::compile(p, false))
                .transpose()?,
            m.method.clone(),
        ),
        None => (None, None),
    };
    let unit = Duration::from_secs(l.unit.seconds());
    let fresh = TokenBucket::new(l.capacity(), l.requests_per_unit, unit, now);
    let bucket = previous
        .and_then(|p| p.limits.iter().find(|c| c.label == label))
        .filter(|c| c.bucket.same_shape(&fresh))
        .map_or_else(|| Arc::new(fresh), |c| c.bucket.clone());
    Ok(CompiledLimit {
        label,
        path,
        method,
        bucket,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use trellis_api::resources::{parse, Resource};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_starts_full_and_refills_by_elapsed_time() {
        let t0 = Instant::now();
        let b = TokenBucket::new(3, 10, Duration::from_secs(1), t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        // Empty: one token every 100 ms.
        assert_eq!(b.try_take(t0), Err(ms(100)));
        assert_eq!(b.try_take(t0 + ms(40)), Err(ms(60)));
        assert_eq!(b.try_take(t0 + ms(100)), Ok(()));
        assert_eq!(b.try_take(t0 + ms(100)), Err(ms(100)));
        // Refill is capped at the capacity.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 3);
        // Partial tokens accumulate: 3 x 50 ms = 1.5 tokens.
        let b = TokenBucket::new(1, 10, Duration::from_secs(1), t0);
        assert_eq!(b.try_take(t0), Ok(()));
        assert!(b.try_take(t0 + ms(50)).is_err());
        assert_eq!(b.try_take(t0 + ms(100)), Ok(()));
        assert_eq!(b.try_take(t0 + ms(150)), Err(ms(50)));
        // A clock going backwards adds nothing and does not panic.
        assert!(b.try_take(t0).is_err());
        b.give_back();
        assert_eq!(b.try_take(t0 + ms(150)), Ok(()));
    }

    #[test]
    fn slow_rates_refill_without_rounding_away() {
        let t0 = Instant::now();
        let b = TokenBucket::new(2, 1, Duration::from_secs(3600), t0);
        assert!(b.try_take(t0).is_ok() && b.try_take(t0).is_ok());
        assert_eq!(b.try_take(t0), Err(Duration::from_secs(3600)));
        assert_eq!(
            b.try_take(t0 + Duration::from_secs(1800)),
            Err(Duration::from_secs(1800))
        );
        assert!(b.try_take(t0 + Duration::from_secs(3600)).is_ok());
        let l = Limited {
            limit: "a".into(),
            retry_after: ms(1),
        };
        assert_eq!(l.retry_after_secs(), 1);
        let l = Limited {
            limit: "a".into(),
            retry_after: ms(2001),
        };
        assert_eq!(l.retry_after_secs(), 3);
    }

    fn rate_limits(yaml: &str) -> Vec<RateLimit> {
        let (ok, errors) = parse(Path::new("rl.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        ok.into_iter()
            .filter_map(|l| match l.resource {
                Resource::RateLimit(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const DOCS: &str = "apiVersion: trellis.dev/v1alpha1\nkind: RateLimit\nmetadata: { name: profile-api, namespace: edtech }\nspec:\n  selector: { matchLabels: { app: user-profile } }\n  limits:\n  - name: api-reads\n    requestsPerUnit: 1\n    unit: MINUTE\n    burst: 2\n    match: { path: { prefix: /api/ }, method: GET }\n---\napiVersion: trellis.dev/v1alpha1\nkind: RateLimit\nmetadata: { name: mesh, namespace: istio-system }\nspec:\n  limits: [{ requestsPerUnit: 3, unit: HOUR, match: { path: { regex: \"/api/.*|/x\" } } }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: RateLimit\nmetadata: { name: other, namespace: shop }\nspec:\n  limits: [{ requestsPerUnit: 1, unit: SECOND }]\n";

    #[test]
    fn scoping_follows_authorization_policy() {
        let rls = rate_limits(DOCS);
        let me = labels(&[("app", "user-profile")]);
        let scoped = |ns: &str, l: &BTreeMap<String, String>| -> Vec<bool> {
            rls.iter()
                .map(|r| applies_to(r, ns, l, "istio-system"))
                .collect()
        };
        assert_eq!(scoped("edtech", &me), [true, true, false]);
        assert_eq!(
            scoped("edtech", &labels(&[("app", "web")])),
            [false, true, false]
        );
        assert_eq!(scoped("shop", &me), [false, true, true]);
    }

    #[test]
    fn requests_take_a_token_from_every_matching_limit() {
        let rls = rate_limits(DOCS);
        let t0 = Instant::now();
        let me = labels(&[("app", "user-profile")]);
        let c = RateLimits::compile(&rls, "edtech", &me, "istio-system", None, t0);
        assert_eq!(c.limits.len(), 2);
        // Unmatched requests are never limited.
        for _ in 0..10 {
            assert!(c.check("GET", "/status/200", t0).is_ok());
            assert!(c.check("POST", "/other", t0).is_ok());
        }
        // POST /api/ matches only the mesh-wide limit (3 per hour); GET /api/ both.
        assert!(c.check("GET", "/api/a", t0).is_ok());
        assert!(c.check("GET", "/api/a", t0).is_ok());
        let refused = c.check("GET", "/api/a", t0).unwrap_err();
        assert_eq!(&*refused.limit, "edtech/profile-api/api-reads");
        assert_eq!(refused.retry_after, Duration::from_secs(60));
        // The refused request gave its mesh-wide token back: one is left.
        assert!(c.check("POST", "/api/a", t0).is_ok());
        let refused = c.check("POST", "/x", t0).unwrap_err();
        assert_eq!(&*refused.limit, "istio-system/mesh");
        assert_eq!(refused.retry_after_secs(), 1200);
        // Regexes match the whole path.
        assert!(c.check("POST", "/xy", t0).is_ok());
    }

    #[test]
    fn buckets_survive_an_unchanged_config() {
        let rls = rate_limits(DOCS);
        let t0 = Instant::now();
        let me = labels(&[("app", "user-profile")]);
        let a = RateLimits::compile(&rls, "shop", &me, "istio-system", None, t0);
        assert!(a.check("GET", "/", t0).is_ok());
        assert!(a.check("GET", "/", t0).is_err());
        let b = RateLimits::compile(&rls, "shop", &me, "istio-system", Some(&a), t0);
        assert!(b.check("GET", "/", t0).is_err(), "bucket kept");
        let changed = rate_limits(&DOCS.replace(
            "requestsPerUnit: 1, unit: SECOND",
            "requestsPerUnit: 2, unit: SECOND",
        ));
        let c = RateLimits::compile(&changed, "shop", &me, "istio-system", Some(&b), t0);
        assert!(c.check("GET", "/", t0).is_ok(), "new shape, new bucket");
    }
}
