//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Every endpoint has a preference order over the M slots of a lookup table (M prime): slot
//! `(offset + j * skip) mod M` for j = 0, 1, ..., with `offset` and `skip` from two hashes
//! of its key. Endpoints take turns claiming their next free preferred slot until the table
//! is full, so each ends up with M/n slots (±1) and a change of endpoints moves few slots.
//! A lookup is one modulo and one load. Turns go in key order, so the table does not depend
//! on the order endpoints were listed in.

use super::hash::{fmix64, hash_key};

/// Istio's and Envoy's default table size (a prime).
pub const DEFAULT_TABLE_SIZE: usize = 65_537;

/// The largest table built (a prime; Envoy's limit too).
pub const MAX_TABLE_SIZE: usize = 5_000_011;

const EMPTY: u32 = u32::MAX;

/// A built lookup table of endpoint indices.
pub(super) struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// The table over endpoints with these keys. `size` is rounded up to a prime, at least
    /// the number of endpoints, at most [`MAX_TABLE_SIZE`]. Cost: O(M log M) expected.
    pub(super) fn build<K: AsRef<str>>(keys: &[K], size: usize) -> Self {
        let n = keys.len();
        if n == 0 {
            return Self { table: Vec::new() };
        }
        let m = table_size(size, n);
        let m64 = m as u64;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| keys[a].as_ref().cmp(keys[b].as_ref()).then(a.cmp(&b)));
        // Per endpoint: next slot in its preference order, and its step.
        let mut next = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        for key in keys {
            let h = hash_key(key.as_ref().as_bytes());
            next.push(h % m64);
            skip.push(fmix64(h ^ 0x9e37_79b9_7f4a_7c15) % (m64 - 1).max(1) + 1);
        }
        let mut table = vec![EMPTY; m];
        let mut filled = 0;
        'fill: loop {
            for &i in &order {
                loop {
                    let slot = next[i] as usize;
                    next[i] = (next[i] + skip[i]) % m64;
                    if table[slot] == EMPTY {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self { table }
    }

    /// The endpoint index for an (already mixed) hash: O(1), no allocation. `None` only for
    /// an empty table.
    pub(super) fn pick(&self, hash: u64) -> Option<usize> {
        let len = self.table.len() as u64;
        if len == 0 {
            return None;
        }
        self.table.get((hash % len) as usize).map(|&i| i as usize)
    }
}

/// The table size built for a requested `size` and `n` endpoints.
fn table_size(size: usize, n: usize) -> usize {
    next_prime(size.max(n).clamp(2, MAX_TABLE_SIZE)).min(MAX_TABLE_SIZE)
}

fn next_prime(mut n: usize) -> usize {
    while !is_prime(n) {
        n += 1;
    }
    n
}

fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_primes_within_bounds() {
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE));
        assert_eq!(table_size(DEFAULT_TABLE_SIZE, 10), DEFAULT_TABLE_SIZE);
        assert_eq!(table_size(65_536, 10), 65_537);
        assert_eq!(table_size(1000, 10), 1009);
        assert_eq!(table_size(0, 1), 2);
        assert_eq!(table_size(5, 20), 23, "at least a slot per endpoint");
        assert_eq!(table_size(usize::MAX, 10), MAX_TABLE_SIZE);
    }

    #[test]
    fn every_slot_is_filled_and_shares_differ_by_at_most_one() {
        let keys: Vec<String> = (0..7).map(|i| format!("10.0.0.{i}:80")).collect();
        let m = Maglev::build(&keys, 1009);
        assert_eq!(m.table.len(), 1009);
        let mut counts = [0usize; 7];
        for &i in &m.table {
            counts[i as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min(), counts.iter().max());
        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{counts:?}");
    }
}
