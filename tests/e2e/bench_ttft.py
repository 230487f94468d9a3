"""TTFT of a prompt whose 2k-token prefix is served from kvtier, against full recompute of a
prompt of the same length, in one engine (same config), requests alternating.

Usage: python bench_ttft.py [--requests N] [--prefix-tokens N] [--json OUT]
Builds a bigger random-weight model (8 layers, hidden 1024, GQA) and starts its own kvagent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python" / "tests"))

import kvtier  # noqa: E402
from kvagent_process import Agent  # noqa: E402

BLOCK = 32


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    model = REPO / "target" / "e2e-model-large"
    subprocess.run(
        [sys.executable, str(HERE / "make_model.py"), str(model), "--layers", "8", "--hidden", "1024",
         "--heads", "16", "--kv-heads", "4"],
        check=True,
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="kvt-bench-"))
    agent = Agent(tmp / "agent.sock", ["--host-size", "2GiB"])
    try:
        run(a, model, agent)
    finally:
        agent.kill()


def run(a: argparse.Namespace, model: Path, agent: Agent) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        tokenizer=str(model),
        dtype="bfloat16",
        block_size=BLOCK,
        max_model_len=4096,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=True,
        prefix_caching_hash_algo="sha256_cbor",
        distributed_executor_backend="uni",
        seed=0,
        kv_transfer_config={
            "kv_connector": "KvTierConnector",
            "kv_connector_module_path": "kvtier.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"socket": str(agent.socket), "timeout_ms": 10000},
        },
    )
    rng = random.Random(3)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, 900) for _ in range(n)]

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefix = tokens(a.prefix_tokens)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        assert llm.reset_prefix_cache(), "prefix cache reset refused"
        t = time.perf_counter()
        (o,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - t, int(o.num_cached_tokens or 0)

    ttft(prefix + tokens(32))  # computes the prefix once and saves it to kvtier
    client = kvtier.Client(str(agent.socket))
    host = json.loads(client.stats())["host"]
    # Engines copy straight out of the mapped arena, so the agent counts stores, not loads: the
    # bytes a hit moves are its blocks times the block size the stores recorded.
    block_bytes = host["bytes_written"] // max(host["stores"], 1)
    cached_t, recompute_t, cached_tokens = [], [], []
    for i in range(a.requests):
        order = [True, False] if i % 2 == 0 else [False, True]
        for from_kvtier in order:
            if from_kvtier:
                t, c = ttft(prefix + tokens(32))
                cached_t.append(t)
                cached_tokens.append(c)
            else:
                t, c = ttft(tokens(a.prefix_tokens + 32))
                assert c == 0, "a fresh prompt must be computed in full"
                recompute_t.append(t)
    result = {
        "prefix_tokens": a.prefix_tokens,
        "prompt_tokens": a.prefix_tokens + 32,
        "requests": a.requests,
        "ttft_kvtier_p50_s": statistics.median(cached_t),
        "ttft_recompute_p50_s": statistics.median(recompute_t),
        "speedup": statistics.median(recompute_t) / statistics.median(cached_t),
        "cached_tokens_min": min(cached_tokens),
        "bytes_loaded_per_request": min(cached_tokens) // BLOCK * block_bytes,
    }
    print("| prompt | cached prefix | TTFT kvtier p50 | TTFT recompute p50 | speed-up | loaded per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {result['prompt_tokens']} tokens | {result['cached_tokens_min']} tokens "
        f"| {result['ttft_kvtier_p50_s'] * 1000:.0f} ms | {result['ttft_recompute_p50_s'] * 1000:.0f} ms "
        f"| {result['speedup']:.1f}x | {result['bytes_loaded_per_request'] / 2**20:.1f} MiB |"
    )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
