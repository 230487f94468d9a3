//! Block addressing: [`Namespace`], [`BlockHash`] and [`BlockKey`] (DESIGN §3).
//!
//! A block is addressed by `(namespace, hash)`. The hash is whatever the engine computed for the
//! block (vLLM's `request.block_hashes`), passed through unchanged. The namespace captures
//! everything that makes two equal hashes mean different bytes, so two tenants, two models or two
//! tensor-parallel ranks never read each other's blocks.

use std::fmt;

use crate::error::KeyError;

/// Maximum length of a [`BlockHash`] in bytes (vLLM's sha256 hashes are 32 bytes).
pub const MAX_HASH_LEN: usize = 32;

/// Length of a [`Namespace`] digest in bytes.
pub const NAMESPACE_LEN: usize = 16;

/// The digest of everything that gives a block hash its meaning (model, dtype, layout, ...).
///
/// Built with [`Namespace::builder`]; two builders with equal fields give equal namespaces, and
/// any differing field gives a different one. The digest is the first 16 bytes of a BLAKE3 hash
/// over a length-prefixed, field-tagged encoding, so `("ab", "c")` and `("a", "bc")` never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace([u8; NAMESPACE_LEN]);

impl Namespace {
    /// Starts a namespace for `model_id` (e.g. `meta-llama/Llama-3.1-8B-Instruct`).
    pub fn builder(model_id: impl Into<String>) -> NamespaceBuilder {
        NamespaceBuilder {
            model_id: model_id.into(),
            ..NamespaceBuilder::default()
        }
    }

    /// Rebuilds a namespace from a digest previously obtained with [`Namespace::as_bytes`].
    pub const fn from_bytes(bytes: [u8; NAMESPACE_LEN]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; NAMESPACE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({self})")
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Named fields of a [`Namespace`]. Every field defaults to "unset", which is itself a value:
/// a namespace with `lora = None` differs from one with any adapter. Set fields with the
/// methods, or — for bindings that receive every field at once — as a struct literal with
/// `..NamespaceBuilder::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceBuilder {
    /// Model id (see [`Namespace::builder`]).
    pub model_id: String,
    /// See [`Self::revision`].
    pub revision: Option<String>,
    /// See [`Self::kv_dtype`].
    pub kv_dtype: Option<String>,
    /// See [`Self::kv_layout`].
    pub kv_layout: Option<String>,
    /// See [`Self::block_size`].
    pub block_size: Option<u32>,
    /// Tensor-parallel rank (see [`Self::tensor_parallel`]).
    pub tp_rank: u32,
    /// Tensor-parallel world size; 0 is unset.
    pub tp_world: u32,
    /// See [`Self::pipeline_stage`].
    pub pp_stage: u32,
    /// See [`Self::kv_group`].
    pub kv_group: u32,
    /// See [`Self::lora`].
    pub lora: Option<String>,
    /// See [`Self::tenant`].
    pub tenant: Option<String>,
    /// See [`Self::cache_salt`].
    pub cache_salt: Option<String>,
}

impl NamespaceBuilder {
    /// Model revision (commit or tag) — weights of another revision give other KV bytes.
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }
    /// KV-cache dtype as the engine names it (`bfloat16`, `fp8_e4m3`, ...).
    pub fn kv_dtype(mut self, dtype: impl Into<String>) -> Self {
        self.kv_dtype = Some(dtype.into());
        self
    }
    /// Physical layout of a block (e.g. `NHD`, `HND`, or the attention backend's name).
    pub fn kv_layout(mut self, layout: impl Into<String>) -> Self {
        self.kv_layout = Some(layout.into());
        self
    }
    /// Tokens per block.
    pub fn block_size(mut self, tokens: u32) -> Self {
        self.block_size = Some(tokens);
        self
    }
    /// Tensor-parallel rank and world size: each rank stores its own shard.
    pub fn tensor_parallel(mut self, rank: u32, world: u32) -> Self {
        self.tp_rank = rank;
        self.tp_world = world;
        self
    }
    /// Pipeline-parallel stage.
    pub fn pipeline_stage(mut self, stage: u32) -> Self {
        self.pp_stage = stage;
        self
    }
    /// KV-cache group (hybrid models keep one group per attention type).
    pub fn kv_group(mut self, group: u32) -> Self {
        self.kv_group = group;
        self
    }
    /// LoRA adapter name or id.
    pub fn lora(mut self, adapter: impl Into<String>) -> Self {
        self.lora = Some(adapter.into());
        self
    }
    /// Tenant: tenants never share blocks unless they share every other field too.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }
    /// vLLM's per-request `cache_salt`.
    pub fn cache_salt(mut self, salt: impl Into<String>) -> Self {
        self.cache_salt = Some(salt.into());
        self
    }

    /// Computes the digest.
    pub fn build(&self) -> Namespace {
        let mut h = blake3::Hasher::new();
        h.update(b"kvtier-namespace-v1");
        fn field(h: &mut blake3::Hasher, tag: u8, value: Option<&[u8]>) {
            h.update(&[tag]);
            match value {
                None => {
                    h.update(&[0]);
                }
                Some(v) => {
                    h.update(&[1]);
                    h.update(&(v.len() as u64).to_le_bytes());
                    h.update(v);
                }
            }
        }
        field(&mut h, 1, Some(self.model_id.as_bytes()));
        field(&mut h, 2, self.revision.as_deref().map(str::as_bytes));
        field(&mut h, 3, self.kv_dtype.as_deref().map(str::as_bytes));
        field(&mut h, 4, self.kv_layout.as_deref().map(str::as_bytes));
        field(
            &mut h,
            5,
            self.block_size.map(u32::to_le_bytes).as_ref().map(|b| &b[..]),
        );
        field(&mut h, 6, Some(&self.tp_rank.to_le_bytes()));
        field(&mut h, 7, Some(&self.tp_world.to_le_bytes()));
        field(&mut h, 8, Some(&self.pp_stage.to_le_bytes()));
        field(&mut h, 9, Some(&self.kv_group.to_le_bytes()));
        field(&mut h, 10, self.lora.as_deref().map(str::as_bytes));
        field(&mut h, 11, self.tenant.as_deref().map(str::as_bytes));
        field(&mut h, 12, self.cache_salt.as_deref().map(str::as_bytes));
        let digest = h.finalize();
        let mut out = [0u8; NAMESPACE_LEN];
        out.copy_from_slice(&digest.as_bytes()[..NAMESPACE_LEN]);
        Namespace(out)
    }
}

/// The engine's hash of one block: opaque bytes, 1 to [`MAX_HASH_LEN`] long, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash {
    len: u8,
    bytes: [u8; MAX_HASH_LEN],
}

impl BlockHash {
    /// Wraps the engine's hash bytes. Fails when `bytes` is empty or longer than [`MAX_HASH_LEN`].
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.is_empty() || bytes.len() > MAX_HASH_LEN {
            return Err(KeyError::HashLength { len: bytes.len() });
        }
        let mut out = [0u8; MAX_HASH_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        Ok(Self {
            len: bytes.len() as u8,
            bytes: out,
        })
    }

    /// A hash from a 64-bit integer (little endian), the form some engines and KV events use.
    pub fn from_u64(v: u64) -> Self {
        let mut bytes = [0u8; MAX_HASH_LEN];
        bytes[..8].copy_from_slice(&v.to_le_bytes());
        Self { len: 8, bytes }
    }

    /// The hash bytes as given.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The address of one stored block: `(namespace, hash)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// What the hash means.
    pub namespace: Namespace,
    /// The engine's block hash.
    pub hash: BlockHash,
}

impl BlockKey {
    /// Pairs a namespace and a hash.
    pub const fn new(namespace: Namespace, hash: BlockHash) -> Self {
        Self { namespace, hash }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_namespace() {
        let base = Namespace::builder("m");
        let variants = [
            base.clone().revision("r"),
            base.clone().kv_dtype("bfloat16"),
            base.clone().kv_layout("NHD"),
            base.clone().block_size(16),
            base.clone().tensor_parallel(1, 2),
            base.clone().pipeline_stage(1),
            base.clone().kv_group(1),
            base.clone().lora("adapter"),
            base.clone().tenant("t"),
            base.clone().cache_salt("s"),
            Namespace::builder("m2"),
        ];
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(base.build()));
        for v in &variants {
            assert!(seen.insert(v.build()), "collision for {v:?}");
        }
        assert_eq!(base.build(), Namespace::builder("m").build());
    }

    #[test]
    fn fields_do_not_bleed_into_each_other() {
        let a = Namespace::builder("ab").revision("c").build();
        let b = Namespace::builder("a").revision("bc").build();
        assert_ne!(a, b);
        let t = Namespace::builder("m").tenant("x").build();
        let s = Namespace::builder("m").cache_salt("x").build();
        assert_ne!(t, s);
    }

    #[test]
    fn hash_length_is_checked() {
        assert!(BlockHash::new(&[]).is_err());
        assert!(BlockHash::new(&[0; 33]).is_err());
        let h = BlockHash::new(&[7; 32]).unwrap();
        assert_eq!(h.as_bytes(), &[7; 32]);
        // Different lengths with equal prefixes are different hashes.
        assert_ne!(BlockHash::new(&[1]).unwrap(), BlockHash::new(&[1, 0]).unwrap());
    }
}
