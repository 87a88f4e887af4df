//! The hash behind consistent hashing: FNV-1a 64 followed by MurmurHash3's 64-bit finalizer.
//!
//! Both are small, published algorithms with fixed constants, so a key maps to the same value
//! on every build, platform and Rust version: session affinity survives proxy upgrades and
//! every proxy in the mesh sends a key to the same endpoint. (std's `DefaultHasher` makes no
//! such promise.) FNV-1a alone mixes its last bytes poorly into the high bits; the finalizer
//! gives full avalanche, which ring points and Maglev permutations need.

use std::net::IpAddr;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's `fmix64`: a bijection on `u64` in which every input bit affects every output
/// bit.
pub(crate) const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash of a request's affinity key (a header or cookie value, a query parameter) for
/// [`super::Balancer::pick`]: `fmix64(fnv1a64(bytes))`. Stable across builds and versions.
pub fn hash_key(bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(bytes))
}

/// The hash of a client address for `useSourceIp` affinity: [`hash_key`] of its 4 or 16
/// octets (an IPv4-mapped IPv6 address hashes as the IPv4 one). No allocation.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_key(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_key(&v4.octets()),
            None => hash_key(&v6.octets()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fmix64_is_murmur3s_finalizer() {
        assert_eq!(fmix64(0), 0);
        // Values from the reference implementation (MurmurHash3.cpp, fmix64).
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(u64::MAX), 0x64b5_720b_4b82_5f21);
    }

    /// Changing these breaks session affinity across an upgrade: don't, without a migration.
    #[test]
    fn hash_key_is_pinned() {
        assert_eq!(hash_key(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash_key(b"user-42"), 0xa395_32c7_ab05_1e8d);
    }

    #[test]
    fn ipv4_mapped_addresses_hash_as_ipv4() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(hash_ip(v4), hash_ip(mapped));
        assert_ne!(hash_ip(v4), hash_ip("10.1.2.4".parse().unwrap()));
    }
}
