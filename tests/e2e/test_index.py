"""`kvagent index` with real vLLM engines publishing their KV events: Score ranks the engine
that holds a prefix, follows evictions and prefix-cache resets, and recovers after the index is
killed and restarted (by replaying the engines' event buffers)."""

from __future__ import annotations

import json
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from kvagent_process import Agent

HERE = Path(__file__).resolve().parent
KVAGENT = HERE.parents[1] / "target" / "debug" / "kvagent"
MODEL_NAME = "e2e-model"
BLOCK = 32


class Engine:
    """An engine_repl.py process. A thread reads its stdout (vLLM logs there too) and keeps the
    answers: waiting on the pipe itself would miss lines already read into Python's buffer."""

    def __init__(self, model: Path, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "engine_repl.py"), str(model), "--events-port", str(port), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.read(timeout=300)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("REPL "):
                self.answers.put(json.loads(line[5:]))
        self.answers.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the engine did not answer in time") from None
        if answer is None:
            raise AssertionError(f"the engine exited ({self.proc.wait()})")
        return answer

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout=300)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class IndexProcess:
    def __init__(self, pods: list[str], *extra: str, model: str = MODEL_NAME) -> None:
        self.port = free_port()
        self.model = model
        self.args = [str(KVAGENT), "index", "--grpc-addr", f"127.0.0.1:{self.port}", "--http-addr", ""]
        self.args += [arg for pod in pods for arg in ("--pod", pod)]
        self.args += list(extra)
        self.log = Path(tempfile.mkstemp(prefix="kvagent-index-", suffix=".log")[1])
        self.args += ["--log-level", "kvagent=debug"]
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stderr=log)

    def wait_log(self, text: str, timeout: float = 20) -> None:
        """Waits until the index has logged `text` (its log is a file, read as it grows)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the index never logged {text!r}"
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.log.unlink(missing_ok=True)

    @property
    def score_args(self) -> list[str]:
        return [str(KVAGENT), "score", "--index", self.url, "--model", self.model]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scores(self, prompt: list[int], check: bool = False) -> list[dict[str, Any]]:
        """`kvagent score`'s answer (pod, blocks, weighted), best first; empty when the index
        does not answer, unless `check`, where that fails the test."""
        out = subprocess.run(
            [*self.score_args, "--block-size", str(BLOCK)],
            input=json.dumps(prompt),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert not check or out.returncode == 0, out.stderr
        if out.returncode != 0:
            return []
        scores: list[dict[str, Any]] = json.loads(out.stdout)["scores"]
        return scores

    def score(self, prompt: list[int]) -> dict[str, int]:
        return {s["pod"]: s["blocks"] for s in self.scores(prompt)}

    def until(
        self, prompt: list[int], ok: Callable[[dict[str, int]], bool], timeout: float = 30
    ) -> dict[str, int]:
        """Scores until `ok` holds (events reach the index asynchronously) or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            scores = self.score(prompt)
            if ok(scores) or time.monotonic() > deadline:
                return scores
            time.sleep(0.2)


@pytest.fixture
def engines(model: Path) -> Iterator[tuple[Engine, Engine, IndexProcess]]:
    pa, pb = free_port(span=2), free_port(span=2)
    index = IndexProcess(
        [
            f"a={MODEL_NAME}@tcp://127.0.0.1:{pa},replay=tcp://127.0.0.1:{pa + 1}",
            f"b={MODEL_NAME}@tcp://127.0.0.1:{pb},replay=tcp://127.0.0.1:{pb + 1}",
        ]
    )
    # Engine a has a small cache (12 blocks of 32 tokens) so that new prompts evict old ones.
    a = Engine(model, pa, "--blocks", "12", "--max-model-len", "256")
    b = Engine(model, pb)
    try:
        yield a, b, index
    finally:
        a.close()
        b.close()
        index.close()


def prompt(seed: int, blocks: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 900) for _ in range(blocks * BLOCK + 5)]


def test_score_follows_what_real_engines_hold(engines: tuple[Engine, Engine, IndexProcess]) -> None:
    a, b, index = engines
    p1, p2 = prompt(1, 6), prompt(2, 5)
    a.call(op="generate", prompts=[p1])
    b.call(op="generate", prompts=[p2])
    scores = index.until(p1, lambda s: s.get("a") == 6)
    assert scores == {"a": 6, "b": 0}, "a served p1: it ranks first with all six blocks"
    assert index.until(p2, lambda s: s.get("b") == 5) == {"b": 5, "a": 0}

    # A prefix-cache reset empties a's blocks.
    assert a.call(op="reset") == {"reset": True}
    # vLLM publishes events at the end of a step: one more (unrelated) request flushes them.
    a.call(op="generate", prompts=[prompt(99, 1)])
    assert index.until(p1, lambda s: s.get("a") == 0)["a"] == 0

    # Eviction: a's 12-block cache cannot keep p1 once two other prompts have run.
    a.call(op="generate", prompts=[p1])
    assert index.until(p1, lambda s: s.get("a") == 6)["a"] == 6
    for seed in (3, 4):
        a.call(op="generate", prompts=[prompt(seed, 6)])
    assert index.until(p1, lambda s: s.get("a", 6) < 6)["a"] < 6, "evicted blocks leave the index"
    held_by_a = index.score(p1)["a"]

    # A killed and restarted index replays the engines' buffered events and answers as before.
    index.kill()
    index.start()
    assert index.until(p2, lambda s: s.get("b") == 5) == {"b": 5, "a": 0}
    assert index.until(p1, lambda s: s.get("a") == held_by_a)["a"] == held_by_a


def test_a_pod_keeps_its_score_through_its_node_agent(model: Path, workdir: Path) -> None:
    """An engine saving to a kvtier agent that reports to the index: after a prefix-cache reset
    its own cache is empty, yet it still scores the prefix, at the host tier's weight, because
    its node's agent holds the blocks (announced under the served model name by the connector)."""
    pc = free_port(span=2)
    index = IndexProcess([f"c={MODEL_NAME}@tcp://127.0.0.1:{pc},replay=tcp://127.0.0.1:{pc + 1},node=n1"])
    agent = Agent(
        workdir / "agent.sock",
        ["--host-size", "256MiB", "--index", f"127.0.0.1:{index.port}", "--node-name", "n1"],
    )
    c = Engine(model, pc, "--served-model-name", MODEL_NAME, "--kvtier-socket", str(agent.socket))
    try:
        p = prompt(5, 6)
        c.call(op="generate", prompts=[p])
        assert index.until(p, lambda s: s.get("c") == 6) == {"c": 6}
        assert c.call(op="reset") == {"reset": True}
        c.call(op="generate", prompts=[prompt(98, 1)])

        def weighted() -> float:
            return float(index.scores(p, check=True)[0]["weighted"])

        # Device blocks count 1.0 each, host blocks 0.8: once the reset reaches the index, the
        # six blocks are still reusable through the agent, and only through it.
        deadline = time.monotonic() + 30
        while abs(weighted() - 6 * 0.8) > 1e-9 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert weighted() == pytest.approx(6 * 0.8)
        assert index.score(p) == {"c": 6}
    finally:
        c.close()
        agent.kill()
        index.close()


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """A real redis-server on loopback, without persistence (a restart comes back empty)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(7) == b"+PONG\r\n":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_replicas_on_redis_follow_a_real_engine_and_rebuild_after_redis_loses_everything(model: Path) -> None:
    """Two index replicas on one Redis both follow a real engine: they answer alike, and when
    Redis restarts empty they notice, replay the engine's buffered events and answer as before
    without any new request."""
    redis = RedisServer()
    pd = free_port(span=2)
    pod = f"d={MODEL_NAME}@tcp://127.0.0.1:{pd},replay=tcp://127.0.0.1:{pd + 1}"
    backend = ("--backend", "redis", "--redis-url", f"redis://127.0.0.1:{redis.port}/0")
    one, two = IndexProcess([pod], *backend), IndexProcess([pod], *backend)
    d = Engine(model, pd)
    try:
        p = prompt(11, 5)
        d.call(op="generate", prompts=[p])
        assert one.until(p, lambda s: s.get("d") == 5) == {"d": 5}
        assert two.score(p) == {"d": 5}, "the other replica answers from the same Redis"

        redis.kill()
        redis.start()
        # Both replicas notice that Redis came back without its data...
        one.wait_log("lost its entries")
        two.wait_log("lost its entries")
        # ...and, with nothing published since, only a replay can bring the blocks back.
        assert one.until(p, lambda s: s.get("d") == 5) == {"d": 5}
        assert two.until(p, lambda s: s.get("d") == 5) == {"d": 5}

        # One replica follows the pod (its lease); whichever it was, killing it leaves the
        # other to take over, going on from the last batch applied: nothing is dropped, and
        # new blocks keep arriving.
        one.kill()
        p2 = prompt(12, 4)
        d.call(op="generate", prompts=[p2])
        assert two.until(p2, lambda s: s.get("d") == 4) == {"d": 4}
        assert two.score(p) == {"d": 5}
    finally:
        d.close()
        one.close()
        two.close()
        redis.kill()
