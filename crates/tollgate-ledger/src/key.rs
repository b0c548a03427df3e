//! API key format, generation and hashing.
//!
//! A key is `tg_` + a 12-character base62 public id + a 32-character base62 secret
//! (≈ 190 bits from the operating system's CSPRNG) + a 6-character base62 CRC32 of
//! everything before it: 53 characters, e.g. `tg_4fT9aQ0LmZx2…`.
//!
//! - The **prefix** `tg_` + id is public: it is shown in key listings and is the
//!   database lookup id.
//! - Only the SHA-256 of the secret is stored (hex). Keys are high-entropy, so a
//!   slow password hash would add latency for no security gain.
//! - The checksum lets scanners and the gateway reject typos and garbage without a
//!   database query (GitHub-style).
//! - Secrets are compared in constant time (`subtle`), never with `==`.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::LedgerError;

/// The fixed start of every key.
pub const KEY_PREFIX: &str = "tg_";
/// Length of the public id part.
pub const ID_LEN: usize = 12;
/// Length of the secret part.
pub const SECRET_LEN: usize = 32;
/// Length of the checksum part.
pub const CHECKSUM_LEN: usize = 6;
/// Total key length.
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_LEN + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A secret string (an API key shown once at creation). `Debug` and `Display`
/// print `***`; read it with [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The secret itself: only for the one place that must show or send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A freshly generated key: its public id (without `tg_`), the full key, and the
/// hex SHA-256 of its secret part (what the database stores).
pub(crate) struct Generated {
    pub id: String,
    pub key: Secret,
    pub secret_sha256: String,
}

fn random_base62(out: &mut String, n: usize) -> Result<(), LedgerError> {
    // Rejection sampling: bytes ≥ 248 (= 4 × 62) are dropped so every symbol is
    // equally likely.
    let mut buf = [0u8; 64];
    let mut left = n;
    while left > 0 {
        getrandom::fill(&mut buf).map_err(LedgerError::Random)?;
        for &b in &buf {
            if left == 0 {
                break;
            }
            if b < 248 {
                out.push(BASE62[(b % 62) as usize] as char);
                left -= 1;
            }
        }
    }
    Ok(())
}

fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut crc = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

/// SHA-256 of a secret part, hex.
pub(crate) fn secret_sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn secret_sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub(crate) fn generate() -> Result<Generated, LedgerError> {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    random_base62(&mut key, ID_LEN + SECRET_LEN)?;
    let sum = checksum(&key);
    key.extend(sum.iter().map(|&b| b as char));
    let id = key[KEY_PREFIX.len()..KEY_PREFIX.len() + ID_LEN].to_owned();
    let secret = &key[KEY_PREFIX.len() + ID_LEN..KEY_PREFIX.len() + ID_LEN + SECRET_LEN];
    let secret_sha256 = secret_sha256_hex(secret);
    Ok(Generated {
        id,
        key: Secret(key),
        secret_sha256,
    })
}

/// A well-formed presented key: its public id and the SHA-256 of its secret.
pub(crate) struct Parsed<'a> {
    pub id: &'a str,
    pub secret_sha256: [u8; 32],
}

/// Checks shape and checksum; `None` for anything that is not a well-formed key.
pub(crate) fn parse(presented: &str) -> Option<Parsed<'_>> {
    let id = parse_id(presented)?;
    let secret = &presented[KEY_PREFIX.len() + ID_LEN..KEY_LEN - CHECKSUM_LEN];
    Some(Parsed {
        id,
        secret_sha256: secret_sha256(secret),
    })
}

/// The public id of a well-formed key (shape and checksum checked, secret not hashed).
pub(crate) fn parse_id(presented: &str) -> Option<&str> {
    if presented.len() != KEY_LEN
        || !presented.starts_with(KEY_PREFIX)
        || !presented.as_bytes()[KEY_PREFIX.len()..]
            .iter()
            // Without an early exit, so the loop runs a word at a time.
            .fold(true, |ok, b| ok & b.is_ascii_alphanumeric())
    {
        return None;
    }
    let (body, sum) = presented.split_at(KEY_LEN - CHECKSUM_LEN);
    if checksum(body).as_slice() != sum.as_bytes() {
        return None;
    }
    Some(&presented[KEY_PREFIX.len()..KEY_PREFIX.len() + ID_LEN])
}

/// Constant-time comparison of a presented secret's hash with the stored one.
pub(crate) fn hash_matches(presented: &[u8; 32], stored: &[u8; 32]) -> bool {
    presented.ct_eq(stored).into()
}

/// Decodes a stored hex hash; a corrupt value never matches anything.
pub(crate) fn decode_stored(hex_hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
}

/// Builds a key with the given parts and a valid checksum (tests of lookups by id
/// with a wrong secret).
#[doc(hidden)]
pub fn forge_for_test(id: &str, secret: &str) -> String {
    let mut key = format!("{KEY_PREFIX}{id}{secret}");
    let sum = checksum(&key);
    key.extend(sum.iter().map(|&b| b as char));
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_have_the_documented_shape() {
        for _ in 0..100 {
            let g = generate().expect("random source");
            let k = g.key.expose();
            assert_eq!(k.len(), KEY_LEN);
            assert!(k.starts_with("tg_"));
            let p = parse(k).expect("valid");
            assert_eq!(p.id, g.id);
            let stored = decode_stored(&g.secret_sha256).expect("hex");
            assert!(hash_matches(&p.secret_sha256, &stored));
        }
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum_or_the_shape() {
        let g = generate().expect("random source");
        let k = g.key.expose().to_owned();
        for i in 3..k.len() {
            let mut b = k.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(b).expect("ascii");
            assert!(parse(&changed).is_none(), "position {i}");
        }
        assert!(parse("tg_short").is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn secret_never_prints() {
        let g = generate().expect("random source");
        assert_eq!(format!("{:?}", g.key), "***");
        assert_eq!(format!("{}", g.key), "***");
    }
}
