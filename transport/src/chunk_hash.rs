//! Chunk keys: the rolling hash that names each chunk of a token prefix.
//! Clients, the server's tests and benchmarks all use this one function, so a
//! prefix hashes the same everywhere. This module must never see KV bytes.
//!
//! `h[i] = blake3(h[i-1] || tokens of chunk i as little-endian u32)`, with
//! `h[-1] = blake3("kvcoord-chunk-v1" || salt)`. A trailing partial chunk is
//! not hashed: only whole chunks are cached.
//!
//! Test vectors (tokens, chunk tokens, salt -> hex of each chunk's key), checked
//! by `fixed_test_vectors` below and by the Python package's tests:
//!
//! - `0..8`, 4, `""` -> `636ee17d45747f90f6b08ecf0f47f008615bdd62c85f312c96f52b8ec6cbc2fc`,
//!   `539b88cb0c75ee5f52c243cbb968e7d513296360b222ae800079981dfb83fa8e`
//! - `[1, 2, 3]`, 2, `"s"` -> `f25957086639e372633acc36f25efe6f1bd3ecbe22f1a80f6d3da0059f03960c`
//! - `0..8`, 4, `"model-a"` -> `96668a8edc97304b72479d326f0998f47eeab607c9a710f56b7d86fc0c1413ba`,
//!   `0be9dc71cd91a1ca12262dd1588a24d8397cabaf2b6625ab666f351d5ac3c6ea`

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The 32-byte key of one chunk, which also commits to every token before it.
/// On the wire it is one byte string (one copy), not 32 separate elements.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl Serialize for ChunkHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

struct ChunkHashVisitor;

impl<'de> serde::de::Visitor<'de> for ChunkHashVisitor {
    type Value = ChunkHash;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("32 bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ChunkHash, E> {
        <[u8; 32]>::try_from(v).map(ChunkHash).map_err(|_| E::invalid_length(v.len(), &self))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ChunkHash, A::Error> {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
        }
        Ok(ChunkHash(out))
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChunkHash, D::Error> {
        d.deserialize_bytes(ChunkHashVisitor)
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

/// Hashes the whole chunks of `tokens`, `chunk_tokens` tokens each.
pub fn chunk_hashes(tokens: &[u32], chunk_tokens: usize, salt: &[u8]) -> Vec<ChunkHash> {
    assert!(chunk_tokens > 0, "chunk_tokens must be positive");
    let mut seed = blake3::Hasher::new();
    seed.update(b"kvcoord-chunk-v1");
    seed.update(salt);
    let mut prev = *seed.finalize().as_bytes();
    tokens
        .chunks_exact(chunk_tokens)
        .map(|chunk| {
            let mut h = blake3::Hasher::new();
            h.update(&prev);
            for t in chunk {
                h.update(&t.to_le_bytes());
            }
            prev = *h.finalize().as_bytes();
            ChunkHash(prev)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_of_the_wrong_length_does_not_decode() {
        let bytes = crate::frame::encode(&vec![7u8; 31], 0, 1024).unwrap();
        let r = crate::frame::decode::<ChunkHash>(&bytes[crate::frame::HEADER_BYTES..]);
        assert!(r.is_err());
        let good = crate::frame::encode(&ChunkHash([9; 32]), 0, 1024).unwrap();
        assert_eq!(good.len(), crate::frame::HEADER_BYTES + 33, "one length byte and 32 bytes");
    }

    #[test]
    fn partial_trailing_chunk_is_not_hashed() {
        assert_eq!(chunk_hashes(&[1; 600], 256, b"").len(), 2);
    }

    #[test]
    fn hash_commits_to_the_whole_prefix() {
        let a: Vec<u32> = (0..512).collect();
        let mut b = a.clone();
        b[3] = 99;
        let (ha, hb) = (chunk_hashes(&a, 256, b""), chunk_hashes(&b, 256, b""));
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1], "a change in chunk 0 changes every later key");
    }

    #[test]
    fn shared_prefix_shares_keys_and_salt_separates() {
        let a: Vec<u32> = (0..512).collect();
        let mut b = a.clone();
        b[300] = 7;
        assert_eq!(chunk_hashes(&a, 256, b"")[0], chunk_hashes(&b, 256, b"")[0]);
        assert_ne!(chunk_hashes(&a, 256, b"x")[0], chunk_hashes(&a, 256, b"")[0]);
    }

    /// The test vectors in the module docs (and in the Python package's
    /// `kvcoord.chunk_hashes` docstring and its pytest): a change here is a
    /// change of every chunk's name, so a cache written before it misses.
    #[test]
    fn fixed_test_vectors() {
        let hex = |h: &ChunkHash| h.0.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let hexes = |t: &[u32], c: usize, s: &[u8]| chunk_hashes(t, c, s).iter().map(hex).collect::<Vec<_>>();
        let zero_to_7: Vec<u32> = (0..8).collect();
        assert_eq!(
            hexes(&zero_to_7, 4, b""),
            [
                "636ee17d45747f90f6b08ecf0f47f008615bdd62c85f312c96f52b8ec6cbc2fc",
                "539b88cb0c75ee5f52c243cbb968e7d513296360b222ae800079981dfb83fa8e"
            ]
        );
        assert_eq!(hexes(&[1, 2, 3], 2, b"s"), ["f25957086639e372633acc36f25efe6f1bd3ecbe22f1a80f6d3da0059f03960c"]);
        assert_eq!(
            hexes(&zero_to_7, 4, b"model-a"),
            [
                "96668a8edc97304b72479d326f0998f47eeab607c9a710f56b7d86fc0c1413ba",
                "0be9dc71cd91a1ca12262dd1588a24d8397cabaf2b6625ab666f351d5ac3c6ea"
            ]
        );
        assert!(hexes(&[5, 6, 7], 4, b"").is_empty(), "no whole chunk");
    }
}
