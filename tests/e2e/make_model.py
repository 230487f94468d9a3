"""Writes a small random-weight Llama and a byte-level BPE tokenizer to a directory, seeded, so
that every run (and every engine process) sees the same model without a model hub.

Also writes two random LoRA adapters (PEFT format, rank 8 on q_proj and v_proj) to
OUT_DIR/lora-a and OUT_DIR/lora-b.

Usage: python make_model.py OUT_DIR [--layers N --hidden N --heads N --kv-heads N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(400)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def write_lora(out: Path, config: object, seed: int) -> None:
    """A PEFT LoRA adapter with random, non-zero A and B, so that it changes the KV."""
    import torch
    from safetensors.torch import save_file

    rank, hidden = 8, config.hidden_size  # type: ignore[attr-defined]
    head_dim = hidden // config.num_attention_heads  # type: ignore[attr-defined]
    outs = {"q_proj": hidden, "v_proj": config.num_key_value_heads * head_dim}  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):  # type: ignore[attr-defined]
        for module, out_dim in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
        str(out / "adapter_model.safetensors"),
    )
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(outs),
            }
        )
    )


# A small template in the style of real ones (special tokens, role branches, a filter, the
# generation prompt), for vLLM's chat endpoint and for checking the router renders as vLLM does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>"
    "{% else %}<|assistant|>{% endif %}\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()

    marker = a.out / "kvtier-model.json"
    spec = vars(a) | {"out": None, "loras": ["lora-a", "lora-b"], "chat_template": CHAT_TEMPLATE}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    a.out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=a.vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(2000, a.seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(a.out)

    torch.manual_seed(a.seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(a.out)
    write_lora(a.out / "lora-a", config, a.seed + 1)
    write_lora(a.out / "lora-b", config, a.seed + 2)
    marker.write_text(json.dumps(spec))


if __name__ == "__main__":
    main()
