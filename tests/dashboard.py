"""A fake Ray dashboard (just enough of the Jobs API) on 127.0.0.1, for tests.

Register with ``pytest_plugins = ["tests.dashboard"]`` in ``conftest.py``; the
``dashboard`` fixture serves it and points ``RAY_API_SERVER_ADDRESS`` at it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def _job(sid, status="RUNNING", message=None):
    return {"type": "SUBMISSION", "job_id": None, "submission_id": sid, "driver_info": None,
            "status": status, "entrypoint": "python -m pipeline.cli run mlp", "message": message,
            "error_type": None, "start_time": 1_700_000_000_000, "end_time": None,
            "metadata": {}, "runtime_env": {}, "driver_agent_http_address": None,
            "driver_node_id": None}


FAILED_LOG = "running...\nerror: parameter 'n': expected int, got 'abc'\n"


class _Dashboard(BaseHTTPRequestHandler):
    """Just enough of the Ray Jobs API: version, one job's info and logs, the list."""

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.rstrip("/")
        if path == "/api/version":
            body = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}
        elif path == "/api/jobs":
            body = [_job("ok"), _job("bad", "FAILED", "Job entrypoint command failed with "
                                     "exit code 2, last available logs:\n" + FAILED_LOG)]
        elif path.endswith("/logs"):
            body = {"logs": FAILED_LOG if "/bad/" in path else "hello\n"}
        else:
            sid = path.rsplit("/", 1)[1]
            body = _job(sid, "FAILED", "Job entrypoint command failed with exit code 2"
                        ) if sid == "bad" else _job(sid)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        del args


@pytest.fixture()
def dashboard(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", url)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield url
    server.shutdown()
