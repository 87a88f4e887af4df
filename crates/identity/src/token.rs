//! Join tokens: what an operator hands a workload so it can obtain its identity.
//!
//! `tjt1.<id>.<secret>.<ca-pin>`: the id names the token's record at the control plane
//! (service, namespace, service account, expiry, revoked), the secret proves possession (the
//! control plane stores only its SHA-256), and the pin is the SHA-256 of the CA certificate,
//! so the workload can authenticate the control plane before it trusts anything else.

use base64::Engine;
use ring::rand::SecureRandom;
use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "tjt1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public identifier of the token.
    pub id: String,
    /// The secret part.
    pub secret: String,
    /// SHA-256 (hex) of the CA certificate.
    pub ca_pin: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({})", self.id)
    }
}

/// Why a token string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed join token: expected {PREFIX}.<id>.<secret>.<ca-pin>")]
pub struct TokenFormatError;

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}

impl JoinToken {
    /// A new random token pinned to `ca_pin`.
    pub fn generate(ca_pin: &str) -> Self {
        let id: String = random(6).iter().map(|b| format!("{b:02x}")).collect();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random(32));
        Self {
            id,
            secret,
            ca_pin: ca_pin.to_string(),
        }
    }

    /// SHA-256 (hex) of the secret: what the control plane stores.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

/// SHA-256 (hex) of a token secret.
pub fn hash_secret(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_pin)
    }
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            [PREFIX, id, secret, pin]
                if !id.is_empty()
                    && !secret.is_empty()
                    && pin.len() == 64
                    && pin.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(Self {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    ca_pin: pin.to_ascii_lowercase(),
                })
            }
            _ => Err(TokenFormatError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_secret_in_debug() {
        let pin = "ab".repeat(32);
        let t = JoinToken::generate(&pin);
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(constant_time_eq(&t.secret_hash(), &hash_secret(&t.secret)));
        assert!(!constant_time_eq(&t.secret_hash(), &hash_secret("other")));
    }

    #[test]
    fn refuses_malformed_tokens() {
        for s in [
            "",
            "tjt1.a.b",
            "tjt2.a.b.c",
            &format!("tjt1..s.{}", "a".repeat(64)),
            "tjt1.a.b.xyz",
        ] {
            assert!(s.parse::<JoinToken>().is_err(), "{s}");
        }
    }
}
