"""A loopback reverse proxy that sleeps before forwarding each request: S3's round-trip latency,
added in front of a local S3-compatible server (moto) for the data-path benchmark.

    .venv/bin/python bench/latency_proxy.py UPSTREAM_PORT LATENCY_MS   # prints the port it listens on
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def serve(upstream_port: int, latency_s: float) -> ThreadingHTTPServer:
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def _upstream(self) -> http.client.HTTPConnection:
            if getattr(local, "connection", None) is None:  # one keep-alive connection per handler thread
                local.connection = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            return local.connection

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            time.sleep(latency_s)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            try:
                upstream = self._upstream()
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                local.connection = None
                self.close_connection = True
                return
            self.send_response_only(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # a HEAD answers with the object's length (pyarrow sizes files with it), a GET with its payload's
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


if __name__ == "__main__":
    proxy = serve(int(sys.argv[1]), float(sys.argv[2]) / 1000)
    print(proxy.server_address[1], flush=True)
    proxy.serve_forever()
