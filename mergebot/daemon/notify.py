"""Telling people what the daemon did: each `[[notify]]` receiver gets an event when a target publishes, is held,
fails for good or recovers, as mergebot's JSON payload or as a Slack or Discord message.

Events are read from the state after a run's outcome is written there. Each receiver has its own thread and a
bounded queue, so a slow or dead receiver never holds up a run, the scheduler or another receiver; an event is
retried with backoff, then dropped. A receiver that fails is logged when it starts failing and when it is back,
never once per event: an outage of an hour is two lines.
"""

import http.client
import json
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from mergebot import log
from mergebot.config.daemon import DaemonConfig, NotifySettings, Target
from mergebot.daemon.page import hub_url
from mergebot.daemon.runs import RUNNING, Run
from mergebot.daemon.state import State
from mergebot.daemon.status import gguf_line, gguf_results
from mergebot.files import short_identity
from mergebot.log import redact, redact_value
from mergebot.runrecord import SUCCESSFUL, Outcome, RunRecord

PAYLOAD_VERSION = 1
"""Of the json format; it grows only by new fields, and goes up when a field changes meaning or goes."""
ATTEMPTS = 5
FIRST_RETRY_S = 1.0
"""Then 2, 4 and 8 s: an event waits out about 15 s of a receiver restarting."""
SEND_TIMEOUT_S = 5.0
"""For the whole of one try: connecting, sending and the answer, however slowly a receiver drips it."""
ANSWER_BYTES = 4096
"""What is read of a receiver's answer before the connection is closed: its status is what counts."""
QUEUE_SIZE = 100
"""Events waiting per receiver; more are dropped (and counted) while it is down."""
FLUSH_S = 5.0
"""How long a stopping daemon gives its receivers for what is queued: one try each, no retry."""
RETRY_STATUS = {408, 429}
"""Besides 5xx: the answers worth trying again. Any other 4xx, or a redirect (never followed: it would carry the
secret wherever it points), drops the event at once."""
HEADER_VALUE = re.compile(r"[!-~]([ -~]*[!-~])?")
"""What a secret may hold: printable ASCII, inner spaces (`Bearer TOKEN`); the variable's value is stripped first."""
LOOKBACK = 100
"""Runs looked back over to find the one a recovery follows (transient failures in between are skipped)."""
DISCORD_LIMIT = 2000

_log = log.get("notify")
UNSUCCESSFUL = (Outcome.FAILED, Outcome.INTERNAL_ERROR)


class Notifier:
    """The receivers of one daemon; `after_run` never blocks on them and never raises."""

    def __init__(self) -> None:
        self._receivers: dict[NotifySettings, _Receiver] = {}
        self._lock = threading.Lock()
        self._closed = False

    def after_run(
        self, config: DaemonConfig, target: Target, state: State, run_id: int | None, gave_up: str | None = None
    ) -> None:
        """Queue the events of the run just recorded (or of giving up, `gave_up` saying why, before any run) for
        each receiver that wants them. The receivers are the running config's, so a reload applies to the next
        event."""
        if not config.notify or self._closed:
            return
        try:
            events = run_events(target, state, hub_url(config), run_id, gave_up)
            for settings in config.notify:
                for event in events:
                    if event["event"] in settings.events:
                        self._receiver(settings).put(event)
        except Exception:  # a notification must never fail the run it tells of, nor the scheduler
            _log.exception("notification not sent", target=target.name, run=run_id)

    def _receiver(self, settings: NotifySettings) -> "_Receiver":
        with self._lock:
            if settings not in self._receivers:
                self._receivers[settings] = _Receiver(settings)
            return self._receivers[settings]

    def close(self) -> None:
        """Give what is still queued up to FLUSH_S in all (one try per event), then leave it."""
        deadline = time.monotonic() + FLUSH_S
        with self._lock:
            self._closed = True
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            receiver.stop()
        for receiver in receivers:
            receiver.join(deadline)


def run_events(target: Target, state: State, hub: str, run_id: int | None, gave_up: str | None) -> list[dict]:
    """The json payloads of what the run's recorded outcome means: `published` (a new revision), `held`, `failed`
    (refused by the gate or the config, or retried until the daemon gave up), and `recovered`: a run that
    published or found nothing to change, when the last run before it that ended for good (transient failures
    retried since and interrupted runs skipped) was held or failed."""
    success = state.last_successful_run(target.name)
    revision = (success.published_sha or None) if success else None
    runs = state.runs(target.name, limit=LOOKBACK)
    run = next((run for run in runs if run.id == run_id), None)
    if run is None:
        return [_payload("failed", target, None, revision, hub) | {"reason": gave_up}] if gave_up else []
    names = []
    if run.outcome == Outcome.PUBLISHED:
        names.append("published")
    elif run.outcome == Outcome.HELD:
        names.append("held")
    elif run.outcome in UNSUCCESSFUL and _ended_for_good(run):
        names.append("failed")  # an internal error too, once the daemon gave up on it
    before = next((r for r in runs if r.id < run.id and _ended_for_good(r)), None)
    recovering = before is not None and before.outcome in (*UNSUCCESSFUL, Outcome.HELD)
    if run.outcome in SUCCESSFUL and recovering:
        names.append("recovered")
    events = [_payload(name, target, run, revision, hub) for name in names]
    for event in events:
        if event["event"] == "failed" and gave_up:
            event["reason"] = gave_up
        if event["event"] == "recovered" and before is not None:
            event["recovered_from"] = {"run": before.id, "outcome": before.outcome, "reason": before.reason}
    return events


def _ended_for_good(run: Run) -> bool:
    """Not a failure the daemon retries: transient ones count only once the daemon gave up on them."""
    if run.outcome in (Outcome.INTERRUPTED, RUNNING):
        return False
    return not run.transient or run.record.gave_up


def _payload(name: str, target: Target, run: Run | None, revision: str | None, hub: str) -> dict:
    record = run.record if run else RunRecord()
    figures = record.figures
    finished = run.finished if run and run.finished else time.time()
    return {
        "version": PAYLOAD_VERSION,
        "event": name,
        "target": target.name,
        "repo": target.repo,
        "revision": revision,
        "url": f"{hub}/{target.repo}/tree/{revision}" if revision else None,
        "run": run.id if run else None,
        "outcome": run.outcome if run else None,
        "finished": datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds"),
        "inputs": run.inputs if run else {},
        "reason": run.reason if run and name in ("held", "failed") else None,
        "culprit": record.culprit if name in ("held", "failed") else None,
        "shards": {"recomputed": record.computed, "reused": record.reused},
        "validation": {
            "merge_ppl": _finite(figures.get("merge_ppl")),
            "parent_ppl": {k: _finite(v) for k, v in figures.get("parent_ppl", {}).items()},
            "kl": {k: _finite(v) for k, v in figures.get("kl", {}).items()},
            "stop_rate": _finite(figures.get("stop_rate")),
            "eot_prob": _finite(figures.get("eot_prob")),
            "parent_stop_rate": {k: _finite(v) for k, v in figures.get("parent_stop_rate", {}).items()},
        },
        "gguf": gguf_results(record.gguf),
    }


def _finite(value: Any) -> float | None:
    """A figure as JSON can carry it: NaN and infinity (a broken parent) become null."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def body(settings: NotifySettings, event: dict) -> bytes:
    """What is POSTed: the payload itself (json), or a message in the receiver's incoming-webhook shape; credentials
    in a URL within it (a reason naming an endpoint) are redacted."""
    if settings.format == "slack":
        shaped: dict = {"text": message(event, lambda text, url: f"<{url}|{text}>", _slack_escape)}
    elif settings.format == "discord":
        text = message(event, lambda text, url: f"[{text}](<{url}>)", lambda text: text)
        shaped = {"content": text[:DISCORD_LIMIT], "allowed_mentions": {"parse": []}}
    else:
        shaped = event
    return json.dumps(redact_value(shaped)).encode()


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def message(event: dict, link: Callable[[str, str], str], escape: Callable[[str], str]) -> str:
    """One paragraph for people: what happened to which repo, and the revision it serves now."""
    repo, revision, url = escape(event["repo"]), event["revision"], event["url"]
    at = link(short_identity(revision), url) if revision and url else None
    stays = f"Revision {at} stays published." if at else "Nothing is published yet."
    blamed = f" Blamed on {escape(event['culprit'])}." if event["culprit"] else ""
    reason = escape(event["reason"] or "").rstrip(".")
    name = event["event"]
    if name == "published":
        shards = event["shards"]
        inputs = ", ".join(f"{escape(model)}@{short_identity(sha)}" for model, sha in event["inputs"].items())
        ppl = event["validation"]["merge_ppl"]
        figures = f"; merge perplexity {ppl:.2f}" if ppl is not None else ""
        gguf = "".join(f" GGUF {escape(gguf_line(t, result))}." for t, result in event.get("gguf", {}).items())
        return (
            f"mergebot published {repo} at {at}: {len(shards['recomputed'])} shards recomputed, "
            f"{len(shards['reused'])} reused{figures}. Inputs: {inputs}.{gguf}"
        )
    if name == "held":
        return f"mergebot held {repo}: {reason}.{blamed} {stays}"
    if name == "failed":
        return f"mergebot could not update {repo}: {reason}.{blamed} {stays}"
    before = event["recovered_from"]
    return (
        f"mergebot: {repo} recovered: run #{event['run']} {event['outcome']} (revision {at}) after run "
        f"#{before['run']} {before['outcome']}."
    )


class _Receiver:
    """One receiver's queue and thread. It is `failing` from its first failed try to its next success."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self.label = f"{settings.format} receiver at {urlsplit(settings.url).hostname}"  # the URL may hold a token
        self.headers = {"Content-Type": "application/json", "User-Agent": "mergebot"}
        self.queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.failing = False
        self.dropped = 0
        """Events dropped since the receiver began failing."""
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self.enabled = True
        if settings.secret_env is not None:
            secret = os.environ.get(settings.secret_env, "").strip()  # an env file's trailing newline
            if HEADER_VALUE.fullmatch(secret):
                self.headers[settings.secret_header] = secret
            else:  # never the value: it may be the secret with a typo
                why = "is empty" if not secret else "holds characters a header cannot carry"
                _log.error(f"notifications disabled: the secret variable {why}", variable=settings.secret_env)
                self.enabled = False
        if self.enabled:
            self.thread.start()

    def put(self, event: dict) -> None:
        if not self.enabled:
            return
        if self.queue.qsize() >= QUEUE_SIZE:
            self._failed(f"{QUEUE_SIZE} events queued", event["event"])
            self._drop()
            return
        self.queue.put((event["event"], body(self.settings, event)))

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put(None)

    def join(self, deadline: float) -> None:
        """Wait for the thread until `deadline`; what it did not deliver is told in one line."""
        if not self.enabled:
            return
        self.thread.join(max(0.0, deadline - time.monotonic()))
        queued = self.queue.qsize() - 1 if self.thread.is_alive() else 0  # less the stop marker
        if self.dropped or queued:
            _log.warning("notifications not delivered", receiver=self.label, dropped=self.dropped, queued=queued)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            self._deliver(*item)

    def _deliver(self, event: str, data: bytes) -> None:
        """Try, then retry with backoff while the failure may pass; a stopping daemon gets no more retries."""
        for attempt in range(ATTEMPTS):
            failure, again = self._post(data)
            if failure is None:
                self._delivered()
                return
            self._failed(failure, event)
            if not again or attempt + 1 == ATTEMPTS or self.stopping.wait(FIRST_RETRY_S * 2**attempt):
                break
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def _post(self, data: bytes) -> tuple[str | None, bool]:
        """(None, _) when the receiver took it; else (what went wrong, whether trying again may help). One try
        ends within SEND_TIMEOUT_S in all, reads at most ANSWER_BYTES of the answer and follows no redirect."""
        try:
            parts = urlsplit(self.settings.url)
            https = parts.scheme == "https"
            kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
            connection = kind(parts.hostname or "", parts.port or (443 if https else 80), timeout=SEND_TIMEOUT_S)
        except ValueError as error:  # a port out of range
            return f"{type(error).__name__}: {redact(str(error))}", False
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with _Deadline(connection, SEND_TIMEOUT_S) as deadline:
            try:
                connection.request("POST", target, body=data, headers=self.headers)
                response = connection.getresponse()
                if deadline.passed:  # the answer may have been cut short, its headers read up to the cut
                    raise TimeoutError
                with suppress(OSError, http.client.HTTPException, ValueError):  # the status is what counts
                    response.read(ANSWER_BYTES)
            except (OSError, http.client.HTTPException, ValueError) as error:
                if deadline.passed:
                    return f"no answer within {SEND_TIMEOUT_S:g} s", True
                return f"{type(error).__name__}: {redact(str(error))}", True
            finally:
                connection.close()
        status = response.status
        if 200 <= status < 300:
            return None, False
        if 300 <= status < 400:
            return f"HTTP {status}: a redirect, not followed", False
        return f"HTTP {status}", status in RETRY_STATUS or status >= 500

    def _failed(self, failure: str, event: str) -> None:
        with self._lock:
            first, self.failing = not self.failing, True
        if first:
            _log.warning("notification receiver down", receiver=self.label, error=failure, notification=event)

    def _delivered(self) -> None:
        with self._lock:
            back, dropped = self.failing, self.dropped
            self.failing, self.dropped = False, 0
        if back:
            _log.info("notification receiver back", receiver=self.label, dropped=dropped)


class _Deadline:
    """Bounds every blocking call of one try on `connection`: once `seconds` have passed, its socket is shut down,
    which ends a read waiting on it. (A socket timeout bounds each read alone, so an answer dripped a byte at a
    time would hold the receiver's thread for ever.)"""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.connection = connection
        self.seconds = seconds
        self.done = threading.Event()
        self.passed = False
        self.thread = threading.Thread(target=self._watch, name="notify-deadline", daemon=True)

    def __enter__(self) -> "_Deadline":
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        if self.done.wait(self.seconds):
            return
        self.passed = True
        while not self.done.is_set():  # the socket may appear only now (a connect that was still under way)
            sock = self.connection.sock
            if sock is not None:
                with suppress(OSError):  # the plain socket's shutdown: under TLS too, it leaves the TLS object be
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
            self.done.wait(0.05)
