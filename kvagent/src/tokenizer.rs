//! Hugging Face tokenizers (`tokenizer.json`) for the tools that take text: `kvagent hash
//! --text` and `kvagent route`. Behind the `tokenizer` feature; without it, loading says so.

#[cfg(feature = "tokenizer")]
pub(crate) use tokenizers::Tokenizer;

/// No tokenizer in this build.
#[cfg(not(feature = "tokenizer"))]
#[derive(Debug)]
pub(crate) enum Tokenizer {}

/// Loads a `tokenizer.json`.
#[cfg(feature = "tokenizer")]
pub(crate) fn load(path: &std::path::Path) -> anyhow::Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Loads a `tokenizer.json`.
#[cfg(not(feature = "tokenizer"))]
pub(crate) fn load(_: &std::path::Path) -> anyhow::Result<Tokenizer> {
    anyhow::bail!("this kvagent was built without the `tokenizer` feature: pass token ids instead")
}

/// The token ids of `text`, with the special tokens (BOS) the tokenizer adds when `special`.
#[cfg(feature = "tokenizer")]
pub(crate) fn encode(t: &Tokenizer, text: &str, special: bool) -> anyhow::Result<Vec<u32>> {
    let enc = t
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// The token ids of `text` (never called: no tokenizer loads in this build).
#[cfg(not(feature = "tokenizer"))]
pub(crate) fn encode(t: &Tokenizer, _: &str, _: bool) -> anyhow::Result<Vec<u32>> {
    match *t {}
}
