"""The test servers are the ones the tests started: a free port lost to another process between `free_port()` and
the bind is an error, not a silent switch to whatever answers there (two pytest processes start servers at once)."""

import contextlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ow_prefect.testing.servers import PortTaken, prefect_server, seed_database


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


def test_new_prefect_homes_start_from_a_copy_of_one_migrated_database(prefect_database, prefect_api, tmp_path):
    """`prefect_database` (tests/conftest.py) is made once by `prefect server database upgrade`; the session
    server started on a copy of it (`prefect_server(database_template=...)`) is at the same migration, and a
    home that has a database keeps it."""
    import sqlite3

    def revision(path):
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("select version_num from alembic_version").fetchall()

    assert len(revision(prefect_database)) == 1
    session_home = Path(os.environ["PREFECT_HOME"]).parent / "prefect-server"
    assert revision(session_home / "prefect.db") == revision(prefect_database)

    home = tmp_path / "home"
    seed_database(home, prefect_database)
    assert (home / "prefect.db").read_bytes() == prefect_database.read_bytes()
    (home / "prefect.db").write_bytes(b"its own")
    seed_database(home, prefect_database)
    assert (home / "prefect.db").read_bytes() == b"its own"
