"""A real ``enfpire-server serve`` (and ``enfpire-relay``) in a subprocess on a free loopback port.

One helper for everything that needs the production server rather than the
Flask test client: the test suite's live-server fixtures, ``tools.bench.cli`` and
``tools.demo``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Child:
    """A child process whose output (stdout and stderr together) goes to a temporary file,
    not a pipe, so a chatty child under a long load run can never block on a full pipe."""

    process: subprocess.Popen[bytes]
    _output: Any

    def output(self) -> str:
        """Everything the child has printed so far."""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")

    def stop(self) -> str:
        """Terminate (kill if it lingers) and return what the child printed."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.output()


class LiveServer(_Child):
    """The server on ``index`` with extra ``serve`` flags; ready when constructed.

    Its output (stdout and stderr together) goes to a temporary file, not a
    pipe, so a chatty server under a long load run can never block on a full
    pipe; :meth:`stop` returns it. ``python`` runs the server with another
    interpreter (the device test run's venv has no Flask: it uses the main one's).
    """

    def __init__(self, index: Path, *extra: str, env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0, python: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._output = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [python or sys.executable, "-m", "lite_server.cli", "serve", "--index", str(index), "--port", str(self.port), *extra],
            stdout=self._output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()  # never leave a server behind
            raise

    def wait_ready(self, timeout: float = 120.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def memory_mb(self) -> tuple[float, float]:
        """(resident now, peak resident) of the server process, MiB."""
        import psutil

        rss = psutil.Process(self.process.pid).memory_info().rss / 2**20
        status = Path(f"/proc/{self.process.pid}/status")
        peak = next((int(line.split()[1]) / 1024 for line in status.read_text().splitlines()
                     if line.startswith("VmHWM")), rss) if status.is_file() else rss
        return round(rss, 1), round(peak, 1)



class LiveRelay(_Child):
    """``enfpire-relay`` in front of a gateway (a :class:`LiveServer` or a URL), listening on
    ``host`` and, unless told otherwise, connecting to the gateway from ``host`` too (so the
    server sees that address)."""

    def __init__(self, gateway: LiveServer | str, host: str = "127.0.0.2", *extra: str,
                 source_address: str | None = None):
        gateway = gateway.url + "/ohttp" if isinstance(gateway, LiveServer) else gateway
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}/"
        self._output = tempfile.TemporaryFile()
        source = host if source_address is None else source_address
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lite_server.ohttp.relay", "--gateway", gateway, "--host", host,
             "--port", str(self.port), *(["--source-address", source] if source else []), "-v", *extra],
            stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"relay did not start: {self.output()}") from None
                time.sleep(0.05)
