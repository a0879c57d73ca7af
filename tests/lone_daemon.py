"""The real daemon process without upstream models, for the tests of what it does at its edges (listeners, reload,
what it shows): its targets read repos that an empty mirror on loopback says do not exist, so it checks them and
never merges."""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.test_daemon import free_port, target, wait_for


class EmptyMirror:
    """A Hub mirror on loopback that holds no repo (404 with the Hub's `RepoNotFound`) and, given `credentials`
    ("user:password"), answers 401 to a request without them as HTTP basic auth."""

    def __init__(self, credentials: str | None = None) -> None:
        self.authorizations: list[str | None] = []
        expected = f"Basic {base64.b64encode(credentials.encode()).decode()}" if credentials else None
        seen = self.authorizations

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                seen.append(self.headers.get("Authorization"))
                denied = expected is not None and self.headers.get("Authorization") != expected
                body = json.dumps({"error": "Invalid credentials" if denied else "Repository not found"}).encode()
                self.send_response(401 if denied else 404)
                self.send_header("X-Error-Code", "" if denied else "RepoNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = answer

            def log_message(self, *_args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LoneDaemon:
    """The daemon process over a config in `root` (one target, `lone`, and the given [daemon] settings)."""

    def __init__(self, root: Path, endpoint: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.config = root / "mergebot.toml"
        self.log_path = root / "daemon.log"
        self.env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(root / "hf-home"), **(env or {})}
        self.process: subprocess.Popen | None = None

    def write_config(self, daemon: str = "", targets: str | None = None) -> None:
        self.config.write_text(
            f'[daemon]\nstate_dir = "state"\npoll_interval = "1h"\n{daemon}'
            + (target("lone", models=("missing",)) if targets is None else targets)
        )

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mergebot.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.root,
            )
        wait_for(lambda: self.logged("daemon started"), 60, "the daemon to start")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event]

    def memory_kib(self, field: str) -> int:
        """`VmRSS`, `VmHWM` (the peak), or `Threads` (a count) from /proc/PID/status."""
        assert self.process is not None
        lines = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        return int(next(line.split()[1] for line in lines if line.startswith(f"{field}:")))


def listeners(webhook: int, metrics: int) -> str:
    """[daemon] settings: the status page on the metrics listener, and the webhook (its secret: HOOK_SECRET)."""
    return (
        f'metrics_listen = "127.0.0.1:{metrics}"\nstatus_page = true\n'
        f'[daemon.webhook]\nlisten = "127.0.0.1:{webhook}"\nsecret_env = "HOOK_SECRET"\n'
    )


__all__ = ["EmptyMirror", "LoneDaemon", "free_port", "listeners", "wait_for"]
