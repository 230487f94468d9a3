"""`kvagent route` in front of two real vLLM OpenAI servers that publish KV events to
`kvagent index`: prefix-aware routing sends requests that share a prefix to the server that
holds it. Its prefix-cache hit rate is compared with round-robin's in the same run (the figure
in docs/benchmarks.md), streaming passes through, and requests survive an index that is down."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_index import KVAGENT, IndexProcess

from conftest import EAGER, free_port, wait_healthy

BLOCK = 32


class Server:
    """A vLLM OpenAI server publishing its KV events."""

    def __init__(self, model: Path, workdir: Path, name: str) -> None:
        self.port, self.events = free_port(), free_port(span=2)
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--tokenizer", str(model), "--served-model-name", "m",
            "--dtype", "bfloat16", "--block-size", str(BLOCK), "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(64 << 20), "--enable-prefix-caching",
            "--prefix-caching-hash-algo", "sha256_cbor", "--distributed-executor-backend", "uni",
            "--seed", "0", "--enable-prompt-tokens-details", "--host", "127.0.0.1",
            "--port", str(self.port), *EAGER, "--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{self.events}", "replay_endpoint": f"tcp://*:{self.events + 1}",
            }),
        ]  # fmt: skip
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(workdir), env=env
        )

    def wait_ready(self) -> None:
        wait_healthy(f"http://127.0.0.1:{self.port}/health", self.proc, self.log_path)

    def reset(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/reset_prefix_cache", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

    def poke(self) -> None:
        """A one-token request straight to the server (it ends a step: events go out)."""
        body = {"model": "m", "prompt": [7], "max_tokens": 1}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Route:
    def __init__(
        self, index_port: int, backends: dict[str, int], policy: str, tokenizer: Path | None = None
    ) -> None:
        self.port = free_port()
        args = [str(KVAGENT), "route", "--listen", f"127.0.0.1:{self.port}", "--policy", policy]
        if tokenizer is not None:
            args += ["--tokenizer", str(tokenizer)]
        args += ["--index", f"http://127.0.0.1:{index_port}", "--model", "m", "--block-size", str(BLOCK)]
        for name, port in backends.items():
            args += ["--backend", f"{name}=http://127.0.0.1:{port}"]
        self.proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "the router did not start"
                time.sleep(0.1)

    def complete(self, prompt: list[int], stream: bool = False) -> tuple[str, dict[str, Any] | bytes]:
        body = {"model": "m", "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
        if stream:
            body["stream"] = True
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            backend = r.headers["x-kvtier-backend"]
            raw = r.read()
        return backend, raw if stream else json.loads(raw)

    def chat(self, system: str, question: str) -> tuple[str, dict[str, Any]]:
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 2,
            "temperature": 0.0,
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.headers["x-kvtier-backend"], json.loads(r.read())

    def routed(self, reason: str) -> int:
        """Requests the router sent for `reason`, from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("kvtier_route_requests_total{") and f'reason="{reason}"' in line
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(
    model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Server], IndexProcess]]:
    """Two servers and the index, shared by this module's tests (the servers take half a
    minute to start); each test starts from empty prefix caches (:func:`emptied`)."""
    workdir = tmp_path_factory.mktemp("route")
    servers = {name: Server(model, workdir, name) for name in ("a", "b")}
    index = IndexProcess(
        [
            f"{n}=m@tcp://127.0.0.1:{s.events},replay=tcp://127.0.0.1:{s.events + 1}"
            for n, s in servers.items()
        ]
    )
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers, index
    finally:
        for s in servers.values():
            s.close()
        index.kill()


def emptied(servers: dict[str, Server]) -> None:
    """Empties the servers' prefix caches, and has each publish that to the index (vLLM
    publishes the reset with its next step: one unrelated request per server)."""
    for s in servers.values():
        s.reset()
    for s in servers.values():
        s.poke()


def workload() -> list[list[int]]:
    """Three groups of six requests, each group sharing a six-block prefix, interleaved."""
    rng = random.Random(5)
    prefixes = [[rng.randrange(2, 900) for _ in range(6 * BLOCK)] for _ in range(3)]
    rounds = [[p + [rng.randrange(2, 900) for _ in range(16)] for p in prefixes] for _ in range(6)]
    return [prompt for round_ in rounds for prompt in round_]


def hit_rate(route: Route, prompts: list[list[int]]) -> tuple[float, list[str]]:
    cached = total = 0
    chosen = []
    for p in prompts:
        backend, out = route.complete(p)
        assert isinstance(out, dict)
        chosen.append(backend)
        cached += out["usage"]["prompt_tokens_details"]["cached_tokens"]
        total += out["usage"]["prompt_tokens"]
    return cached / total, chosen


def test_prefix_aware_routing_beats_round_robin(
    cluster: tuple[dict[str, Server], IndexProcess], workdir: Path
) -> None:
    servers, index = cluster
    emptied(servers)
    ports = {n: s.port for n, s in servers.items()}
    prompts = workload()

    rr = Route(index.port, ports, "round-robin")
    try:
        rr_rate, _ = hit_rate(rr, prompts)
    finally:
        rr.close()
    emptied(servers)

    route = Route(index.port, ports, "prefix")
    try:
        prefix_rate, chosen = hit_rate(route, prompts)
        # Every later request of a group went where the group's first one went.
        for g in range(3):
            assert len(set(chosen[g::3])) == 1, chosen
        backend, raw = route.complete(prompts[0], stream=True)
        assert isinstance(raw, bytes) and raw.rstrip().endswith(b"data: [DONE]"), "streamed through"
        assert backend == chosen[0]
    finally:
        route.close()
    (workdir / "route-hit-rates.json").write_text(json.dumps({"round_robin": rr_rate, "prefix": prefix_rate}))
    print(f"prefix-cache hit rate: prefix-aware {prefix_rate:.3f}, round-robin {rr_rate:.3f}")
    assert prefix_rate > rr_rate + 0.1, (prefix_rate, rr_rate)


def test_chat_requests_reach_the_server_holding_their_prefix(
    cluster: tuple[dict[str, Server], IndexProcess], model: Path
) -> None:
    """The router renders chat requests with the model's chat template and tokenizes them as
    vLLM does: later chats sharing a long system prompt go where the first one went, and hit."""
    servers, index = cluster
    emptied(servers)
    route = Route(index.port, {n: s.port for n, s in servers.items()}, "prefix", model / "tokenizer.json")
    rng = random.Random(9)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    systems = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(2)]
    try:
        first = [route.chat(s, "first question")[0] for s in systems]
        for i in range(3):
            for s, where in zip(systems, first, strict=True):
                backend, out = route.chat(s, f"question {i}")
                assert backend == where, "a chat goes where its system prompt is cached"
                assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * BLOCK
        assert route.routed("prefix") >= 6, "routed by the index, not by load"
    finally:
        route.close()


def test_requests_survive_an_index_that_is_down(cluster: tuple[dict[str, Server], IndexProcess]) -> None:
    """A router whose index does not answer (nothing listens at its address) serves every
    request all the same, by load, and counts each as a fallback."""
    servers, _ = cluster
    route = Route(free_port(), {n: s.port for n, s in servers.items()}, "prefix")
    try:
        prompts = workload()[:4]
        for p in prompts:
            backend, out = route.complete(p)
            assert backend in servers
            assert isinstance(out, dict) and out["usage"]["completion_tokens"] == 2
        assert route.routed("fallback") == len(prompts)
    finally:
        route.close()
