"""Fixtures: a real ``kvagent node`` on a private socket for each test that asks for one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvagent_process import Agent


@pytest.fixture
def agent() -> Iterator[Agent]:
    """An agent with a 64 MiB arena and no disk tier."""
    tmp = Path(tempfile.mkdtemp(prefix="kvt-py-"))
    a = Agent(tmp / "agent.sock", ["--host-size", "64MiB"])
    try:
        yield a
    finally:
        a.kill()
        shutil.rmtree(tmp, ignore_errors=True)
