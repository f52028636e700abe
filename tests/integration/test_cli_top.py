"""`meshgate top` against addresses that answer, but not with metrics."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import io
import threading

import grpc
import pytest

from meshgate import top

pytestmark = pytest.mark.integration


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html><body>not metrics</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_an_address_that_answers_without_prometheus_metrics_is_a_row_not_a_traceback():
    """metrics_listen set to a gRPC port (http.client.BadStatusLine) or to
    another web server (the parser's ValueError) ended top with a traceback."""
    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    try:
        with _serving(web):
            targets = {"router": f"127.0.0.1:{grpc_port}", "cache": f"127.0.0.1:{web.server_port}"}
            out = io.StringIO()
            assert top.run(targets, once=True, interval_s=0.01, out=out) == 1
    finally:
        grpc_server.stop(None)
    screen = out.getvalue()
    for name, address in targets.items():
        assert f"{name:<10} {address:<22} DOWN   answers, but not with Prometheus metrics" in screen
