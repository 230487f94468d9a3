"""kvtier under real vLLM (CPU): prefixes saved by one engine are loaded by another, outputs stay
token-identical to a run without a connector, and every failure ends in recompute."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from s3server import WeedServer

import kvtier
from conftest import PREFIX_TOKENS, OpenAIServer, run_engine, run_engine_report
from kvagent_process import Agent


def tokens(round_: list[dict[str, object]]) -> list[object]:
    return [r["tokens"] for r in round_]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_a_fresh_engine_loads_the_prefix_another_engine_computed(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent, mode: str
) -> None:
    sock = str(agent.socket)
    engine = ["--socket", sock, *(["--compile"] if mode == "compiled" else [])]
    report = run_engine_report(model, prompts, *engine)
    (first,) = report["rounds"]
    assert first[0]["cached"] == 0, "nothing cached before the first engine ran"
    if mode == "eager":
        # The baseline ran eagerly too; a compiled model is held to its own first run, below.
        assert tokens(first) == baseline
    # vLLM calls the connector after each attention layer: every layer was saved there.
    published = [line for line in report["log"] if line.startswith("kvtier: published")]
    assert published, report["log"]
    for line in published:
        copied = re.search(r"(\d+) of (\d+) layers copied during the forward", line)
        assert copied is not None and copied[1] == copied[2], line
    (second,) = run_engine(model, prompts, *engine)
    # A fresh process has an empty prefix cache: its first prompt's hit can only be kvtier's.
    assert second[0]["cached"] >= PREFIX_TOKENS
    assert tokens(second) == tokens(first)
    stats = json.loads(kvtier.Client(sock).stats())
    assert stats["host"]["hits"] >= PREFIX_TOKENS // 32


def test_after_a_prefix_cache_reset_the_prefix_comes_from_kvtier(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent
) -> None:
    first, second = run_engine(model, prompts, "--socket", str(agent.socket), "--rounds", "2", "--reset")
    assert first[0]["cached"] == 0
    assert second[0]["cached"] >= PREFIX_TOKENS
    assert tokens(first) == tokens(second) == baseline


def test_after_an_agent_restart_hits_come_from_disk(
    model: Path, prompts: Path, baseline: list[list[int]], workdir: Path
) -> None:
    disk = ["--host-size", "256MiB", "--disk-dir", str(workdir / "disk"), "--disk-size", "1GiB"]
    cfg = workdir / "agent.toml"
    cfg.write_text('[disk]\nslab_size = "64MiB"\n')
    agent = Agent(workdir / "agent.sock", ["--config", str(cfg), *disk])
    try:
        run_engine(model, prompts, "--socket", str(agent.socket))
        assert agent.stop() == 0, "a clean stop writes the arena's blocks to disk"
        agent.proc = agent._start()
        report = run_engine_report(model, prompts, "--socket", str(agent.socket))
        (after,) = report["rounds"]
        assert after[0]["cached"] >= PREFIX_TOKENS
        assert tokens(after) == baseline
        # The blocks were promoted off the scheduler's thread, then loaded asynchronously.
        assert any(line.endswith(" asynchronously") for line in report["log"]), report["log"]
        stats = json.loads(kvtier.Client(str(agent.socket)).stats())
        assert stats["disk"]["hits"] >= PREFIX_TOKENS // 32
        assert stats["host"]["promotions"] >= PREFIX_TOKENS // 32
    finally:
        agent.kill()


def test_with_host_and_disk_emptied_the_prefix_comes_from_s3(
    model: Path, prompts: Path, baseline: list[list[int]], workdir: Path, s3: WeedServer
) -> None:
    cfg = workdir / "agent.toml"
    cfg.write_text(s3.agent_toml("e2e") + 'write_through_min_blocks = 1\n[disk]\nslab_size = "64MiB"\n')

    def start(name: str) -> Agent:
        disk = ["--disk-dir", str(workdir / f"disk-{name}"), "--disk-size", "1GiB"]
        return Agent(workdir / f"{name}.sock", ["--config", str(cfg), "--host-size", "256MiB", *disk])

    first = start("first")
    try:
        run_engine(model, prompts, "--socket", str(first.socket))
        assert first.stop() == 0, "a clean stop uploads what the object tier still holds"
    finally:
        first.kill()
    # Another agent (another node): empty arena, empty disk, the same bucket and prefix.
    second = start("second")
    try:
        report = run_engine_report(model, prompts, "--socket", str(second.socket))
        (after,) = report["rounds"]
        assert after[0]["cached"] >= PREFIX_TOKENS
        assert tokens(after) == baseline
        assert any(line.endswith(" asynchronously") for line in report["log"]), report["log"]
        stats = json.loads(kvtier.Client(str(second.socket)).stats())
        assert stats["disk"]["hits"] == 0
        assert stats["object"]["hits"] >= PREFIX_TOKENS // 32
        assert stats["host"]["promotions"] >= PREFIX_TOKENS // 32
        assert stats["object_detail"]["remote_blocks"] >= PREFIX_TOKENS // 32
    finally:
        second.kill()


def test_an_agent_killed_mid_run_costs_hits_never_requests(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent
) -> None:
    run_engine(model, prompts, "--socket", str(agent.socket))
    # Under vLLM's default kv_load_failure_policy ("fail"): a claimed block that could not be
    # delivered would fail its request. Kill the agent after the first prompt of a fresh engine.
    (run,) = run_engine(
        model, prompts, "--socket", str(agent.socket), "--policy", "fail", "--kill", f"{agent.proc.pid}:1"
    )
    assert run[0]["cached"] >= PREFIX_TOKENS, "served from kvtier while the agent lived"
    assert tokens(run) == baseline


def test_blocks_of_every_prefill_chunk_are_saved(model: Path, prompts: Path, agent: Agent) -> None:
    # 64-token chunks: the 192-token prefix is computed over several steps, the later chunks
    # arriving as cached requests; all of them must reach kvtier.
    (chunked,) = run_engine(model, prompts, "--socket", str(agent.socket), "--max-batched-tokens", "64")
    (fresh,) = run_engine(model, prompts, "--socket", str(agent.socket))
    assert fresh[0]["cached"] >= PREFIX_TOKENS
    assert tokens(fresh) == tokens(chunked)


def test_another_tenant_gets_no_hit(model: Path, prompts: Path, agent: Agent) -> None:
    (a,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-a")
    (b,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-b")
    assert a[0]["cached"] == 0 and b[0]["cached"] == 0
    (a2,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-a")
    assert a2[0]["cached"] >= PREFIX_TOKENS, "the same tenant does hit"
    assert tokens(a2) == tokens(a)


def test_another_lora_adapter_gets_no_hit(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent
) -> None:
    sock = str(agent.socket)
    (reference,) = run_engine(model, prompts, "--lora", "lora-a")
    assert tokens(reference) != baseline, "the adapter changes the model"
    (a,) = run_engine(model, prompts, "--socket", sock, "--lora", "lora-a")
    assert tokens(a) == tokens(reference)
    (b,) = run_engine(model, prompts, "--socket", sock, "--lora", "lora-b")
    (base,) = run_engine(model, prompts, "--socket", sock)
    assert b[0]["cached"] == 0 and base[0]["cached"] == 0, "blocks of adapter A serve nobody else"
    (a2,) = run_engine(model, prompts, "--socket", sock, "--lora", "lora-a")
    assert a2[0]["cached"] >= PREFIX_TOKENS, "the same adapter does hit"
    assert tokens(a2) == tokens(reference)


def test_the_openai_server_loads_prefixes_from_kvtier(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent, workdir: Path
) -> None:
    run_engine(model, prompts, "--socket", str(agent.socket))
    kv = {
        "kv_connector": "KvTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": str(agent.socket)},
    }
    server = OpenAIServer(model, workdir, "server", kv)
    try:
        server.wait_ready()
        ids = json.loads(prompts.read_text())[0]
        out = server.greedy(ids)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= PREFIX_TOKENS
        assert out["choices"][0]["token_ids"] == baseline[0]
    finally:
        server.stop()


def test_a_hit_that_continues_a_local_prefix_loads_into_the_right_blocks(
    model: Path, prompts: Path, agent: Agent, workdir: Path
) -> None:
    full = json.loads(prompts.read_text())[0]
    short = full[:64] + [7] * 40  # shares two blocks with `full`
    mixed = workdir / "mixed.json"
    mixed.write_text(json.dumps([short, full]))
    first, second = run_engine(model, mixed, "--socket", str(agent.socket), "--rounds", "2", "--reset")
    # Second round: `short` brings blocks 0-1 back into vLLM's cache; `full` then hits those two
    # locally and must load blocks 2-5 from kvtier into its own blocks 2-5.
    assert second[1]["cached"] >= PREFIX_TOKENS
    assert tokens(second) == tokens(first)


def test_preempted_requests_resume_with_their_blocks_loaded(model: Path, agent: Agent, workdir: Path) -> None:
    rng = random.Random(11)
    prefix = [rng.randrange(2, 900) for _ in range(PREFIX_TOKENS)]
    path = workdir / "preempt.json"
    path.write_text(json.dumps([prefix + [rng.randrange(2, 900) for _ in range(100)] for _ in range(4)]))
    # Four requests of up to 13 blocks each, decoding together in 24 blocks: vLLM preempts.
    flags = ["--batch", "--blocks", "24", "--max-model-len", "512", "--max-tokens", "96"]
    flags += ["--dtype", "float32"]
    reference = run_engine_report(model, path, *flags)
    report = run_engine_report(model, path, *flags, "--socket", str(agent.socket))
    assert reference["preemptions"] > 0 and report["preemptions"] > 0, "the cache is small enough to preempt"
    resumed = [line for line in report["log"] if " resumes with " in line]
    assert resumed, report["log"]
    assert tokens(report["rounds"][0]) == tokens(reference["rounds"][0])


def test_tensor_parallel_ranks_save_and_load_their_own_shards(
    model: Path, prompts: Path, agent: Agent
) -> None:
    sock = str(agent.socket)
    (reference,) = run_engine(model, prompts, "--tp", "2")
    (first,) = run_engine(model, prompts, "--tp", "2", "--socket", sock)
    assert tokens(first) == tokens(reference)
    stats = json.loads(kvtier.Client(sock).stats())
    # Each rank saved its own shard of every block, under its own namespace.
    assert stats["host"]["blocks"] >= 2 * (PREFIX_TOKENS // 32 + 1)
    assert stats["host"]["blocks"] % 2 == 0
    (second,) = run_engine(model, prompts, "--tp", "2", "--socket", sock)
    # A fresh engine: its first prompt's hit is kvtier's, loaded by both ranks.
    assert second[0]["cached"] >= PREFIX_TOKENS
    assert tokens(second) == tokens(reference)
