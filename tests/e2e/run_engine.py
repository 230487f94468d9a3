"""Runs one vLLM engine (in-process, CPU) over a list of prompts and prints, as JSON, each
request's greedy output token ids and vLLM's count of cached prompt tokens, the connector's log
and the engine's count of preemptions.

Usage: python run_engine.py MODEL_DIR PROMPTS_JSON [--socket PATH] [--rounds N] [--reset] ...
  --socket: use kvtier's connector with the agent at PATH (else no connector);
  --rounds: serve the prompts N times in this engine; --reset: reset vLLM's prefix cache
  between rounds (so a second round can only hit through kvtier);
  --batch: submit a round's prompts together (else one after another);
  --compile: run vLLM's default compiled model (else eager, see EAGER in conftest.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys


class Collect(logging.Handler):
    """Keeps the connector's log lines, for tests to see which paths ran."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--socket")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--reset", action="store_true")
    p.add_argument("--salt", default=None)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--policy", default="fail")
    p.add_argument("--max-batched-tokens", type=int, default=None, help="chunked-prefill chunk size")
    p.add_argument("--kill", default=None, help="PID:INDEX: SIGKILL PID before serving prompt INDEX")
    p.add_argument("--batch", action="store_true", help="submit each round's prompts together")
    p.add_argument("--blocks", type=int, default=None, help="KV-cache blocks (default: from 64 MiB)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--lora", default=None, help="serve every prompt with this adapter of MODEL_DIR")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (workers in processes)")
    p.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode")
    a = p.parse_args()

    collect = Collect()
    kvtier_log = logging.getLogger("kvtier")
    kvtier_log.addHandler(collect)
    kvtier_log.setLevel(logging.DEBUG)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if a.tp > 1:
        # vLLM binds each CPU worker to a NUMA node unless told which cores each one gets.
        cpus = sorted(os.sched_getaffinity(0))
        per = max(1, len(cpus) // a.tp)
        groups = [cpus[(r * per) % len(cpus) : (r * per) % len(cpus) + per] for r in range(a.tp)]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(",".join(map(str, g)) for g in groups))
    from vllm import LLM, SamplingParams

    kv_transfer = None
    if a.socket:
        kv_transfer = {
            "kv_connector": "KvTierConnector",
            "kv_connector_module_path": "kvtier.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": a.policy,
            "kv_connector_extra_config": {"socket": a.socket, "timeout_ms": 2000},
        }
    llm = LLM(
        model=a.model,
        tokenizer=a.model,
        dtype=a.dtype,
        block_size=32,
        max_model_len=a.max_model_len,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=True,
        prefix_caching_hash_algo="sha256_cbor",
        tensor_parallel_size=a.tp,
        distributed_executor_backend="uni" if a.tp == 1 else "mp",
        seed=0,
        enforce_eager=not a.compile,
        disable_log_stats=False,
        kv_transfer_config=kv_transfer,
        **({"max_num_batched_tokens": a.max_batched_tokens} if a.max_batched_tokens else {}),
        **({"num_gpu_blocks_override": a.blocks} if a.blocks else {}),
        **({"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if a.lora else {}),
    )
    lora = None
    if a.lora:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(a.lora, 1, os.path.join(a.model, a.lora))
    prompts = [{"prompt_token_ids": ids} for ids in json.load(open(a.prompts))]
    if a.salt is not None:
        prompts = [{**prompt, "cache_salt": a.salt} for prompt in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    rounds = []
    for r in range(a.rounds):
        if r > 0 and a.reset:
            assert llm.reset_prefix_cache()
        outs = []
        if a.batch:
            batch = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
            outs = [{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in batch]
        for i, prompt in enumerate([] if a.batch else prompts):
            if a.kill and r == 0 and i == int(a.kill.split(":")[1]):
                os.kill(int(a.kill.split(":")[0]), signal.SIGKILL)
            (o,) = llm.generate([prompt], params, use_tqdm=False, lora_request=lora)
            outs.append({"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens})
        rounds.append(outs)
    preemptions = sum(
        int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
    )
    json.dump({"rounds": rounds, "log": collect.lines, "preemptions": preemptions}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
