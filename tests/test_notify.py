"""Notifications: `[[notify]]` config checks, and events delivered to a real HTTP receiver, from the real daemon
(failed, published, recovered, held, with the receiver down at first) and from the daemon's decisions in-process
(giving up, a receiver down for several events)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from mergebot import log
from mergebot.config.daemon import NOTIFY_EVENTS, NotifySettings, check_daemon_config
from mergebot.daemon import notify
from mergebot.daemon.scheduler import Daemon
from mergebot.errors import ExitCode
from mergebot.runrecord import from_json
from tests import test_daemon
from tests.test_daemon import Setup, free_port, target, wait_for
from tests.test_hold import BROKEN_SCALE, good_ft1, push, variant

setup = test_daemon.setup
"""The fixture of the daemon tests: upstream models on the local Hub, a config file and the daemon process."""

SECRET = "n0tify-s3cret"


class Receiver:
    """A real HTTP server on loopback that records every POST (path, headers, JSON body) and answers 204."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[dict] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(data)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def bodies(self, path: str) -> list[dict]:
        return [request["body"] for request in self.requests if request["path"] == path]


def notify_table(port: int, path: str, extra: str = "") -> str:
    return f'\n[[notify]]\nurl = "http://127.0.0.1:{port}{path}"\n{extra}'


# --- the config ---------------------------------------------------------------------------------------------------

HEAD = (
    '[daemon]\nstate_dir = "s"\n[daemon.webhook]\nlisten = "127.0.0.1:1"\nsecret_env = "HOOK"\n'
    '[[notify]]\nurl = "https://hooks.example.org/a"\n[[notify]]\n'
)
"""Two entries below a webhook table with a `secret_env` of its own; the second entry's keys follow, from line 9."""
URL = 'url = "https://hooks.example.org/b"\n'
BAD_ENTRIES = {
    "unknown key": (URL + 'secret = "x"\n', 10, "notify[1].secret", "unknown key (known: events, format, "),
    "format": (URL + 'format = "teams"\n', 10, "notify[1].format", "'teams' is not one of json, slack, discord"),
    "events": (URL + 'events = ["held", "merged"]\n', 10, "notify[1].events", "must be a list of some of published"),
    "header alone": (URL + 'secret_header = "Authorization"\n', 10, "notify[1].secret_header", "needs secret_env"),
    "env name": (URL + 'secret_env = "MY SECRET"\n', 10, "notify[1].secret_env", "must be a name"),
    "url": ('url = "ftp://x"\n', 9, "notify[1].url", "required: the http(s) URL"),
    "credentials": ('url = "https://u:p@hooks.example.org/b"\n', 9, "notify[1].url", "must not hold user:password@"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_a_bad_notify_entry_is_one_line_with_its_key_and_line(tmp_path, case):
    text, line, key, message = BAD_ENTRIES[case]
    path = tmp_path / "mergebot.toml"
    path.write_text(HEAD + text)
    _, problems = check_daemon_config(path)
    assert len(problems) == 1
    assert str(problems[0]).startswith(f"{path}:{line}: {key}: {message}"), problems[0]


def test_notify_entries_and_their_defaults(tmp_path):
    path = tmp_path / "mergebot.toml"
    path.write_text(HEAD + URL + 'format = "slack"\nevents = ["failed", "held"]\nsecret_env = "MB_SECRET"\n')
    config, problems = check_daemon_config(path)
    assert problems == []
    assert config.notify == (
        NotifySettings("https://hooks.example.org/a"),
        NotifySettings("https://hooks.example.org/b", "slack", ("held", "failed"), "MB_SECRET"),
    )
    assert config.notify[0].events == NOTIFY_EVENTS and config.notify[0].secret_header == "X-Mergebot-Secret"


# --- the daemon's decisions, in-process, with a real receiver ------------------------------------------------------

DIGESTS = {"org/base": "d-base", "org/ft1": "d-ft1"}
PUBLISHED = {
    "version": 2,
    "outcome": "published",
    "computed": ["model-00001-of-00002.safetensors"],
    "figures": {"merge_ppl": 9.5, "stop_rate": 1.0, "parent_stop_rate": {"org/a": 0.8333}},
}


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A daemon (not started) whose one target has one retry, telling a receiver on a port nothing listens on yet."""
    port = free_port()
    config = tmp_path / "mergebot.toml"
    config.write_text(
        '[daemon]\nstate_dir = "state"\nmax_retries = 1\nretry_delay = "1h"\n'
        + target("t")
        + notify_table(port, "/hook", 'secret_env = "MERGEBOT_NOTIFY_SECRET"\n')
    )
    log.configure()
    monkeypatch.setenv("MERGEBOT_NOTIFY_SECRET", SECRET)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.org")
    created = Daemon(config)
    created.receiver = Receiver(port)
    yield created
    created.notifier.close()
    created.receiver.stop()
    created.state.close()
    created.lock.close()


def record(daemon: Daemon, code: ExitCode, result: dict) -> int:
    """A run of "t" whose child exited with `code` and wrote `result`, recorded as the daemon does."""
    t = daemon.config.targets["t"]
    run_id = daemon.state.start_run("t", t.config_hash, {"org/base": "b1", "org/ft1": f"f{time.monotonic_ns()}"})
    daemon._record(t, run_id, code, from_json(json.dumps(result | {"digests": DIGESTS})))
    return run_id


def logged(lines: str, event: str) -> list[dict]:
    return [e for e in map(json.loads, filter(None, lines.splitlines())) if e.get("event") == event]


def test_giving_up_notifies_failed_and_the_next_publish_recovered(daemon):
    daemon.receiver.start()
    record(daemon, ExitCode.RETRY_LATER, {"reason": "Hub 503"})  # retried: nobody is told
    gave_up = record(daemon, ExitCode.RETRY_LATER, {"reason": "Hub 503"})
    first = record(daemon, ExitCode.OK, PUBLISHED | {"published_sha": "a" * 40})
    record(daemon, ExitCode.RETRY_LATER, {"reason": "Hub 502"})  # a hiccup, retried
    second = record(daemon, ExitCode.OK, PUBLISHED | {"published_sha": "b" * 40})
    for _ in range(2):  # the inputs cannot be checked: no run, and the daemon gives up at the second time
        daemon._retry_later(daemon.config.targets["t"], "cannot check inputs: Hub down")
    bodies = wait_for(lambda: len(daemon.receiver.bodies("/hook")) == 5 and daemon.receiver.bodies("/hook"), 10)
    assert [(b["event"], b["run"]) for b in bodies] == [
        ("failed", gave_up),
        ("published", first),
        ("recovered", first),
        ("published", second),
        ("failed", None),
    ], "no event for a retried failure, and no recovery from one"
    failed, published, recovered, _, unchecked = bodies
    assert unchecked["reason"] == "gave up after 1 retries: cannot check inputs: Hub down"
    assert (unchecked["revision"], unchecked["inputs"]) == ("b" * 40, {})
    assert failed["reason"] == "gave up after 1 retries: Hub 503"
    assert (failed["revision"], failed["url"], failed["outcome"]) == (None, None, "failed")
    assert published["revision"] == "a" * 40 and published["url"] == f"http://hub.example.org/me/t/tree/{'a' * 40}"
    assert published["shards"] == {"recomputed": PUBLISHED["computed"], "reused": []}
    assert published["validation"] == {
        "merge_ppl": 9.5,
        "parent_ppl": {},
        "kl": {},
        "stop_rate": 1.0,
        "eot_prob": None,  # not recorded: null, the payload keeps its shape
        "parent_stop_rate": {"org/a": 0.8333},
    }
    assert published["version"] == notify.PAYLOAD_VERSION and published["reason"] is None
    assert recovered["recovered_from"] == {"run": gave_up, "outcome": "failed", "reason": "Hub 503"}
    assert {r["headers"]["X-Mergebot-Secret"] for r in daemon.receiver.requests} == {SECRET}


def test_giving_up_on_an_internal_error_notifies_failed(daemon):
    daemon.receiver.start()
    crash = {"reason": "internal error: KeyError: 'x'"}
    first = record(daemon, ExitCode.INTERNAL_ERROR, crash)  # retried: nobody is told
    gave_up = record(daemon, ExitCode.INTERNAL_ERROR, crash)
    assert daemon.state.last_run("t").record.gave_up and first < gave_up
    (body,) = wait_for(lambda: daemon.receiver.bodies("/hook"), 10)
    assert (body["event"], body["run"], body["outcome"]) == ("failed", gave_up, "internal_error")
    assert body["reason"] == "gave up after 1 retries: internal error: KeyError: 'x'"


def test_a_receiver_down_for_several_events_is_logged_once(daemon, capsys, monkeypatch):
    monkeypatch.setattr(notify, "FIRST_RETRY_S", 0.02)
    record(daemon, ExitCode.OK, PUBLISHED | {"published_sha": "a" * 40})
    for _ in range(3):
        record(daemon, ExitCode.HELD, {"reason": "org/ft1@f1: worse", "culprit": "org/ft1"})
    (receiver,) = daemon.notifier._receivers.values()
    wait_for(lambda: receiver.dropped == 4, 30, "every try of the four events to fail")
    daemon.receiver.start()
    record(daemon, ExitCode.HELD, {"reason": "org/ft1@f2: worse", "culprit": "org/ft1"})
    (held,) = wait_for(lambda: daemon.receiver.bodies("/hook"), 10, "the event after the receiver is back")
    assert (held["event"], held["revision"], held["culprit"]) == ("held", "a" * 40, "org/ft1")
    lines = capsys.readouterr().err
    (down,) = logged(lines, "notification receiver down")
    assert down["receiver"] == "json receiver at 127.0.0.1" and "ConnectionRefusedError" in down["error"]
    (back,) = logged(lines, "notification receiver back")
    assert back["dropped"] == 4
    assert SECRET not in lines and "/hook" not in lines

    daemon.receiver.stop()  # down again as the daemon stops: one try, then one line
    record(daemon, ExitCode.HELD, {"reason": "org/ft1@f3: worse", "culprit": "org/ft1"})
    started = time.monotonic()
    daemon.notifier.close()
    assert time.monotonic() - started < notify.FLUSH_S
    lines = capsys.readouterr().err
    assert len(logged(lines, "notification receiver down")) == 1
    (lost,) = logged(lines, "notifications not delivered")
    assert (lost["dropped"], lost["queued"]) == (1, 0)


# --- the whole loop: the real daemon, its merge children, the local Hub and a receiver that starts down ------------


def served_upstream(setup: Setup) -> int:
    served = setup.devhub.stats()["bytes_served"]
    return sum(sum(files.values()) for repo, files in served.items() if repo.startswith("org/"))


def test_the_daemon_tells_its_receivers_what_happened(setup):
    port, metrics = free_port(), free_port()
    receiver = Receiver(port)  # not started yet: the receiver is down
    setup.env["MERGEBOT_NOTIFY_SECRET"] = SECRET
    broken = variant(setup, "ft1", "broken", lambda name, t: t * BROKEN_SCALE if name == "lm_head.weight" else t)
    broken_sha = push(setup, "org/ft1", broken, "a broken upload")
    receivers = (
        notify_table(port, "/json", 'secret_env = "MERGEBOT_NOTIFY_SECRET"\n')
        + notify_table(port, "/slack", 'format = "slack"\nevents = ["held"]\n')
        + notify_table(port, "/discord", 'format = "discord"\nevents = ["published"]\n')
    )
    setup.write_config(target("told") + receivers, daemon=f'metrics_listen = "127.0.0.1:{metrics}"\n')
    setup.start()
    try:
        wait_for(lambda: logged_events(setup, "notification receiver down"), what="the first try to fail")
        assert setup.status()["targets"]["told"]["last_run"]["outcome"] == "failed", "the run was not held up"
        assert receiver.requests == []
        receiver.start()
        (failed,) = wait_for(lambda: receiver.bodies("/json"), 30, "the event, retried once the receiver is back")
        assert (failed["event"], failed["culprit"], failed["revision"]) == ("failed", "org/ft1", None)
        assert failed["inputs"]["org/ft1"] == broken_sha and "validation" in failed["reason"]

        fixed = good_ft1(setup)
        head = wait_for(lambda: setup.head("me/told"), what="the publish of the fix")
        _, published, recovered = wait_for(lambda: len(receiver.bodies("/json")) == 3 and receiver.bodies("/json"))
        status = setup.status()["targets"]["told"]
        assert (published["event"], published["revision"]) == ("published", head)
        assert published["url"] == f"{setup.devhub.url}/me/told/tree/{head}"
        assert published["inputs"] == status["last_run"]["inputs"] and published["inputs"]["org/ft1"] == fixed
        shards = published["shards"]
        assert shards["recomputed"] and len(shards["recomputed"]) + len(shards["reused"]) == status["shards"]
        assert set(published["validation"]["parent_ppl"]) == {"org/base", "org/ft1"}
        assert published["validation"]["merge_ppl"] > 0 and set(published["validation"]["kl"]) <= {
            "org/base",
            "org/ft1",
        }
        assert (recovered["event"], recovered["recovered_from"]["outcome"]) == ("recovered", "failed")
        (discord,) = receiver.bodies("/discord")
        assert (
            set(discord) == {"content", "allowed_mentions"}
            and f"[{head[:12]}](<{published['url']}>)" in discord["content"]
        )

        push(setup, "org/ft1", broken, "the broken upload again")
        held = wait_for(lambda: len(receiver.bodies("/json")) == 4 and receiver.bodies("/json")[3], what="held")
        assert (held["event"], held["revision"], held["culprit"]) == ("held", head, "org/ft1")
        assert "since the last publish" in held["reason"]
        (slack,) = wait_for(lambda: receiver.bodies("/slack"), what="the slack message")
        assert set(slack) == {"text"} and "me/told" in slack["text"] and f"|{head[:12]}>" in slack["text"]
        secrets = {r["path"]: r["headers"].get("X-Mergebot-Secret") for r in receiver.requests}
        assert secrets == {"/json": SECRET, "/slack": None, "/discord": None}

        scraped = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        received = sum(setup.devhub.stats()["bytes_received"]["me/told"].values())
        assert f'mergebot_downloaded_bytes_total{{target="told"}} {served_upstream(setup)}' in scraped
        assert f'mergebot_uploaded_bytes_total{{target="told"}} {received}' in scraped
        assert 'mergebot_holds_total{target="told"} 1' in scraped
        since = next(line for line in scraped.splitlines() if line.startswith("mergebot_seconds_since_last_publish"))
        assert 0 <= float(since.split()[-1]) < 300
        assert len(logged_events(setup, "notification receiver down")) == 1
        assert len(logged_events(setup, "notification receiver back")) == 1
        assert setup.stop() == 0
    finally:
        receiver.stop()


def logged_events(setup: Setup, event: str) -> list[dict]:
    return [e for e in setup.events() if e.get("event") == event]
