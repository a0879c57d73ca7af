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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from mergebot import log
from mergebot.config.daemon import DaemonConfig, NotifySettings, Target
from mergebot.daemon.page import hub_url
from mergebot.daemon.runs import Run
from mergebot.daemon.state import State
from mergebot.files import short_identity

PAYLOAD_VERSION = 1
"""Of the json format; it grows only by new fields, and goes up when a field changes meaning or goes."""
ATTEMPTS = 5
FIRST_RETRY_S = 1.0
"""Then 2, 4 and 8 s: an event waits out about 15 s of a receiver restarting."""
SEND_TIMEOUT_S = 5.0
QUEUE_SIZE = 100
"""Events waiting per receiver; more are dropped (and counted) while it is down."""
FLUSH_S = 5.0
"""How long a stopping daemon gives its receivers for what is queued: one try each, no retry."""
RETRY_STATUS = {408, 429}
"""Besides 5xx: the answers worth trying again. Any other 4xx drops the event at once."""
LOOKBACK = 100
"""Runs looked back over to find the one a recovery follows (transient failures in between are skipped)."""
DISCORD_LIMIT = 2000

_log = log.get("notify")


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
    if run.outcome == "published":
        names.append("published")
    elif run.outcome == "held" or (run.outcome == "failed" and _ended_for_good(run)):
        names.append(run.outcome)
    before = next((r for r in runs if r.id < run.id and _ended_for_good(r)), None)
    recovering = before is not None and before.outcome in ("held", "failed")
    if run.outcome in ("published", "unchanged") and recovering:
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
    if run.outcome in ("interrupted", "running"):
        return False
    return not run.transient or bool((run.details or {}).get("gave_up"))


def _payload(name: str, target: Target, run: Run | None, revision: str | None, hub: str) -> dict:
    details = (run.details if run else None) or {}
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
        "culprit": details.get("culprit") if name in ("held", "failed") else None,
        "shards": {"recomputed": details.get("computed", []), "reused": details.get("reused", [])},
        "validation": {
            "merge_ppl": _finite(details.get("merge_ppl")),
            "parent_ppl": {k: _finite(v) for k, v in details.get("parent_ppl", {}).items()},
            "kl": {k: _finite(v) for k, v in details.get("kl", {}).items()},
            "stop_rate": _finite(details.get("stop_rate")),
            "eot_prob": _finite(details.get("eot_prob")),
            "parent_stop_rate": {k: _finite(v) for k, v in details.get("parent_stop_rate", {}).items()},
        },
    }


def _finite(value: Any) -> float | None:
    """A figure as JSON can carry it: NaN and infinity (a broken parent) become null."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def body(settings: NotifySettings, event: dict) -> bytes:
    """What is POSTed: the payload itself (json), or a message in the receiver's incoming-webhook shape."""
    if settings.format == "slack":
        shaped: dict = {"text": message(event, lambda text, url: f"<{url}|{text}>", _slack_escape)}
    elif settings.format == "discord":
        text = message(event, lambda text, url: f"[{text}](<{url}>)", lambda text: text)
        shaped = {"content": text[:DISCORD_LIMIT], "allowed_mentions": {"parse": []}}
    else:
        shaped = event
    return json.dumps(shaped).encode()


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
        return (
            f"mergebot published {repo} at {at}: {len(shards['recomputed'])} shards recomputed, "
            f"{len(shards['reused'])} reused{figures}. Inputs: {inputs}."
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
            secret = os.environ.get(settings.secret_env, "")
            if secret:
                self.headers[settings.secret_header] = secret
            else:
                _log.error("notifications disabled: the secret variable is empty", variable=settings.secret_env)
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
        """(None, _) when the receiver took it; else (what went wrong, whether trying again may help)."""
        request = urllib.request.Request(self.settings.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}", error.code in RETRY_STATUS or error.code >= 500
        except (OSError, http.client.HTTPException, ValueError) as error:
            reason = getattr(error, "reason", error)
            return f"{type(reason).__name__}: {reason}", True
        return None, False

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
