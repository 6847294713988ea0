"""S3 on loopback for tests: a moto server, env isolation, buckets, upload helpers, and a
reverse proxy that throttles a share of requests with 503 SlowDown.

Everything listens on and talks to 127.0.0.1 only: the env fixture sets dummy credentials,
a dummy region and AWS_EC2_METADATA_DISABLED so botocore and pyarrow never look for
credentials or regions anywhere else.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

__all__ = [
    "FlakyProxy",
    "isolate_aws",
    "flaky_s3",
    "free_port",
    "put_many",
    "raw_client",
    "s3_bucket",
    "s3_env",
    "s3_server",
    "upload_tree",
]

AWS_ENV_REMOVED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)


def free_port() -> int:
    """A port nothing listens on right now (also what the 'unreachable endpoint' test uses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Endpoints of moto servers running in this process: put_many writes to their backend directly.
_IN_PROCESS_MOTO: set[str] = set()


@pytest.fixture(scope="session")
def s3_server():
    """One in-process moto S3 server for the whole session; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO, which pytest would capture and print on failures.
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: no race
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _IN_PROCESS_MOTO.add(endpoint)
    yield endpoint
    _IN_PROCESS_MOTO.discard(endpoint)
    server.stop()
    werkzeug_log.setLevel(level)


def isolate_aws(patch: pytest.MonkeyPatch, empty_file: Path) -> None:
    """Dummy credentials and region, no instance-metadata probing, no user AWS config."""
    for name in AWS_ENV_REMOVED:
        patch.delenv(name, raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        # ~/.aws could name endpoints, SSO or credential processes: keep it out.
        "AWS_SHARED_CREDENTIALS_FILE": str(empty_file),
        "AWS_CONFIG_FILE": str(empty_file),
    }.items():
        patch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path_factory):
    """The moto server's endpoint, with the environment isolated (isolate_aws) for one test."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    isolate_aws(monkeypatch, empty)
    from tlray.io import s3

    s3.clear_client_cache()  # cached clients keep the credentials they were created with
    yield s3_server
    s3.clear_client_cache()


def raw_client(endpoint: str, max_attempts: int = 10):
    """A plain boto3 client for test setup (not tlray's cached one)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        s3={"addressing_style": "path"},
        max_pool_connections=16,
    )
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint, config=config)


@pytest.fixture
def s3_bucket(s3_env):
    name = f"tlray-test-{uuid.uuid4().hex[:12]}"
    raw_client(s3_env).create_bucket(Bucket=name)
    yield name


def _put_all(endpoint: str, bucket: str, items) -> None:
    s3 = raw_client(endpoint)
    with ThreadPoolExecutor(8) as pool:
        for _ in pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items):
            pass  # iterating re-raises the first failure


def upload_tree(endpoint: str, bucket: str, prefix: str, local_root: str | Path) -> list[str]:
    """Upload every file under local_root as prefix + relative path; returns the keys."""
    root = Path(local_root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    items = [(prefix + p.relative_to(root).as_posix(), p.read_bytes()) for p in files]
    _put_all(endpoint, bucket, items)
    return [k for k, _ in items]


def put_many(endpoint: str, bucket: str, prefix: str, n: int) -> list[str]:
    """n tiny objects prefix + 'f00000.bin' ... (contents differ, so ETags differ).

    Through HTTP, moto takes about 2.5 ms of this process's CPU per PUT (5 s per 2,000
    objects on 2 cores, threads do not help under the GIL); for a moto server running in this
    process the objects go straight into its backend instead, 10,000 in well under a second.
    """
    items = [(f"{prefix}f{i:05d}.bin", str(i).encode()) for i in range(n)]
    if endpoint in _IN_PROCESS_MOTO:
        from moto.s3.models import s3_backends

        partition, account = s3_backends.bucket_accounts[bucket]  # bucket created over HTTP
        backend = s3_backends[account][partition]
        for key, body in items:
            backend.put_object(bucket, key, body)
    else:
        _put_all(endpoint, bucket, items)
    return [k for k, _ in items]


# ---------------------------------------------------------------------------------------
# A throttling reverse proxy
# ---------------------------------------------------------------------------------------
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
INTERNAL_ERROR = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
ACCESS_DENIED = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


class FlakyProxy:
    """HTTP/1.1 reverse proxy on 127.0.0.1 in front of `upstream` that answers about
    `fail_ratio` of the requests itself with `fail_status` and `fail_body` (default: S3's
    503 SlowDown) and forwards the others verbatim. The decisions come from a seeded
    random.Random, so a single-threaded client sees the same sequence every run.

    Use as a context manager; `requests` and `failures` count what happened, and `log` holds
    every request as (method, path). Two scripted faults:
    - `broken_paths`: requests whose path ends with one of these always get HTTP 500;
    - `outage_after(n, unavailable_s, refused_s, scope)`: after n forwarded GETs, every request gets 503
      SlowDown for `unavailable_s` seconds, then the proxy stops listening and drops open
      connections for `refused_s` seconds (connections refused), then it serves again.
    With fail_ratio=1.0, status 403 and ACCESS_DENIED it is a stub store that denies everything.
    """

    def __init__(
        self,
        upstream: str,
        fail_ratio: float = 0.1,
        seed: int = 0,
        fail_status: int = 503,
        fail_body: bytes = SLOW_DOWN,
        broken_paths: tuple[str, ...] = (),
    ):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.fail_ratio, self.fail_status, self.fail_body = fail_ratio, fail_status, fail_body
        self.broken_paths = broken_paths
        self.requests = self.failures = 0
        self.log: list[tuple[str, str]] = []
        self.outage_started = self.outage_ended = None  # time.monotonic() stamps
        self._outage: tuple[int, float, float] | None = None
        self._outage_scope = "/"
        self._gets_forwarded = 0
        self._refusing = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = self._listen(0)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        server.daemon_threads = True
        return server

    def __str__(self) -> str:
        return self.endpoint

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def outage_after(self, gets: int, unavailable_s: float, refused_s: float, scope: str = "/") -> None:
        """Counts only GETs whose path contains `scope` (e.g. "/images/": reads, not listings)."""
        self._outage, self._outage_scope = (gets, unavailable_s, refused_s), scope

    def _run_outage(self, unavailable_s: float, refused_s: float) -> None:
        self.outage_started = time.monotonic()
        time.sleep(unavailable_s)
        with self._lock:
            self._refusing = True
        self._server.shutdown()
        self._server.server_close()  # new connections are refused from here on
        time.sleep(refused_s)
        self._server = self._listen(self.port)
        with self._lock:
            self._refusing = False
            self.outage_ended = time.monotonic()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _decide(self, method: str, path: str) -> str:
        """ "forward", "fail" (with fail_status), "broken" (HTTP 500), "slowdown" (503) or "drop"."""
        with self._lock:
            self.requests += 1
            self.log.append((method, path))
            if self._refusing:
                return "drop"
            if self.outage_started is not None and self.outage_ended is None:
                return "slowdown"
            if any(path.split("?")[0].endswith(p) for p in self.broken_paths):
                return "broken"
            if self._rng.random() < self.fail_ratio:
                self.failures += 1
                return "fail"
            if method == "GET" and self._outage is not None and self._outage_scope in path.split("?")[0]:
                self._gets_forwarded += 1
                if self._gets_forwarded == self._outage[0]:
                    self.outage_started = time.monotonic()  # from this request on, until it ends
                    threading.Thread(target=self._run_outage, args=self._outage[1:], daemon=True).start()
            return "forward"

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 and pyarrow (curl) expect
            # Headers and body go out as separate small writes: without TCP_NODELAY, Nagle plus
            # the client's delayed ACK stalls every response about 40 ms.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _read_body(self) -> bytes:
                # Always consume the whole request body, even when failing it: an unread body
                # would be parsed as the next request on this keep-alive connection.
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # HTTP trailers; aws-chunked trailers live inside the body
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()  # CRLF after each chunk
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._read_body()
                decision = proxy._decide(self.command, self.path)
                if decision == "drop":
                    self.close_connection = True  # no response at all: the client sees a dropped connection
                elif decision == "fail":
                    self._answer(proxy.fail_status, proxy.fail_body)
                elif decision == "slowdown":
                    self._answer(503, SLOW_DOWN)
                elif decision == "broken":
                    self._answer(500, INTERNAL_ERROR)
                else:
                    self._forward(body)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    # Headers go through as sent, Host included: it is part of the signature.
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            upstream.putheader(name, value)
                    if body or self.command in ("PUT", "POST"):
                        upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body or None)
                    response = upstream.getresponse()
                    self.send_response_only(response.status, response.reason)
                    headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                    length = response.getheader("Content-Length")
                    payload = None
                    if length is None and self.command != "HEAD":
                        payload = response.read()  # upstream streamed it chunked: re-frame it
                        headers.append(("Content-Length", str(len(payload))))
                    for k, v in headers:
                        self.send_header(k, v)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if payload is not None:
                        self.wfile.write(payload)
                    else:
                        while chunk := response.read(64 * 1024):
                            self.wfile.write(chunk)
                except OSError:
                    self.close_connection = True  # the client sees a dropped connection: retryable
                finally:
                    upstream.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler


@pytest.fixture
def flaky_s3(s3_env):
    """A FlakyProxy (10% 503 SlowDown) in front of the moto server; str() is its endpoint."""
    with FlakyProxy(s3_env, fail_ratio=0.1, seed=1234) as proxy:
        yield proxy
