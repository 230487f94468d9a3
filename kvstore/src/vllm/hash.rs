//! vLLM's prefix-cache block hashes, computed exactly as vLLM computes them (0.31 and later).
//!
//! vLLM chains one hash per full block: `hash(parent, tokens, extra_keys)` where the argument is
//! the Python tuple `(parent_hash_bytes, tuple(token_ids), extra_keys_or_None)`, serialised as
//! canonical CBOR and digested with SHA-256 (`sha256_cbor`) or XXH3-128 (`xxhash_cbor`). The first
//! block's parent is `NONE_HASH = hash(seed)`, the seed being `$PYTHONHASHSEED` when set and
//! otherwise the fixed string `"vllm-none-hash"` (random per process for `xxhash_cbor`, which then
//! cannot be reproduced). The pickle-based algorithms (`sha256`, `xxhash`) depend on Python's
//! pickle and are not reproducible outside Python.
//!
//! Extra keys of a block, in vLLM's order: `("lora", name, path)` on every block of a LoRA request;
//! `("mm", identifier, offset_in_block)` for each multimodal item overlapping the block;
//! `("cache_salt", salt)` on the first block only; `("prompt_embeds", sha256_of_the_block's_embeddings)`.
//! No extra keys is `None`, not an empty tuple.
//!
//! KV events carry the low 64 bits of the hash read as a big-endian integer ([`event_hash`]).

use serde::ser::{Serialize, SerializeTuple, Serializer};
use sha2::{Digest, Sha256};

use crate::key::BlockHash;

/// The largest block size accepted (vLLM's are 16 to a few hundred tokens).
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// vLLM's seed of `NONE_HASH` for the SHA-256 algorithms when `PYTHONHASHSEED` is unset.
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// A prefix-caching hash algorithm of vLLM (`--prefix-caching-hash-algo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    /// `sha256_cbor`: canonical CBOR, SHA-256 (32-byte hashes).
    Sha256Cbor,
    /// `xxhash_cbor`: canonical CBOR, XXH3-128 (16-byte hashes, big-endian digest).
    XxhashCbor,
}

impl HashAlgo {
    /// vLLM's name of the algorithm.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256Cbor => "sha256_cbor",
            Self::XxhashCbor => "xxhash_cbor",
        }
    }
}

impl std::str::FromStr for HashAlgo {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "sha256_cbor" => Ok(Self::Sha256Cbor),
            "xxhash_cbor" => Ok(Self::XxhashCbor),
            "sha256" | "xxhash" => Err(HashError::PickleAlgo(s.to_owned())),
            other => Err(HashError::UnknownAlgo(other.to_owned())),
        }
    }
}

/// Why hashes cannot be computed as vLLM would.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// An algorithm name vLLM does not have.
    #[error("unknown hash algorithm {0:?} (vLLM has sha256, sha256_cbor, xxhash, xxhash_cbor)")]
    UnknownAlgo(String),
    /// A pickle-based algorithm: its bytes depend on Python's pickle.
    #[error(
        "{0} hashes Python pickles and cannot be reproduced outside Python: \
         run vLLM with --prefix-caching-hash-algo sha256_cbor (or xxhash_cbor)"
    )]
    PickleAlgo(String),
    /// `xxhash_cbor` with no `PYTHONHASHSEED`: vLLM draws a random seed per process.
    #[error(
        "xxhash_cbor without PYTHONHASHSEED uses a random seed in every vLLM process: \
         set PYTHONHASHSEED for the engines and pass the same seed here"
    )]
    RandomSeed,
    /// A block size of zero, or beyond any engine's.
    #[error("the block size must be between 1 and {MAX_BLOCK_SIZE} tokens")]
    BlockSize,
}

/// One of vLLM's tagged extra keys of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKey {
    /// `("lora", name, path)`.
    Lora {
        /// The adapter's name.
        name: String,
        /// The adapter's path as the request gave it.
        path: String,
    },
    /// `("mm", identifier, offset)`: a multimodal item starting `offset` tokens after the block's
    /// first token (negative when it started in an earlier block).
    Mm {
        /// The item's identifier (vLLM's multimodal hash).
        identifier: String,
        /// Its start relative to the block's first token.
        offset: i64,
    },
    /// `("cache_salt", salt)`, on the first block only.
    CacheSalt(String),
    /// `("prompt_embeds", sha256 of the block's embedding bytes)`.
    PromptEmbeds([u8; 32]),
}

impl Serialize for ExtraKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Lora { name, path } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("lora")?;
                t.serialize_element(name)?;
                t.serialize_element(path)?;
                t.end()
            }
            Self::Mm { identifier, offset } => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("mm")?;
                t.serialize_element(identifier)?;
                t.serialize_element(offset)?;
                t.end()
            }
            Self::CacheSalt(salt) => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("cache_salt")?;
                t.serialize_element(salt)?;
                t.end()
            }
            Self::PromptEmbeds(digest) => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element("prompt_embeds")?;
                t.serialize_element(serde_bytes::Bytes::new(digest))?;
                t.end()
            }
        }
    }
}

/// A multimodal item of a prompt: its identifier and the token range of its placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmItem {
    /// vLLM's identifier of the item (its content hash).
    pub identifier: String,
    /// First token of the placeholder.
    pub offset: usize,
    /// Tokens of the placeholder.
    pub length: usize,
}

/// What beyond the token ids enters a request's block hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestExtras {
    /// LoRA adapter `(name, path)`.
    pub lora: Option<(String, String)>,
    /// Multimodal items, sorted by offset.
    pub mm: Vec<MmItem>,
    /// The request's `cache_salt` (an empty salt counts as none, as in vLLM).
    pub cache_salt: Option<String>,
    /// SHA-256 of each block's prompt embeddings, when the prompt came as embeddings.
    pub prompt_embeds: Vec<[u8; 32]>,
}

impl RequestExtras {
    /// The extra keys of the block covering tokens `start..end` (block `index`), in vLLM's order.
    pub fn block_keys(&self, index: usize, start: usize, end: usize) -> Vec<ExtraKey> {
        let mut keys = Vec::new();
        if let Some((name, path)) = &self.lora {
            keys.push(ExtraKey::Lora {
                name: name.clone(),
                path: path.clone(),
            });
        }
        for item in &self.mm {
            if item.offset < end && start < item.offset + item.length {
                keys.push(ExtraKey::Mm {
                    identifier: item.identifier.clone(),
                    offset: item.offset as i64 - start as i64,
                });
            }
        }
        if start == 0
            && let Some(salt) = self.cache_salt.as_ref().filter(|s| !s.is_empty())
        {
            keys.push(ExtraKey::CacheSalt(salt.clone()));
        }
        if let Some(digest) = self.prompt_embeds.get(index) {
            keys.push(ExtraKey::PromptEmbeds(*digest));
        }
        keys
    }
}

/// The argument vLLM hashes for one block: `(parent, tuple(tokens), extra_keys or None)`.
struct BlockInput<'a> {
    parent: &'a [u8],
    tokens: &'a [u32],
    extra: &'a [ExtraKey],
}

impl Serialize for BlockInput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(serde_bytes::Bytes::new(self.parent))?;
        t.serialize_element(self.tokens)?;
        if self.extra.is_empty() {
            t.serialize_element(&())?;
        } else {
            t.serialize_element(self.extra)?;
        }
        t.end()
    }
}

/// Computes vLLM's block hashes for one configuration (algorithm, seed, block size).
#[derive(Debug, Clone)]
pub struct BlockHasher {
    algo: HashAlgo,
    block_size: usize,
    none_hash: Vec<u8>,
}

impl BlockHasher {
    /// A hasher for engines running `algo` with `block_size`-token blocks and `seed` as their
    /// `PYTHONHASHSEED` (None: unset).
    pub fn new(algo: HashAlgo, block_size: usize, seed: Option<&str>) -> Result<Self, HashError> {
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(HashError::BlockSize);
        }
        let seed = match (seed, algo) {
            (Some(seed), _) => seed,
            (None, HashAlgo::Sha256Cbor) => DEFAULT_NONE_HASH_SEED,
            (None, HashAlgo::XxhashCbor) => return Err(HashError::RandomSeed),
        };
        let mut hasher = Self {
            algo,
            block_size,
            none_hash: Vec::new(),
        };
        hasher.none_hash = hasher.digest(&seed);
        Ok(hasher)
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The parent hash of every first block.
    pub fn none_hash(&self) -> &[u8] {
        &self.none_hash
    }

    fn digest(&self, value: &impl Serialize) -> Vec<u8> {
        let mut cbor = Vec::with_capacity(64 + 5 * self.block_size.min(1024));
        // Writing into a Vec cannot fail, and every value here is a plain tuple of bytes, text,
        // integers and None, which CBOR always encodes.
        ciborium::into_writer(value, &mut cbor).expect("CBOR encoding into memory");
        match self.algo {
            HashAlgo::Sha256Cbor => Sha256::digest(&cbor).to_vec(),
            HashAlgo::XxhashCbor => twox_hash::XxHash3_128::oneshot(&cbor).to_be_bytes().to_vec(),
        }
    }

    /// The hash of one full block given its parent's hash (None for the first block).
    pub fn hash_block(&self, parent: Option<&[u8]>, tokens: &[u32], extra: &[ExtraKey]) -> Vec<u8> {
        self.digest(&BlockInput {
            parent: parent.unwrap_or(&self.none_hash),
            tokens,
            extra,
        })
    }

    /// The hashes of every full block of a prompt, as vLLM puts them in `request.block_hashes`.
    pub fn block_hashes(&self, tokens: &[u32], extras: &RequestExtras) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_size);
        let mut parent: Option<Vec<u8>> = None;
        for (index, block) in tokens.chunks_exact(self.block_size).enumerate() {
            let start = index * self.block_size;
            let keys = extras.block_keys(index, start, start + self.block_size);
            let hash = self.hash_block(parent.as_deref(), block, &keys);
            out.push(BlockHash::new(&hash).expect("a 16- or 32-byte digest is a valid hash"));
            parent = Some(hash);
        }
        out
    }
}

/// The 64-bit form of a block hash in vLLM's KV events: the hash as a big-endian integer, low 64
/// bits (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, on by default).
pub fn event_hash(hash: &[u8]) -> u64 {
    let tail = &hash[hash.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_default_sha256_cbor_chain_matches_vllm() {
        // Computed by vLLM 0.32's own `init_none_hash(sha256_cbor)` and `hash_block_tokens`
        // with PYTHONHASHSEED unset; the live comparison runs in tests/e2e/test_hash.py.
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, 16, None).unwrap();
        assert_eq!(
            hex(h.none_hash()),
            "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
        );
        let tokens: Vec<u32> = (0..16).collect();
        assert_eq!(
            hex(&h.hash_block(None, &tokens, &[])),
            "dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749"
        );
    }

    #[test]
    fn only_full_blocks_are_hashed_and_each_chains_on_its_parent() {
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, 4, Some("0")).unwrap();
        let tokens: Vec<u32> = (0..11).collect();
        let hashes = h.block_hashes(&tokens, &RequestExtras::default());
        assert_eq!(hashes.len(), 2);
        let first = h.hash_block(None, &tokens[..4], &[]);
        assert_eq!(hashes[0].as_bytes(), first.as_slice());
        assert_eq!(
            hashes[1].as_bytes(),
            h.hash_block(Some(&first), &tokens[4..8], &[]).as_slice()
        );
    }

    #[test]
    fn extra_keys_follow_vllm_placement() {
        let extras = RequestExtras {
            lora: Some(("a".into(), "/p".into())),
            mm: vec![MmItem {
                identifier: "img".into(),
                offset: 6,
                length: 4,
            }],
            cache_salt: Some("s".into()),
            prompt_embeds: vec![],
        };
        let lora = ExtraKey::Lora {
            name: "a".into(),
            path: "/p".into(),
        };
        assert_eq!(
            extras.block_keys(0, 0, 4),
            vec![lora.clone(), ExtraKey::CacheSalt("s".into())]
        );
        let mm = |offset| ExtraKey::Mm {
            identifier: "img".into(),
            offset,
        };
        assert_eq!(extras.block_keys(1, 4, 8), vec![lora.clone(), mm(2)]);
        assert_eq!(extras.block_keys(2, 8, 12), vec![lora.clone(), mm(-2)]);
        assert_eq!(extras.block_keys(3, 12, 16), vec![lora]);
    }

    #[test]
    fn unreproducible_configurations_are_refused() {
        assert!(matches!(
            "sha256".parse::<HashAlgo>(),
            Err(HashError::PickleAlgo(_))
        ));
        assert!(matches!(
            "md5".parse::<HashAlgo>(),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            BlockHasher::new(HashAlgo::XxhashCbor, 16, None),
            Err(HashError::RandomSeed)
        ));
        assert!(matches!(
            BlockHasher::new(HashAlgo::Sha256Cbor, 0, None),
            Err(HashError::BlockSize)
        ));
        assert!(matches!(
            BlockHasher::new(HashAlgo::Sha256Cbor, u32::MAX as usize, None),
            Err(HashError::BlockSize)
        ));
        assert_eq!(
            BlockHasher::new(HashAlgo::XxhashCbor, 16, Some("1"))
                .unwrap()
                .none_hash()
                .len(),
            16
        );
    }

    #[test]
    fn event_hashes_are_the_low_64_bits_big_endian() {
        let mut h = [0u8; 32];
        h[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        h[0] = 0xff;
        assert_eq!(event_hash(&h), 0x0102_0304_0506_0708);
    }
}
