"""The daemon's listeners against raw sockets on loopback, as a hostile client would use them: a body is never read
before the secret is checked nor beyond its limit, stalled connections hold neither threads nor memory and end at
the deadline, malformed requests are answered without a traceback, and rejects are logged as counts."""

import socket
from collections.abc import Iterator

import pytest
import requests

from mergebot.daemon.endpoints import MAX_BODY, MAX_DEPTH
from mergebot.daemon.listener import HEAD_BYTES, MAX_CONNECTIONS
from tests.lone_daemon import EmptyMirror, LoneDaemon, free_port, listeners, wait_for

SECRET = "hook-s3cret"
PAYLOAD = b'{"event": {"action": "update", "scope": "repo.content"}, "repo": {"name": "org/ft1"}}'
TEN_MB = 10 * 1024 * 1024
STALLED = 50


@pytest.fixture
def daemon(tmp_path) -> Iterator[tuple[LoneDaemon, int, int]]:
    """The daemon with its webhook (whose secret variable ends in a newline, as an env file leaves it) and its
    metrics listener, after its first check."""
    mirror = EmptyMirror()
    webhook, metrics = free_port(), free_port()
    lone = LoneDaemon(tmp_path, f"http://127.0.0.1:{mirror.port}", env={"HOOK_SECRET": SECRET + "\n"})
    lone.write_config(listeners(webhook, metrics))
    try:
        lone.start()
        wait_for(lambda: lone.logged("check failed"), 60, "the first check")
        yield lone, webhook, metrics
    finally:
        lone.kill()
        mirror.close()


def post_head(length: str | None, secret: str = SECRET) -> bytes:
    lines = ["POST / HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", f"X-Webhook-Secret: {secret}"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(connection: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (b"" for a reset one)."""
    received = b""
    for _ in range(1000):
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def status_line(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head + body)
        return answer(connection).split(b"\r\n")[0]


def rejected(lone: LoneDaemon, listener: str = "webhook") -> dict[str, int]:
    """The rejects the log tells of, summed by reason."""
    counts: dict[str, int] = {}
    for line in lone.logged(f"{listener} requests rejected"):
        counts[line["reason"]] = counts.get(line["reason"], 0) + line["count"]
    return counts


def test_a_body_is_not_read_before_the_secret_nor_beyond_its_limit(daemon):
    lone, webhook, _ = daemon
    peak = lone.memory_kib("VmHWM")
    for secret, status in (("wrong", b"401"), (SECRET, b"413")):
        with socket.create_connection(("127.0.0.1", webhook), timeout=10) as connection:
            connection.sendall(post_head(str(TEN_MB), secret))
            assert answer(connection).startswith(b"HTTP/1.0 " + status), "answered before a byte of the body"
            sent = 0
            try:  # the 10 MB attempt: the daemon has closed the connection
                for _ in range(TEN_MB // 65536):
                    connection.sendall(bytes(65536))
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert sent < TEN_MB
    assert lone.memory_kib("VmHWM") - peak < 4096, "the daemon's peak memory grew by 4 MiB or more"

    for length in ("abc", "-1", "1e3", "99999999999999999999", None):  # no body: it would be left unread
        assert status_line(webhook, post_head(length)) == b"HTTP/1.0 400 Bad Request", length
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    not_a_name = b'{"repo": {"name": {"a": 1}}}'
    for body in (deep, b"[" * 60000, not_a_name, b"\xff\xfe", b"[]"):
        assert status_line(webhook, post_head(str(len(body))), body).endswith(b"400 Bad Request")
    small_wrong = status_line(webhook, post_head(str(len(PAYLOAD)), "wrong"), PAYLOAD)
    assert small_wrong == b"HTTP/1.0 401 Unauthorized", "a small body is read and dropped, so the 401 arrives"
    assert status_line(webhook, post_head(str(MAX_BODY + 1))) == b"HTTP/1.0 413 Request Entity Too Large"
    assert status_line(webhook, post_head(str(len(PAYLOAD))), PAYLOAD) == b"HTTP/1.0 202 Accepted"
    wait_for(lambda: [e for e in lone.logged("webhook") if e.get("repo") == "org/ft1"], 10, "the webhook's line")

    assert lone.stop() == 0
    assert "Traceback" not in lone.text()
    assert rejected(lone) == {
        "bad secret": 2,
        f"body over {MAX_BODY // 1024} KiB": 2,
        "no valid Content-Length": 5,
        "not a Hub webhook payload": 5,
    }
    assert len(lone.logged("webhook requests rejected")) <= 2 * 4, "a line per reason a minute, and one at stop"
    assert SECRET not in lone.text()


def test_stalled_connections_hold_no_thread_and_end_at_the_deadline(daemon):
    lone, webhook, metrics = daemon
    threads, resident = lone.memory_kib("Threads"), lone.memory_kib("VmRSS")
    stalled = []
    try:
        for _ in range(STALLED):
            connection = socket.create_connection(("127.0.0.1", webhook), timeout=30)
            connection.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
            stalled.append(connection)
        slow = socket.create_connection(("127.0.0.1", metrics), timeout=30)
        stalled.append(slow)
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        bomb = socket.create_connection(("127.0.0.1", metrics), timeout=30)
        stalled.append(bomb)
        bomb.sendall(b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"x" * HEAD_BYTES + b"\r\n\r\n")
        assert lone.memory_kib("Threads") <= threads + 2 * MAX_CONNECTIONS, "a thread per connection"
        page = requests.get(f"http://127.0.0.1:{metrics}/status.json", timeout=10)
        assert page.status_code == 200 and "lone" in page.json()["targets"], "the metrics listener still answers"
        for connection in stalled:
            assert answer(connection) == b"", "a stalled connection is closed without an answer"
    finally:
        for connection in stalled:
            connection.close()
    assert status_line(webhook, post_head(str(len(PAYLOAD))), PAYLOAD) == b"HTTP/1.0 202 Accepted"
    assert lone.memory_kib("VmRSS") - resident < 8192
    assert lone.stop() == 0
    assert rejected(lone) == {
        f"more than {MAX_CONNECTIONS} connections at once": STALLED - MAX_CONNECTIONS,
        "not sent and answered within 5 s": MAX_CONNECTIONS,
    }
    assert rejected(lone, "metrics") == {"not sent and answered within 5 s": 1, "request too large": 1}
    assert "Traceback" not in lone.text()
