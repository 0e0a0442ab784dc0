"""The test servers are the ones the tests started: a free port lost to another process between `free_port()` and
the bind is an error, not a silent switch to whatever answers there (two pytest processes start servers at once)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ow_prefect.testing.servers import PortTaken, prefect_server


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_port_another_server_answers_on_is_not_taken_for_ours(tmp_path):
    other = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)  # answers /api/health like a Prefect server
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        taken = prefect_server(tmp_path / "prefect", port=other.server_address[1], timeout=60)
        with pytest.raises((PortTaken, RuntimeError)), taken:
            pass
    finally:
        other.shutdown()
