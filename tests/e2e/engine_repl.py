"""One vLLM engine (in-process, CPU) publishing its KV events over ZMQ, driven by JSON commands
on stdin so that a test can interleave requests with questions to the index.

Commands, one JSON object per line:
  {"op": "generate", "prompts": [[ids...], ...], "max_tokens": N} -> {"cached": [n, ...]}
  {"op": "reset"}                                                -> {"reset": true}
  {"op": "exit"}
Each answer is one stdout line starting with "REPL " (vLLM logs to stdout too).

Usage: python engine_repl.py MODEL_DIR --events-port P [--blocks N] [--max-model-len N]
                             [--served-model-name NAME] [--kvtier-socket PATH]
  publishes on tcp://*:P, answers replays on tcp://*:P+1; with --kvtier-socket it also saves to
  (and loads from) the kvtier agent on that socket through the connector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--events-port", type=int, required=True)
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--kvtier-socket", default=None)
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    llm = LLM(
        model=a.model,
        tokenizer=a.model,
        dtype="bfloat16",
        block_size=32,
        max_model_len=a.max_model_len,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=True,
        prefix_caching_hash_algo="sha256_cbor",
        distributed_executor_backend="uni",
        seed=0,
        # As every engine of the tests (EAGER in conftest.py).
        enforce_eager=True,
        kv_events_config=KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=f"tcp://*:{a.events_port}",
            replay_endpoint=f"tcp://*:{a.events_port + 1}",
        ),
        **({"num_gpu_blocks_override": a.blocks} if a.blocks else {}),
        **({"served_model_name": a.served_model_name} if a.served_model_name else {}),
        **(
            {
                "kv_transfer_config": {
                    "kv_connector": "KvTierConnector",
                    "kv_connector_module_path": "kvtier.vllm",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"socket": a.kvtier_socket},
                }
            }
            if a.kvtier_socket
            else {}
        ),
    )

    def answer(obj: object) -> None:
        sys.stdout.write("REPL " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 1), ignore_eos=True)
            prompts = [{"prompt_token_ids": ids} for ids in cmd["prompts"]]
            outs = llm.generate(prompts, params, use_tqdm=False)
            answer({"cached": [o.num_cached_tokens for o in outs]})
        elif cmd["op"] == "reset":
            answer({"reset": bool(llm.reset_prefix_cache())})
        elif cmd["op"] == "exit":
            break


if __name__ == "__main__":
    main()
