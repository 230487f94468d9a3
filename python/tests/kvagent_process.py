"""A real ``kvagent node`` process for tests (used by the package tests and the vLLM end-to-end
tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def agent_binary() -> Path:
    """The kvagent binary: ``$KVTIER_TEST_AGENT_BIN``, else the workspace's debug build."""
    explicit = os.environ.get("KVTIER_TEST_AGENT_BIN")
    path = Path(explicit) if explicit else REPO / "target" / "debug" / "kvagent"
    if not path.is_file():
        pytest.fail(f"{path} not found: build it with `cargo build -p kvagent`")
    return path


class Agent:
    """A running agent; ``kill()`` is kill -9, ``restart()`` starts it again on the same socket."""

    def __init__(self, socket_path: Path, args: list[str]) -> None:
        self.stderr = socket_path.with_suffix(".log")
        self.socket = socket_path
        self.args = args
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        proc = subprocess.Popen(
            [str(agent_binary()), "node", "--http-addr", "", "--socket", str(self.socket), *self.args],
            env=env,
            stderr=open(self.stderr, "ab"),
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail("kvagent did not start")
                time.sleep(0.01)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=20)

    def restart(self) -> None:
        self.kill()
        self.proc = self._start()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=20)
