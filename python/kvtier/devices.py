"""Choosing a copy engine from where an engine keeps its KV cache.

The vLLM connector asks these with its tensors' device; nothing here needs torch. The copies
themselves are ``kvtier._native.CopyEngine``'s (Rust).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kvtier

logger = logging.getLogger("kvtier.devices")


def device_name(device_type: str, index: int | None, hip: bool = False) -> str:
    """kvtier's name of a torch device: ``cpu``, ``cuda:N`` or ``hip:N``.

    ROCm builds of torch call AMD GPUs ``cuda`` too; ``hip`` (``torch.version.hip`` is set) says
    which driver is behind them.
    """
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda":
        return f"{'hip' if hip else 'cuda'}:{index or 0}"
    return f"{device_type}:{index or 0}"


def open_engine(device: str) -> kvtier.CopyEngine | None:
    """The copy engine for ``device``, or None (logged with the reason) when there is none: the
    connector then leaves this worker's KV cache alone and vLLM recomputes."""
    try:
        engine = kvtier.CopyEngine(device)
    except (kvtier.DeviceUnavailable, ValueError) as e:
        logger.warning(
            "kvtier: no copy engine for %s (%s); KV offload is off here, vLLM recomputes", device, e
        )
        return None
    logger.info("kvtier: copy engine %s", engine.describe())
    return engine


def usable(device: str) -> bool:
    """Whether a copy engine for ``device`` could be opened, checked without opening one (no GPU
    memory is taken), for a scheduler deciding whether to promise loads."""
    try:
        ok, what = kvtier.check_device(device)
    except ValueError as e:
        ok, what = False, str(e)
    if not ok:
        logger.warning("kvtier: %s; KV offload is off for this engine, vLLM recomputes", what)
    return ok


def page_is_dense(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether a tensor of these sizes and strides (in elements) fills one gap-free byte range,
    in any dimension order: then a page is copied as one run of bytes, whatever KV layout
    (``NHD``, ``HND``, ...) orders its elements."""
    dims = sorted((stride, size) for size, stride in zip(sizes, strides, strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
