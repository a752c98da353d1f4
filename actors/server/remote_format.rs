//! The remote tier's names and bytes: how a chunk object's Redis key is
//! derived, and the versioned, checksummed value that holds it.
//!
//! ```text
//! key:   <prefix>:v1:<namespace: 32 hex>:<rank>:<chunk hash: 64 hex>
//! value: "KVCR" | version: u16 LE | flags: u16 LE (0) | key fingerprint: 16 bytes
//!        | payload length: u64 LE | xxh3-64(header bytes before it || payload): u64 LE | payload
//! ```
//!
//! A value is served only if the magic, version, key fingerprint (the value
//! is this key's, not one copied or renamed from another), lengths and
//! checksum all agree; anything else is a [`Rejected`] reason, which the tier
//! counts and treats as a miss. This module owns only these pure functions:
//! it must never do I/O or hold state.

use kvcoord_transport::ChunkHash;
use xxhash_rust::xxh3::Xxh3;

use super::keys::ObjectNamespace;

const MAGIC: &[u8; 4] = b"KVCR";
/// The value format's version; a value of another version is foreign.
pub const VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 4 + 2 + 2 + 16 + 8 + 8;
/// Where the checksum sits in the header (it covers the bytes before it).
const SUM_AT: usize = HEADER_BYTES - 8;

/// The Redis key of one chunk object. The one place a key is derived: every
/// field that must keep objects apart (the operator's prefix, the model,
/// world size, layout, rank and chunk hash) goes through here.
pub fn object_key(prefix: &str, namespace: &ObjectNamespace, rank: u32, hash: &ChunkHash) -> Vec<u8> {
    KeyPrefix::new(prefix, namespace).key(rank, hash)
}

/// The part of [`object_key`] shared by every object of a namespace,
/// derived once for a batch of keys.
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn new(prefix: &str, namespace: &ObjectNamespace) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&(namespace.model.len() as u64).to_le_bytes());
        h.update(namespace.model.as_bytes());
        h.update(&namespace.world_size.to_le_bytes());
        h.update(&namespace.layout.0);
        let mut s = format!("{prefix}:v{VERSION}:");
        hex_into(&mut s, &h.finalize().as_bytes()[..16]);
        KeyPrefix(s)
    }

    /// The key of the object of `rank` and `hash` in this namespace.
    pub fn key(&self, rank: u32, hash: &ChunkHash) -> Vec<u8> {
        let mut s = String::with_capacity(self.0.len() + 12 + 64);
        s.push_str(&self.0);
        s.push(':');
        s.push_str(&rank.to_string());
        s.push(':');
        hex_into(&mut s, &hash.0);
        s.into_bytes()
    }
}

fn hex_into(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// What ties a value to its key: a value found under another key (copied,
/// renamed, or written by a buggy peer) is refused.
fn key_fingerprint(key: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(key).as_bytes()[..16]);
    out
}

/// The header of `payload` stored under `key`.
pub fn header(key: &[u8], payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..24].copy_from_slice(&key_fingerprint(key));
    h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = checksum(&h[..SUM_AT], payload);
    h[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    h
}

fn checksum(head: &[u8], payload: &[u8]) -> u64 {
    let mut x = Xxh3::new();
    x.update(head);
    x.update(payload);
    x.digest()
}

/// Why a value found under a key was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not this format or version, or another key's value.
    Foreign,
    /// Shorter or longer than its header says, or not the expected length.
    Truncated,
    /// The checksum does not match the bytes.
    Corrupt,
}

impl Rejected {
    pub fn name(self) -> &'static str {
        match self {
            Rejected::Foreign => "foreign",
            Rejected::Truncated => "truncated",
            Rejected::Corrupt => "corrupt",
        }
    }
}

/// The payload of `value` found under `key`, if it is whole, verified, and
/// exactly `expected` bytes (the object length the reader's layout gives).
pub fn verify<'v>(key: &[u8], value: &'v [u8], expected: usize) -> Result<&'v [u8], Rejected> {
    if value.len() < HEADER_BYTES || &value[..4] != MAGIC {
        return Err(Rejected::Foreign);
    }
    let (head, payload) = value.split_at(HEADER_BYTES);
    if u16::from_le_bytes([head[4], head[5]]) != VERSION || head[8..24] != key_fingerprint(key) {
        return Err(Rejected::Foreign);
    }
    let len = u64::from_le_bytes(head[24..32].try_into().expect("8 bytes"));
    if len != payload.len() as u64 || len != expected as u64 {
        return Err(Rejected::Truncated);
    }
    let sum = u64::from_le_bytes(head[SUM_AT..].try_into().expect("8 bytes"));
    if checksum(&head[..SUM_AT], payload) != sum {
        return Err(Rejected::Corrupt);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::server::keys::LayoutFingerprint;

    fn ns(model: &str, world_size: u32, layout: u8) -> ObjectNamespace {
        ObjectNamespace { model: Arc::from(model), world_size, layout: LayoutFingerprint([layout; 16]) }
    }

    fn value(key: &[u8], payload: &[u8]) -> Vec<u8> {
        [&header(key, payload)[..], payload].concat()
    }

    #[test]
    fn keys_differ_in_every_field_that_names_an_object() {
        let h = ChunkHash([1; 32]);
        let base = object_key("kvc", &ns("m", 2, 0), 0, &h);
        assert_ne!(base, object_key("other", &ns("m", 2, 0), 0, &h), "prefix");
        assert_ne!(base, object_key("kvc", &ns("n", 2, 0), 0, &h), "model");
        assert_ne!(base, object_key("kvc", &ns("m", 4, 0), 0, &h), "world size");
        assert_ne!(base, object_key("kvc", &ns("m", 2, 1), 0, &h), "layout");
        assert_ne!(base, object_key("kvc", &ns("m", 2, 0), 1, &h), "rank");
        assert_ne!(base, object_key("kvc", &ns("m", 2, 0), 0, &ChunkHash([2; 32])), "chunk");
        assert_eq!(base, object_key("kvc", &ns("m", 2, 0), 0, &h), "derivation is deterministic");
        assert!(String::from_utf8(base).unwrap().starts_with("kvc:v1:"));
    }

    #[test]
    fn a_value_verifies_only_whole_unchanged_and_under_its_own_key() {
        let key = b"kvc:v1:a:0:b".to_vec();
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let v = value(&key, &payload);
        assert_eq!(verify(&key, &v, payload.len()), Ok(&payload[..]));

        let mut flipped = v.clone();
        flipped[HEADER_BYTES + 100] ^= 1;
        assert_eq!(verify(&key, &flipped, payload.len()), Err(Rejected::Corrupt));
        assert_eq!(verify(&key, &v[..v.len() - 1], payload.len()), Err(Rejected::Truncated));
        assert_eq!(verify(&key, &v, payload.len() + 1), Err(Rejected::Truncated), "another layout's length");
        assert_eq!(verify(b"kvc:v1:a:1:b", &v, payload.len()), Err(Rejected::Foreign), "another key's value");
        assert_eq!(verify(&key, b"hello", 5), Err(Rejected::Foreign));
        assert_eq!(verify(&key, &v[..10], payload.len()), Err(Rejected::Foreign));
        let mut future = v.clone();
        future[4] = 9;
        assert_eq!(verify(&key, &future, payload.len()), Err(Rejected::Foreign), "another version");
        let mut head = v;
        head[SUM_AT - 1] ^= 1;
        assert_eq!(verify(&key, &head, payload.len()), Err(Rejected::Truncated), "length field changed");
    }
}
