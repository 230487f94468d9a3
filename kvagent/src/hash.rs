//! `kvagent hash`: prints the block hashes vLLM computes for a prompt — the first thing to look
//! at when kvtier's (or the index's) hit rate is 0 %: two engines, or an engine and a router, that
//! disagree on a prompt's hashes never share its blocks.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use kvstore::vllm::{BlockHasher, HashAlgo, MmItem, RequestExtras, event_hash};
use serde::Serialize;

/// Arguments of `kvagent hash`.
#[derive(Debug, clap::Args)]
pub struct HashArgs {
    /// Token ids (a JSON array, or integers separated by spaces, commas or newlines); `-` or
    /// nothing reads standard input.
    #[arg(value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Tokenizes this text instead (needs `--tokenizer`).
    #[arg(long, requires = "tokenizer", conflicts_with = "input")]
    pub text: Option<String>,
    /// Renders this OpenAI chat request (a JSON file with `messages`) with the model's chat
    /// template, then tokenizes it as vLLM does (needs `--tokenizer`).
    #[arg(long, value_name = "FILE", requires = "tokenizer", conflicts_with_all = ["input", "text"])]
    pub chat: Option<PathBuf>,
    /// The chat template for `--chat`, if not the one beside the tokenizer.
    #[arg(long, value_name = "FILE", requires = "chat")]
    pub chat_template: Option<PathBuf>,
    /// A Hugging Face `tokenizer.json` for `--text` and `--chat`.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// With `--text`: leave out the special tokens (BOS) the tokenizer adds, as vLLM does for
    /// requests that ask for it.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Tokens per block (vLLM's `--block-size`; 16 on GPUs, 128 on the CPU backend by default).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// vLLM's `--prefix-caching-hash-algo`: sha256_cbor or xxhash_cbor.
    #[arg(long, default_value = "sha256_cbor")]
    pub algo: String,
    /// The engines' PYTHONHASHSEED [default: unset, vLLM's fixed seed].
    #[arg(long, env = "PYTHONHASHSEED")]
    pub seed: Option<String>,
    /// LoRA adapter name of the request.
    #[arg(long, requires = "lora_path")]
    pub lora_name: Option<String>,
    /// LoRA adapter path of the request, as the engine knows it.
    #[arg(long, requires = "lora_name")]
    pub lora_path: Option<String>,
    /// The request's cache_salt.
    #[arg(long)]
    pub cache_salt: Option<String>,
    /// A multimodal item: IDENTIFIER:OFFSET:LENGTH (placeholder tokens); repeat for several.
    #[arg(long, value_name = "ID:OFFSET:LENGTH")]
    pub mm: Vec<String>,
    /// SHA-256 (hex) of one block's prompt embeddings, for prompts given as embeddings; repeat
    /// for each block in order.
    #[arg(long, value_name = "HEX")]
    pub prompt_embeds_hash: Vec<String>,
    /// Prints JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    algo: &'static str,
    block_size: usize,
    seed: Option<String>,
    none_hash: String,
    tokens: usize,
    blocks: Vec<BlockReport>,
}

#[derive(Debug, Serialize)]
struct BlockReport {
    start: usize,
    end: usize,
    hash: String,
    event_hash: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses token ids from a JSON array or from integers separated by spaces, commas or newlines.
pub fn parse_tokens(text: &str) -> anyhow::Result<Vec<u32>> {
    let text = text.trim();
    if text.starts_with('[') {
        return serde_json::from_str(text).context("token ids: not a JSON array of non-negative integers");
    }
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse()
                .with_context(|| format!("token id {t:?} is not a non-negative integer"))
        })
        .collect()
}

fn parse_mm(spec: &str) -> anyhow::Result<MmItem> {
    let mut parts = spec.rsplitn(3, ':');
    let (Some(length), Some(offset), Some(identifier)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--mm {spec:?}: expected IDENTIFIER:OFFSET:LENGTH");
    };
    Ok(MmItem {
        identifier: identifier.to_owned(),
        offset: offset.parse().with_context(|| format!("--mm {spec:?}: offset"))?,
        length: length.parse().with_context(|| format!("--mm {spec:?}: length"))?,
    })
}

fn parse_digest(hex: &str) -> anyhow::Result<[u8; 32]> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<_>>()
        .with_context(|| format!("--prompt-embeds-hash {hex:?}: not hex"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("--prompt-embeds-hash {hex:?}: a SHA-256 is 32 bytes"))
}

fn read_tokens(args: &HashArgs) -> anyhow::Result<Vec<u32>> {
    if let Some(chat) = &args.chat {
        let path = args.tokenizer.as_deref().context("--chat needs --tokenizer")?;
        let template = crate::chat::ChatTemplate::load(path, args.chat_template.as_deref())?
            .context("the model has no chat template: pass --chat-template")?;
        let body: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(chat).with_context(|| format!("reading {}", chat.display()))?,
        )
        .with_context(|| format!("{}: not JSON", chat.display()))?;
        let text = template.render(&body)?;
        return crate::tokenizer::encode(&crate::tokenizer::load(path)?, &text, false);
    }
    if let Some(text) = &args.text {
        let path = args.tokenizer.as_deref().context("--text needs --tokenizer")?;
        return crate::tokenizer::encode(&crate::tokenizer::load(path)?, text, !args.no_special_tokens);
    }
    read_token_input(args.input.as_deref())
}

/// Reads token ids from a file, or standard input for `-` or no file.
pub(crate) fn read_token_input(path: Option<&std::path::Path>) -> anyhow::Result<Vec<u32>> {
    let mut input = String::new();
    match path {
        None => std::io::stdin().read_to_string(&mut input).map(drop),
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_string(&mut input).map(drop),
        Some(p) => std::fs::read_to_string(p).map(|s| input = s),
    }
    .context("reading token ids")?;
    parse_tokens(&input)
}

/// Runs `kvagent hash`, printing to standard output.
pub fn run(args: &HashArgs) -> anyhow::Result<()> {
    let algo: HashAlgo = args.algo.parse()?;
    let hasher = BlockHasher::new(algo, args.block_size, args.seed.as_deref())?;
    let tokens = read_tokens(args)?;
    let extras = RequestExtras {
        lora: args.lora_name.clone().zip(args.lora_path.clone()),
        mm: args
            .mm
            .iter()
            .map(|s| parse_mm(s))
            .collect::<anyhow::Result<_>>()?,
        cache_salt: args.cache_salt.clone(),
        prompt_embeds: args
            .prompt_embeds_hash
            .iter()
            .map(|h| parse_digest(h))
            .collect::<anyhow::Result<_>>()?,
    };
    let hashes = hasher.block_hashes(&tokens, &extras);
    let report = Report {
        algo: algo.name(),
        block_size: args.block_size,
        seed: args.seed.clone(),
        none_hash: hex(hasher.none_hash()),
        tokens: tokens.len(),
        blocks: hashes
            .iter()
            .enumerate()
            .map(|(i, h)| BlockReport {
                start: i * args.block_size,
                end: (i + 1) * args.block_size,
                hash: hex(h.as_bytes()),
                event_hash: event_hash(h.as_bytes()),
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "# {} tokens, {} full blocks of {} ({}, PYTHONHASHSEED {})",
        report.tokens,
        report.blocks.len(),
        report.block_size,
        report.algo,
        report.seed.as_deref().unwrap_or("unset"),
    );
    println!("# block  tokens       hash{:57}event hash", "");
    for (i, b) in report.blocks.iter().enumerate() {
        println!(
            "{i:7}  {:>5}..{:<5}  {}  {}",
            b.start, b.end, b.hash, b.event_hash
        );
    }
    let tail = tokens.len() % args.block_size;
    if tail > 0 {
        println!("# the last {tail} tokens fill no block: vLLM neither caches nor shares them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_from_json_or_separated_integers() {
        assert_eq!(parse_tokens("[1, 2, 3]").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_tokens("1 2,3\n4").unwrap(), vec![1, 2, 3, 4]);
        assert!(parse_tokens("1 -2").unwrap_err().to_string().contains("\"-2\""));
        assert!(parse_tokens("[1, \"x\"]").is_err());
    }

    #[test]
    fn mm_items_parse_with_colons_in_identifiers() {
        let item = parse_mm("sha:abc:5:10").unwrap();
        assert_eq!(
            (item.identifier.as_str(), item.offset, item.length),
            ("sha:abc", 5, 10)
        );
        assert!(parse_mm("abc:5").is_err());
    }
}
