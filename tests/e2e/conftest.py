"""Fixtures of the vLLM end-to-end tests: the local model, prompts, an agent, and a runner of
engine processes (each engine is a fresh process, as a restarted pod would be)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python" / "tests"))

from ports import free_port  # noqa: E402
from s3server import WeedServer  # noqa: E402

from kvagent_process import Agent  # noqa: E402

MODEL = REPO / "target" / "e2e-model"
PREFIX_TOKENS = 192  # six 32-token blocks shared by every prompt
# Engines and servers run the model eagerly unless a test asks for vLLM's default compiled
# model (run_engine.py --compile): on two cores compiling it adds about 10 s to each engine's
# start (22 s against 13 for one run_engine.py), dozens of times a run, and the connector is
# called at the same points either way. test_a_fresh_engine_loads_the_prefix_another_engine_computed
# runs both.
EAGER = ["--enforce-eager"]


@pytest.fixture(scope="session")
def model() -> Path:
    subprocess.run([sys.executable, str(HERE / "make_model.py"), str(MODEL)], check=True)
    return MODEL


@pytest.fixture(scope="session")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(7)
    prefix = [rng.randrange(2, 900) for _ in range(PREFIX_TOKENS + 8)]
    ids = [prefix + [rng.randrange(2, 900) for _ in range(20)] for _ in range(3)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(ids))
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kvt-e2e-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def s3() -> Iterator[WeedServer]:
    server = WeedServer()
    yield server
    server.stop()


@pytest.fixture
def agent(workdir: Path) -> Iterator[Agent]:
    a = Agent(workdir / "agent.sock", ["--host-size", "256MiB"])
    yield a
    a.kill()


def log_excerpt(log: Path) -> str:
    """The lines of a server's log that name an error (a root cause that vLLM logs early, from
    another process, falls out of the tail), then its tail."""
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "Error" in line or "ERROR" in line]
    return "\n".join(errors[:30])[:4000] + "\n...\n" + text[-4000:]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Polls `url` until it answers 200, failing with the log's errors and tail if `proc` exits
    first or the deadline passes (a server's readiness, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_excerpt(log)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up:\n{log_excerpt(log)}"
        time.sleep(0.5)


class OpenAIServer:
    """A vLLM OpenAI server on CPU with the test model, optionally with kvtier's connector."""

    def __init__(
        self,
        model: Path,
        workdir: Path,
        name: str,
        kv_transfer_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.model = str(model)
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--tokenizer", str(model), "--dtype", "bfloat16",
            "--block-size", "32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
            "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor",
            "--distributed-executor-backend", "uni", "--seed", "0", "--enable-prompt-tokens-details",
            "--host", "127.0.0.1", "--port", str(self.port), *EAGER,
        ]  # fmt: skip
        if kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(workdir),
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self) -> None:
        wait_healthy(f"http://127.0.0.1:{self.port}/health", self.proc, self.log_path)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions with the model filled in."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps({"model": self.model, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            out: dict[str, Any] = json.loads(r.read())
        return out

    def greedy(
        self, ids: list[int], max_tokens: int = 8, kv_transfer_params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A greedy completion of exactly `max_tokens` tokens of `ids`, with the token ids (and
        `kv_transfer_params` passed on when given)."""
        body: dict[str, Any] = {
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        return self.complete(body)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (over its labels) at /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_engine_report(model: Path, prompts: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Runs one engine process; returns its report: per round, each prompt's output tokens and
    cached count (`rounds`), the connector's log lines (`log`) and vLLM's preemptions."""
    out = subprocess.run(
        [sys.executable, str(HERE / "run_engine.py"), str(model), str(prompts), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise AssertionError(f"engine failed ({out.returncode}):\n{out.stderr[-6000:]}")
    # Worker processes (tensor parallelism) log to stdout too: the report is its own line.
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"rounds"')]
    if len(lines) != 1:
        raise AssertionError(f"no report from the engine:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(lines[0])
    return report


def run_engine(model: Path, prompts: Path, *args: str, timeout: float = 600) -> list[list[dict[str, Any]]]:
    """Runs one engine process; returns, per round, each prompt's output tokens and cached count."""
    rounds: list[list[dict[str, Any]]] = run_engine_report(model, prompts, *args, timeout=timeout)["rounds"]
    return rounds


@pytest.fixture(scope="session")
def baseline(model: Path, prompts: Path) -> list[list[int]]:
    """Greedy outputs without any connector: what every run with kvtier must reproduce."""
    (round0,) = run_engine(model, prompts)
    return [r["tokens"] for r in round0]
