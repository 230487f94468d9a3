"""kvtier under real vLLM (CPU): prefixes saved by one engine are loaded by another, outputs stay
token-identical to a run without a connector, and every failure ends in recompute."""

from __future__ import annotations

import json
from pathlib import Path

import kvtier
from conftest import PREFIX_TOKENS, run_engine
from kvagent_process import Agent


def tokens(round_: list[dict[str, object]]) -> list[object]:
    return [r["tokens"] for r in round_]


def test_a_fresh_engine_loads_the_prefix_another_engine_computed(
    model: Path, prompts: Path, baseline: list[list[int]], agent: Agent
) -> None:
    sock = str(agent.socket)
    (first,) = run_engine(model, prompts, "--socket", sock)
    assert first[0]["cached"] == 0, "nothing cached before the first engine ran"
    assert tokens(first) == baseline
    (second,) = run_engine(model, prompts, "--socket", sock)
    # A fresh process has an empty prefix cache: its first prompt's hit can only be kvtier's.
    assert second[0]["cached"] >= PREFIX_TOKENS
    assert tokens(second) == baseline
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
        (after,) = run_engine(model, prompts, "--socket", str(agent.socket))
        assert after[0]["cached"] >= PREFIX_TOKENS
        assert tokens(after) == baseline
        stats = json.loads(kvtier.Client(str(agent.socket)).stats())
        assert stats["disk"]["hits"] >= PREFIX_TOKENS // 32
        assert stats["host"]["promotions"] >= PREFIX_TOKENS // 32
    finally:
        agent.kill()


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


def test_another_tenant_gets_no_hit(model: Path, prompts: Path, agent: Agent) -> None:
    (a,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-a")
    (b,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-b")
    assert a[0]["cached"] == 0 and b[0]["cached"] == 0
    (a2,) = run_engine(model, prompts, "--socket", str(agent.socket), "--salt", "tenant-a")
    assert a2[0]["cached"] >= PREFIX_TOKENS, "the same tenant does hit"
    assert tokens(a2) == tokens(a)
