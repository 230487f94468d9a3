"""Copy engines as the connector picks them: names of torch devices, page layouts, the CPU engine
through a real agent, and a CUDA engine that cannot be had (no libcuda here, or a stand-in
libcuda that reports no device), which must be a clear refusal and leave the CPU path working."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvtier
from kvagent_process import Agent
from kvtier import devices

REPO = Path(__file__).resolve().parents[2]
NS = kvtier.namespace("test/devices", kv_dtype="float16", block_size=16, tp_world=1)


def test_torch_devices_get_kvtier_names() -> None:
    assert devices.device_name("cpu", None) == "cpu"
    assert devices.device_name("cuda", None) == "cuda:0"
    assert devices.device_name("cuda", 3) == "cuda:3"
    assert devices.device_name("cuda", 1, hip=True) == "hip:1"
    assert devices.device_name("xpu", 0) == "xpu:0"


def test_pages_in_any_dimension_order_are_one_run_of_bytes() -> None:
    # [H=8, N=16, C=128] in HND order, in NHD order (strides permuted), and with a gap.
    assert devices.page_is_dense([8, 16, 128], [2048, 128, 1])
    assert devices.page_is_dense([8, 16, 128], [128, 1024, 1])
    assert devices.page_is_dense([1, 16, 128], [999, 128, 1])
    assert not devices.page_is_dense([8, 16, 128], [4096, 128, 1])
    assert not devices.page_is_dense([8, 16, 128], [2048, 128, 2])


def test_unknown_devices_are_value_errors_and_missing_ones_are_unavailable() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        kvtier.CopyEngine("tpu:0")
    assert devices.open_engine("xpu:0") is None
    probed = {name: (ok, what) for name, ok, what in kvtier.probe_devices()}
    assert set(probed) == {"cpu", "cuda", "hip"}
    assert probed["cpu"][0]
    for name, (ok, what) in probed.items():
        assert what, f"{name} says nothing"
        if not ok:
            with pytest.raises(kvtier.DeviceUnavailable):
                kvtier.CopyEngine(f"{name}:0")
            assert not devices.usable(f"{name}:0")


def test_the_cpu_engine_round_trips_pages_layer_by_layer(agent: Agent) -> None:
    engine = kvtier.CopyEngine("cpu")
    assert engine.device == "cpu" and not engine.asynchronous
    assert "memcpy" in engine.describe()
    c = kvtier.Client(str(agent.socket))
    c.register_arena(engine)  # nothing to pin for CPU copies, but it connects
    assert c.connected
    page, blocks = 4096, 4
    layers = [(ctypes.c_ubyte * (page * blocks))() for _ in range(2)]
    for n, layer in enumerate(layers):
        for i in range(len(layer)):
            layer[i] = (i * 7 + n) % 253
    specs = [(ctypes.addressof(layer), page, page) for layer in layers]
    hashes = [i.to_bytes(32, "big") for i in range(1, 3)]
    r = c.reserve_pages(NS, hashes, 2 * page)
    r.write_pages([3, 1], specs[:1], 0, engine, 0)
    r.write_pages([3, 1], specs[1:], page, engine, 0)
    r.wait()
    assert c.commit(r) == ["stored", "stored"]
    expected = [bytes(layer[3 * page : 4 * page]) for layer in layers]
    for layer in layers:
        ctypes.memset(layer, 0, len(layer))
    leases = c.acquire(NS, hashes)
    assert leases.load_pages([0, 2], specs, 0, engine, 0, False) == [kvtier.TIER_HOST] * 2
    leases.wait()
    c.release(leases)
    assert [bytes(layer[0:page]) for layer in layers] == expected


def test_reservations_of_many_requests_are_written_in_one_call(agent: Agent) -> None:
    engine = kvtier.CopyEngine("cpu")
    c = kvtier.Client(str(agent.socket))
    page, blocks = 1024, 6
    layers = [(ctypes.c_ubyte * (page * blocks))() for _ in range(2)]
    for n, layer in enumerate(layers):
        for i in range(len(layer)):
            layer[i] = (i * 11 + n * 5) % 251
    specs = [(ctypes.addressof(layer), page, page) for layer in layers]
    other_ns = kvtier.namespace("test/devices-lora", kv_dtype="float16", block_size=16, tp_world=1)
    known = (99).to_bytes(32, "big")
    assert c.save(NS, [known], [bytes(2 * page)]) == ["stored"]
    a = c.reserve_pages(NS, [(10).to_bytes(32, "big"), known], 2 * page)
    b = c.reserve_pages(other_ns, [(11).to_bytes(32, "big")], 2 * page)
    assert a.outcomes() == ["stored", "exists"] and b.reserved() == 1
    # Layer by layer, both requests per call; a block without a slot is skipped.
    kvtier.write_pages_many([a, b], [[4, 0], [2]], specs[:1], 0, engine, 0)
    kvtier.write_pages_many([a, b], [[4, 0], [2]], specs[1:], page, engine, 0)

    with pytest.raises(ValueError, match="named twice"):
        kvtier.write_pages_many([a, a], [[4, 0], [4, 0]], specs, 0, engine, 0)
    with pytest.raises(ValueError, match="one list of block ids per reservation"):
        kvtier.write_pages_many([a, b], [[4, 0]], specs, 0, engine, 0)
    with pytest.raises(ValueError, match="one block id per requested block"):
        kvtier.write_pages_many([a, b], [[4, 0], [2, 3]], specs, 0, engine, 0)
    with pytest.raises(ValueError, match="pages up to byte"):
        kvtier.write_pages_many([a, b], [[4, 0], [2]], specs, page, engine, 0)
    other = kvtier.Client(str(agent.socket))
    elsewhere = other.reserve_pages(NS, [(12).to_bytes(32, "big")], 2 * page)
    with pytest.raises(ValueError, match="two connections"):
        kvtier.write_pages_many([a, elsewhere], [[4, 0], [1]], specs, 0, engine, 0)
    other.abort(elsewhere)

    assert c.commit(a) == ["stored", "exists"]
    assert c.commit(b) == ["stored"]
    with pytest.raises(ValueError, match="committed or aborted"):
        kvtier.write_pages_many([a], [[4, 0]], specs, 0, engine, 0)

    def block(i: int) -> bytes:
        return b"".join(bytes(layer[i * page : (i + 1) * page]) for layer in layers)

    assert c.load(NS, [(10).to_bytes(32, "big")]) == [block(4)]
    assert c.load(other_ns, [(11).to_bytes(32, "big")]) == [block(2)]
    assert c.load(NS, [known]) == [bytes(2 * page)], "a block the agent had was overwritten"


CHILD = """
import logging, sys
import kvtier
from kvtier import devices
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
try:
    kvtier.CopyEngine("cuda:0")
    print("OPENED")
except kvtier.DeviceUnavailable as e:
    print("REFUSED", e)
print("ENGINE", devices.open_engine("cuda:0"))
print("USABLE", devices.usable("cuda:0"))
print("CPU", kvtier.CopyEngine("cpu").describe())
"""


def run_child(lib_dir: Path) -> str:
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_libcuda_the_cuda_engine_is_refused_with_the_reason(tmp_path: Path) -> None:
    out = run_child(tmp_path)
    if "REFUSED" not in out:
        pytest.skip(f"this machine has a CUDA driver in its default library path: {out}")
    assert "REFUSED cuda unavailable: libcuda.so.1 not found" in out
    assert "ENGINE None" in out and "USABLE False" in out
    assert "KV offload is off" in out
    assert "CPU cpu: memcpy" in out


def test_a_libcuda_reporting_no_device_is_refused_and_the_cpu_path_works(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    assert cc is not None, "a C compiler is needed to build the stand-in libcuda"
    lib = tmp_path / "libcuda.so.1"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(lib), str(REPO / "tests/stubs/libcuda_stub.c")], check=True
    )
    shutil.copy(lib, tmp_path / "libcuda.so")
    out = run_child(tmp_path)
    assert "REFUSED cuda unavailable: cuInit: CUDA_ERROR_NO_DEVICE" in out, out
    assert "no copy engine for cuda:0 (cuda unavailable: cuInit: CUDA_ERROR_NO_DEVICE)" in out, out
    assert "ENGINE None" in out and "USABLE False" in out
    assert "CPU cpu: memcpy" in out
