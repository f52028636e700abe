"""The Prometheus endpoint (meshgate/metrics.py serve) listens on every
host:port the settings' metrics_listen accepts, on a real socket."""

from __future__ import annotations

import urllib.request

import pytest

from meshgate import metrics
from meshgate.config import check_listen

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("listen", "scraped_at"),
    [("[::1]:0", "[::1]"), ("[::]:0", "[::1]"), ("[::]:0", "127.0.0.1"), ("127.0.0.1:0", "127.0.0.1")],
)
def test_the_endpoint_listens_on_every_address_the_settings_accept(listen, scraped_at):
    """A bracketed IPv6 host passed check_listen at load, then the service's
    start failed: getaddrinfo took "[::1]" for a name (gaierror)."""
    check_listen("cache.metrics_listen", listen)
    server, port = metrics.serve(listen)
    try:
        with urllib.request.urlopen(f"http://{scraped_at}:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
            assert b"# TYPE " in answer.read()
    finally:
        server.shutdown()
        server.server_close()
