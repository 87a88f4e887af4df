//! Ring hash (Ketama-style consistent hashing).
//!
//! Each endpoint puts `ceil(min_ring_size / n)` points, rounded up to a power of two, on a
//! 64-bit ring, at the hashes of `"<key>_<i>"`; a request goes to the owner of the first point
//! at or after its hash, wrapping around. Removing an endpoint moves only its keys to its ring
//! neighbours, and adding one takes keys only for the new endpoint — unless n crosses a power
//! of two, when every endpoint's point count changes. (Envoy uses `ceil(min_ring_size / n)`
//! itself, so the others' points change with every n: with the default ring and ten endpoints
//! about 8% more keys would move.) The ring depends on the endpoints' keys, not their order.

use super::hash::hash_key;
use std::fmt::Write;

/// Istio's and Envoy's default minimum ring size.
pub const DEFAULT_MIN_RING_SIZE: usize = 1024;

/// The largest ring built, whatever the configured minimum (Envoy's default maximum).
pub const MAX_RING_SIZE: usize = 8 * 1024 * 1024;

/// A built ring: sorted points and, at the same positions, the endpoint index owning each.
pub(super) struct Ring {
    points: Vec<u64>,
    owners: Vec<u32>,
}

impl Ring {
    /// The ring over endpoints with these keys. Cost: O(R log R) for R points.
    pub(super) fn build<K: AsRef<str>>(keys: &[K], min_ring_size: usize) -> Self {
        let n = keys.len();
        if n == 0 {
            return Self {
                points: Vec::new(),
                owners: Vec::new(),
            };
        }
        let per_endpoint = min_ring_size
            .clamp(1, MAX_RING_SIZE)
            .div_ceil(n)
            .next_power_of_two()
            .min((MAX_RING_SIZE / n).max(1));
        let mut ring: Vec<(u64, u32)> = Vec::with_capacity(per_endpoint * n);
        let mut buf = String::new();
        for (owner, key) in keys.iter().enumerate() {
            let key = key.as_ref();
            for i in 0..per_endpoint {
                buf.clear();
                let _ = write!(buf, "{key}_{i}");
                ring.push((hash_key(buf.as_bytes()), owner as u32));
            }
        }
        // Ties (only when two endpoints share a key, in practice) go by key, then by
        // position, so the ring does not depend on the order endpoints were listed in.
        ring.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| {
                keys[a.1 as usize]
                    .as_ref()
                    .cmp(keys[b.1 as usize].as_ref())
                    .then(a.1.cmp(&b.1))
            })
        });
        Self {
            points: ring.iter().map(|p| p.0).collect(),
            owners: ring.iter().map(|p| p.1).collect(),
        }
    }

    /// The endpoint index for an (already mixed) hash: a binary search, O(log R), no
    /// allocation. `None` only for an empty ring.
    pub(super) fn pick(&self, hash: u64) -> Option<usize> {
        let i = self.points.partition_point(|&p| p < hash);
        let i = if i == self.points.len() { 0 } else { i };
        self.owners.get(i).map(|&o| o as usize)
    }

    /// Points on the ring.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_per_endpoint_round_up_and_are_capped() {
        let keys: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:80")).collect();
        // ceil(1024 / 10) = 103, rounded up to 128; the same for 9 endpoints (114).
        assert_eq!(Ring::build(&keys, 1024).len(), 1280);
        assert_eq!(Ring::build(&keys[..9], 1024).len(), 9 * 128);
        assert_eq!(Ring::build(&keys, 0).len(), 10, "at least one point each");
        assert_eq!(
            Ring::build(&keys, usize::MAX).len(),
            MAX_RING_SIZE / 10 * 10
        );
        assert!(Ring::build::<String>(&[], 1024).pick(7).is_none());
    }

    #[test]
    fn hashes_past_the_last_point_wrap_to_the_first() {
        let ring = Ring::build(&["a", "b", "c"], 3);
        let first = ring.owners[0] as usize;
        assert_eq!(ring.pick(u64::MAX), Some(first));
        assert_eq!(ring.pick(0), Some(first));
        assert_eq!(ring.pick(ring.points[1]), Some(ring.owners[1] as usize));
    }
}
