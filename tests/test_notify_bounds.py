"""Notifications against hostile receivers on loopback: a redirect is not followed (its target never sees the
secret), an answer dripped a byte at a time ends the try within its bound, a huge answer is not read, and a secret
variable ending in a newline is sent stripped and never logged."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mergebot import log
from mergebot.config.daemon import NotifySettings
from mergebot.daemon import notify
from tests.test_daemon import free_port, wait_for
from tests.test_notify import Receiver

SECRET = "n0tify-s3cret"
EVENT = {"event": "failed", "reason": "the gate refused it"}
HUGE = 256 * 1024 * 1024
"""What the huge receiver sends at most (it announces 3 GB)."""


@pytest.fixture
def secret(monkeypatch) -> str:
    log.configure()
    monkeypatch.setenv("NOTIFY_SECRET", SECRET + "\n")  # as an env file leaves it
    return "NOTIFY_SECRET"


def receiver(url: str, secret_env: str | None = None) -> notify._Receiver:
    return notify._Receiver(NotifySettings(url, secret_env=secret_env))


class RawReceiver:
    """A receiver on a raw socket that reads the request and then runs `answer(connection)`; `sent` counts the
    bytes it got out before the connection was closed."""

    def __init__(self, answer) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                request += chunk
            with suppress(OSError):  # the client closed the connection: what the tests expect
                self.answer(self, connection)

    def close(self) -> None:
        self.thread.join(60)
        self.listener.close()


def drip(server: RawReceiver, connection: socket.socket) -> None:
    """A status line, then a header one byte every 0.2 s, for a minute at most."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(300):
        connection.sendall(b"x")
        server.sent += 1
        time.sleep(0.2)


def huge(server: RawReceiver, connection: socket.socket) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3000000000\r\n\r\n")
    chunk = bytes(1024 * 1024)
    while server.sent < HUGE:
        connection.sendall(chunk)
        server.sent += len(chunk)


@pytest.fixture
def redirecting() -> Iterator[tuple[str, Receiver]]:
    """A receiver whose every answer redirects (to a path of its own, or another host) and the other host."""
    thief = Receiver(free_port()).start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(int(self.path.strip("/")))
            self.send_header("Location", f"http://127.0.0.1:{thief.port}/stolen")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", thief
    server.shutdown()
    server.server_close()
    thief.stop()


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_not_followed_and_its_target_never_gets_the_secret(redirecting, secret, status, capsys):
    url, thief = redirecting
    sender = receiver(f"{url}/{status}", secret)
    sender.put(EVENT)
    wait_for(lambda: sender.dropped == 1, 10, "the event to be dropped")
    sender.stop()
    assert thief.requests == []
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (down,) = [line for line in lines if line["event"] == "notification receiver down"]
    assert down["error"] == f"HTTP {status}: a redirect, not followed"
    assert SECRET not in json.dumps(lines)


def test_an_answer_dripped_a_byte_at_a_time_ends_the_try_within_its_bound(secret):
    server = RawReceiver(drip)
    sender = receiver(f"http://127.0.0.1:{server.port}/hook", secret)
    started = time.monotonic()
    failure, again = sender._post(b"{}")
    took = time.monotonic() - started
    sender.stop()
    server.close()
    assert (failure, again) == (f"no answer within {notify.SEND_TIMEOUT_S:g} s", True)
    assert took < 2 * notify.SEND_TIMEOUT_S, "the drip lasts a minute; the try is bounded in all, not per read"
    assert server.sent < 300


def test_a_huge_answer_is_not_read(secret):
    server = RawReceiver(huge)
    sender = receiver(f"http://127.0.0.1:{server.port}/hook", secret)
    assert sender._post(b"{}") == (None, False), "the status counts; the answer is left unread"
    sender.stop()
    server.close()
    assert server.sent < HUGE // 4, "the connection was closed after a few KiB of the answer"


def test_a_secret_is_sent_stripped_and_one_a_header_cannot_carry_disables_the_entry(secret, monkeypatch, capsys):
    recorder = Receiver(free_port()).start()
    try:
        sender = receiver(f"http://127.0.0.1:{recorder.port}/hook", secret)
        assert sender._post(b"{}") == (None, False)
        sender.stop()
        assert recorder.requests[0]["headers"]["X-Mergebot-Secret"] == SECRET
        monkeypatch.setenv("NOTIFY_SECRET", "n0tify\ns3cret")
        assert not receiver(f"http://127.0.0.1:{recorder.port}/hook", secret).enabled
    finally:
        recorder.stop()
    err = capsys.readouterr().err
    (disabled,) = [json.loads(line) for line in err.splitlines() if "notifications disabled" in line]
    assert disabled["variable"] == "NOTIFY_SECRET" and "cannot carry" in disabled["event"]
    assert "s3cret" not in err
