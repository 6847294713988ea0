"""A real MLflow tracking server on 127.0.0.1 for the session, and the two ways a server fails: down and silent.

The server is `mlflow server` (sqlite backend, artifacts proxied into a temporary folder, one worker); it
starts in 6-11 s, once per session, and is killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_cli() -> str:
    beside = Path(sys.executable).with_name("mlflow")
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if not found:
        raise RuntimeError("the `mlflow` command is missing: install the dev extras (pip install -e '.[dev]')")
    return found


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """The URI of a running tracking server, e.g. http://127.0.0.1:5123."""
    folder = Path(tempfile.mkdtemp(prefix="tlray-mlflow-"))
    port = free_port()
    command = [
        mlflow_cli(),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "wb")  # noqa: SIM115 — open for the server's lifetime
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start within 60 s") from None
                time.sleep(0.25)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):  # its own session: the server and its workers; a
            os.killpg(server.pid, signal.SIGKILL)  # graceful stop takes seconds, and nothing here is kept
        server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A server that is down: a URI on a port nothing listens on (connections are refused)."""
    yield f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A server that hangs: it accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


class Relay:
    """A TCP relay to a server that a test can take down, as if the server died: new connections are
    refused and open ones are cut."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.up:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def take_down(self) -> None:
        self.up = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above: close() alone would not
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


# ---------------------------------------------------------------------------------------
# What a test reads back from the server (through tlray's client: the server's own REST API)
# ---------------------------------------------------------------------------------------
def tracked_runs(uri: str, experiment: str, tags: dict[str, str] | None = None) -> list[dict]:
    """The runs of the experiment (by name) with these tags: each {"info", "data"} as MLflow gives it."""
    from tlray.io import mlflow

    experiment_id = mlflow.experiment_id(uri, experiment)
    return mlflow.find_runs(uri, experiment_id, tags or {})


def metric_steps(uri: str, run_id: str, key: str) -> dict[int, list[float]]:
    """Every value logged for `key`, by step."""
    from tlray.io import mlflow

    answer = mlflow.Client(uri).call("GET", "metrics/get-history", query={"run_id": run_id, "metric_key": key})
    steps: dict[int, list[float]] = {}
    for point in answer.get("metrics", []):
        steps.setdefault(point["step"], []).append(point["value"])
    return dict(sorted(steps.items()))


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}
