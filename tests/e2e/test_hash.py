"""`kvagent hash` (and so `kvstore::vllm`) against vLLM's own block hashes, computed live by
vLLM's functions in this venv: several seeds, block sizes, algorithms and extra keys."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request

KVAGENT = Path(__file__).resolve().parents[2] / "target" / "debug" / "kvagent"
TOKENS = [random.Random(3).randrange(0, 150_000) for _ in range(300)]
LORA = ("adapter-a", "/models/adapter-a")
MM = [("img-1", 20, 40), ("img-2", 100, 7)]


def vllm_hashes(
    algo: str, block_size: int, seed: str | None, extras: dict[str, Any], embeds: list[bytes]
) -> tuple[list[str], list[int]]:
    """What vLLM puts in `request.block_hashes` (and in its KV events) for TOKENS."""
    saved = os.environ.pop("PYTHONHASHSEED", None)
    if seed is not None:
        os.environ["PYTHONHASHSEED"] = seed
    try:
        fn = get_hash_fn_by_name(algo)
        kv_cache_utils.init_none_hash(fn)
        request = Request(
            "r",
            TOKENS,
            SamplingParams(max_tokens=1),
            None,
            lora_request=LoRARequest(extras["lora"][0], 1, extras["lora"][1]) if "lora" in extras else None,
            cache_salt=extras.get("salt"),
            mm_features=[
                MultiModalFeatureSpec(
                    data=None,
                    modality="image",
                    identifier=i,
                    mm_position=PlaceholderRange(offset=o, length=n),
                )
                for i, o, n in extras.get("mm", [])
            ]
            or None,
            block_hasher=None,
        )
        hashes = []
        parent = None
        for index in range(len(TOKENS) // block_size):
            start, end = index * block_size, (index + 1) * block_size
            keys, _ = kv_cache_utils.generate_block_hash_extra_keys(request, start, end, 0)
            if embeds:
                keys = (*(keys or ()), ("prompt_embeds", embeds[index]))
            parent = kv_cache_utils.hash_block_tokens(fn, parent, TOKENS[start:end], keys)
            hashes.append(parent)
        via_request = Request(
            "r2",
            TOKENS,
            SamplingParams(max_tokens=1),
            None,
            lora_request=request.lora_request,
            cache_salt=request.cache_salt,
            mm_features=request.mm_features,
            block_hasher=kv_cache_utils.get_request_block_hasher(block_size, fn),
        )
        if not embeds:
            assert list(via_request.block_hashes) == hashes, "vLLM's request hasher agrees with its parts"
        return [h.hex() for h in hashes], [kv_cache_utils.maybe_convert_block_hash(h) for h in hashes]
    finally:
        os.environ.pop("PYTHONHASHSEED", None)
        if saved is not None:
            os.environ["PYTHONHASHSEED"] = saved


def kvagent_hashes(
    algo: str, block_size: int, seed: str | None, extras: dict[str, Any], embeds: list[bytes]
) -> tuple[list[str], list[int]]:
    args = [str(KVAGENT), "hash", "--json", "--algo", algo, "--block-size", str(block_size)]
    if seed is not None:
        args += ["--seed", seed]
    if "lora" in extras:
        args += ["--lora-name", extras["lora"][0], "--lora-path", extras["lora"][1]]
    if "salt" in extras:
        args += ["--cache-salt", extras["salt"]]
    for i, o, n in extras.get("mm", []):
        args += ["--mm", f"{i}:{o}:{n}"]
    for digest in embeds:
        args += ["--prompt-embeds-hash", digest.hex()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    out = subprocess.run(args, input=json.dumps(TOKENS), capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout)
    return [b["hash"] for b in report["blocks"]], [b["event_hash"] for b in report["blocks"]]


EXTRAS: dict[str, dict[str, Any]] = {
    "plain": {},
    "lora": {"lora": LORA},
    "salt": {"salt": "tenant-7"},
    "mm": {"mm": MM},
    "all": {"lora": LORA, "salt": "tenant-7", "mm": MM},
}


@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("seed", [None, "0", "12345"])
def test_sha256_cbor_hashes_equal_vllms(seed: str | None, block_size: int, extra: str) -> None:
    expected = vllm_hashes("sha256_cbor", block_size, seed, EXTRAS[extra], [])
    assert kvagent_hashes("sha256_cbor", block_size, seed, EXTRAS[extra], []) == expected


@pytest.mark.parametrize("seed", ["0", "99"])
def test_xxhash_cbor_hashes_equal_vllms(seed: str) -> None:
    expected = vllm_hashes("xxhash_cbor", 16, seed, EXTRAS["all"], [])
    assert kvagent_hashes("xxhash_cbor", 16, seed, EXTRAS["all"], []) == expected


def test_prompt_embeds_keys_equal_vllms() -> None:
    embeds = [hashlib.sha256(bytes([i]) * 64).digest() for i in range(len(TOKENS) // 32)]
    expected = vllm_hashes("sha256_cbor", 32, None, EXTRAS["lora"], embeds)
    assert kvagent_hashes("sha256_cbor", 32, None, EXTRAS["lora"], embeds) == expected


def test_unreproducible_configurations_say_why() -> None:
    pickle = subprocess.run(
        [str(KVAGENT), "hash", "--algo", "sha256"], input="1 2 3", capture_output=True, text=True
    )
    assert pickle.returncode != 0 and "sha256_cbor" in pickle.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    random_seed = subprocess.run(
        [str(KVAGENT), "hash", "--algo", "xxhash_cbor"], input="1", capture_output=True, text=True, env=env
    )
    assert random_seed.returncode != 0 and "PYTHONHASHSEED" in random_seed.stderr


def test_chat_requests_hash_as_vllm_renders_them(model: Path, tmp_path: Path) -> None:
    """`kvagent hash --chat` renders the model's chat template and tokenizes as vLLM's chat
    endpoint does (text parts joined by newlines, no special tokens added to the rendered
    text): equal block hashes."""
    from transformers import AutoTokenizer

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "  Answer in one word. " * 12},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ]
    as_strings = [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else "\n".join(p["text"] for p in m["content"]),
        }
        for m in messages
    ]
    tok = AutoTokenizer.from_pretrained(str(model))
    text = tok.apply_chat_template(as_strings, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    block = 16
    fn = get_hash_fn_by_name("sha256_cbor")
    saved = os.environ.pop("PYTHONHASHSEED", None)
    try:
        kv_cache_utils.init_none_hash(fn)
        parent, want = None, []
        for i in range(len(ids) // block):
            parent = kv_cache_utils.hash_block_tokens(fn, parent, ids[i * block : (i + 1) * block], None)
            want.append(kv_cache_utils.maybe_convert_block_hash(parent))
    finally:
        if saved is not None:
            os.environ["PYTHONHASHSEED"] = saved
    assert len(want) >= 4, "a prompt of several blocks"
    request = tmp_path / "chat.json"
    request.write_text(json.dumps({"model": "m", "messages": messages}))
    args = [str(KVAGENT), "hash", "--json", "--block-size", str(block)]
    args += ["--tokenizer", str(model / "tokenizer.json"), "--chat", str(request)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    assert [b["event_hash"] for b in json.loads(out.stdout)["blocks"]] == want
