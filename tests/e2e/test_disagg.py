"""Prefill/decode disaggregation with real vLLM on CPU: a prefill server and a decode server,
each with its own kvtier agent, behind the proxy logic of vLLM's disaggregated-serving examples
(prefill with ``max_tokens=1``, then decode with the ``kv_transfer_params`` the prefill returned).
The decode server pulls the prompt's blocks from the prefill server's agent, reports them as
cached, and its greedy output is token-identical to a single engine's."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_index import IndexProcess

import kvtier
from conftest import PREFIX_TOKENS, OpenAIServer, free_port, run_engine, run_engine_report
from kvagent_process import Agent

BLOCK = 32
SECRET = "pd-test-cluster"


def connector(agent: Agent, role: str) -> dict[str, Any]:
    return {
        "kv_connector": "KvTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"socket": str(agent.socket), "pull_timeout_ms": 20000},
    }


def prefill_step(prefill: OpenAIServer, ids: list[int]) -> dict[str, Any]:
    """The first half of what vLLM's P/D example proxy does: the ``kv_transfer_params`` that
    the prefill server returns for the decode server."""
    first = prefill.complete(
        {
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        }
    )
    params: dict[str, Any] | None = first.get("kv_transfer_params")
    assert params, f"the prefill server returned no kv_transfer_params: {first}"
    return params


def proxy(prefill: OpenAIServer, decode: OpenAIServer, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """What vLLM's P/D example proxy does with a completion request."""
    return decode.greedy(ids, max_tokens, kv_transfer_params=prefill_step(prefill, ids))


class Cluster:
    def __init__(self, model: Path, workdir: Path) -> None:
        secret = workdir / "secret"
        secret.write_text(SECRET)
        self.peer = f"127.0.0.1:{free_port()}"
        self.prefill_agent = Agent(
            workdir / "p.sock",
            ["--host-size", "256MiB", "--peer-listen", self.peer, "--peer-secret-file", str(secret)],
        )
        self.decode_agent = Agent(
            workdir / "d.sock", ["--host-size", "256MiB", "--peer-secret-file", str(secret)]
        )
        # Different hash seeds: the prefill's block hashes travel with the request.
        self.prefill = OpenAIServer(
            model, workdir, "prefill", connector(self.prefill_agent, "kv_producer"), {"PYTHONHASHSEED": "1"}
        )
        self.decode = OpenAIServer(
            model, workdir, "decode", connector(self.decode_agent, "kv_consumer"), {"PYTHONHASHSEED": "2"}
        )
        self.prefill.wait_ready()
        self.decode.wait_ready()

    def close(self) -> None:
        for s in (self.prefill, self.decode):
            s.stop()
        for a in (self.prefill_agent, self.decode_agent):
            a.kill()

    def logs(self) -> str:
        """The tails of every log, for a failure's message."""
        paths = [self.prefill.log_path, self.decode.log_path]
        paths += [self.prefill_agent.stderr, self.decode_agent.stderr]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in paths)

    def stats(self, agent: Agent) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(kvtier.Client(str(agent.socket)).stats())
        return out

    def prefill_peer_stat(self, name: str, until: Callable[[int], bool], timeout: float = 10) -> int:
        """The prefill agent's ``peer`` counter ``name`` once ``until`` holds for it (a puller
        releases its grant after its pull returns), or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = int(self.stats(self.prefill_agent)["peer"][name])
            if until(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One prefill and one decode server for the module (starting them is most of its time);
    the test that kills the prefill agent runs last."""
    c = Cluster(model, tmp_path_factory.mktemp("pd"))
    yield c
    c.close()


def test_decode_pulls_the_prefill_engines_blocks_and_matches_a_single_engine(
    cluster: Cluster, prompts: Path, baseline: list[list[int]]
) -> None:
    ids = json.loads(prompts.read_text())[0]
    held_before = cluster.stats(cluster.prefill_agent)["peer"]["held_blocks"]
    params = prefill_step(cluster.prefill, ids)
    # The prefill agent keeps the blocks it hands over until the decode's pull of them ends.
    held = cluster.stats(cluster.prefill_agent)["peer"]["held_blocks"] - held_before
    assert held == len(params["remote_block_hashes"]) == (len(ids) - 1) // BLOCK
    out = cluster.decode.greedy(ids, 8, kv_transfer_params=params)
    blocks = (len(ids) - 1) // BLOCK
    # The decode engine counts the pulled blocks as external prefix-cache hits (the API's
    # cached_tokens is the prefill side's own hit count, which vLLM passes along).
    external = cluster.decode.metric("vllm:external_prefix_cache_hits_total")
    assert external >= blocks * BLOCK >= PREFIX_TOKENS, cluster.logs()
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "the prefill engine computed it all"
    assert out["choices"][0]["token_ids"] == baseline[0]
    # The decode agent holds the blocks it pulled; the prefill agent granted them.
    assert cluster.stats(cluster.decode_agent)["host"]["blocks"] >= blocks
    assert cluster.prefill_peer_stat("grants_open", lambda n: n == 0) == 0
    assert cluster.prefill_peer_stat("held_blocks", lambda n: n == held_before) == held_before, (
        "the pull ended the holds"
    )

    # A second prompt sharing the prefix: the prefill engine hits its own prefix cache and still
    # hands every block over.
    second = json.loads(prompts.read_text())[1]
    out = proxy(cluster.prefill, cluster.decode, second, max_tokens=8)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= PREFIX_TOKENS
    assert out["choices"][0]["token_ids"] == baseline[1]


def test_kvtier_beside_a_nixl_like_connector_in_a_multiconnector(
    cluster: Cluster, model: Path, workdir: Path
) -> None:
    """A prefill engine running kvtier beside another P/D connector (here one that returns
    NIXL's keys) in vLLM's MultiConnector: with ``pd_params = kvtier`` the two connectors'
    parameters merge without a clash (vLLM stops the engine on one), and a kvtier decode
    engine pulls by kvtier's keys alone."""
    children = [
        {
            **connector(cluster.prefill_agent, "kv_producer"),
            "kv_connector_extra_config": {"socket": str(cluster.prefill_agent.socket), "pd_params": "kvtier"},
        },
        {
            "kv_connector": "ProbeConnector",
            "kv_connector_module_path": "probe_connector",
            "kv_role": "kv_producer",
        },
    ]
    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"connectors": children},
    }
    env = {"PYTHONHASHSEED": "3", "PYTHONPATH": str(Path(__file__).parent)}
    prefill = OpenAIServer(model, workdir, "prefill-multi", multi, env)
    try:
        prefill.wait_ready()
        # A prompt neither decode engine nor agent has seen.
        rng = random.Random(29)
        ids = [rng.randrange(2, 900) for _ in range(PREFIX_TOKENS + 20)]
        reference = cluster.prefill.greedy(ids, 8)["choices"][0]["token_ids"]
        hits_before = cluster.decode.metric("vllm:external_prefix_cache_hits_total")
        out = proxy(prefill, cluster.decode, ids, max_tokens=8)
        assert out["choices"][0]["token_ids"] == reference, cluster.logs()
        assert cluster.decode.metric("vllm:external_prefix_cache_hits_total") >= hits_before + PREFIX_TOKENS
        asked = {"do_remote_decode": True}
        first = prefill.complete(
            {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "kv_transfer_params": asked}
        )
        params = first["kv_transfer_params"]
        assert params["remote_engine_id"] == "probe" and params["remote_block_hashes"], params
        assert params["remote_agent"] == cluster.peer
    finally:
        prefill.stop()


def test_a_dead_prefill_agent_means_the_decode_engine_computes(cluster: Cluster) -> None:
    # A prompt neither server has seen: the decode server has nothing of it cached.
    rng = random.Random(23)
    ids = [rng.randrange(2, 900) for _ in range(PREFIX_TOKENS + 20)]
    reference = cluster.prefill.greedy(ids)["choices"][0]["token_ids"]
    hits_before = cluster.decode.metric("vllm:external_prefix_cache_hits_total")
    cluster.prefill_agent.kill()
    # The prefill engine cannot save (its agent is gone): it returns no parameters, so ask the
    # decode engine directly with parameters naming the dead agent, as a proxy would after a
    # prefill pod died between the two requests.
    params = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": "127.0.0.1",
        "remote_port": int(cluster.peer.rsplit(":", 1)[1]),
        "remote_agent": cluster.peer,
        "remote_block_hashes": ["ab" * 32] * 6,
    }
    out = cluster.decode.greedy(ids, kv_transfer_params=params)
    assert cluster.decode.metric("vllm:external_prefix_cache_hits_total") == hits_before
    assert out["choices"][0]["token_ids"] == reference
    assert "from its prefill engine failed, computing" in cluster.decode.log_path.read_text()
    # Malformed parameters from a proxy: that request computes, the engine keeps serving.
    bad = {**params, "remote_block_hashes": ["not hex"], "remote_agent": None, "remote_port": "x"}
    out = cluster.decode.greedy(ids, kv_transfer_params=bad)
    assert out["choices"][0]["token_ids"] == reference
    assert "malformed kv_transfer_params" in cluster.decode.log_path.read_text()


def test_a_fresh_node_reuses_a_prefix_another_node_computed(
    model: Path, prompts: Path, baseline: list[list[int]], workdir: Path
) -> None:
    """Cross-node reuse: the engine on node b has never seen the prompt; its agent learns from
    the cluster index that node a's agent holds the prefix, and pulls it."""
    secret = workdir / "secret"
    secret.write_text(SECRET)
    peer = f"127.0.0.1:{free_port()}"
    # A pod on node a, so that the index can score what a's agent holds.
    index = IndexProcess([f"pa={model}@tcp://127.0.0.1:{free_port()},node=a"], model=str(model))
    common = ["--host-size", "256MiB", "--peer-secret-file", str(secret), "--index", index.url]
    # The index's answer may take longer than the default 20 ms on a machine this busy (two
    # cores running vLLM); what is tested is that the agent acts on it.
    config = workdir / "reuse.toml"
    config.write_text("[reuse]\nindex_timeout_ms = 1000\n")
    a = Agent(workdir / "a.sock", [*common, "--node-name", "a", "--peer-listen", peer])
    b = Agent(workdir / "b.sock", [*common, "--node-name", "b", "--config", str(config)])
    try:
        (first,) = run_engine(model, prompts, "--socket", str(a.socket))
        assert [r["tokens"] for r in first] == baseline
        ids = json.loads(prompts.read_text())[0]
        index.until(ids, lambda s: s.get("pa", 0) >= PREFIX_TOKENS // BLOCK)
        report = run_engine_report(model, prompts, "--socket", str(b.socket))
        (second,) = report["rounds"]
        assert second[0]["cached"] >= PREFIX_TOKENS, report["log"]
        assert [r["tokens"] for r in second] == baseline
        stats = json.loads(kvtier.Client(str(b.socket)).stats())
        assert stats["host"]["stores"] >= PREFIX_TOKENS // BLOCK
        # Pulled blocks are promoted off the scheduler's thread, then loaded asynchronously.
        assert any(line.endswith(" asynchronously") for line in report["log"]), report["log"]
    finally:
        a.kill()
        b.kill()
        index.close()
