"""The long-running daemon: decides *when* a target runs and runs it in a child process. It never imports torch.

Polling resolves each distinct upstream (repo, revision) once per interval with one cheap call; a webhook only
moves that check forward. A target is due when an input sha or its config differs from its last successful run;
`on_change` targets run after a short debounce, `nightly` ones in the cron window (or at once if a window passed
while the daemon was down). One run per target at a time; at most `max_concurrent_merges` at once.
"""

import ctypes
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from mergebot import log
from mergebot.config.daemon import DaemonConfig, Target, check_daemon_config, load_daemon_config
from mergebot.daemon.children import stop_process
from mergebot.daemon.state import State, acquire_lock
from mergebot.daemon.status import metrics_text
from mergebot.errors import MergebotError
from mergebot.files import METADATA_FILES
from mergebot.hub.client import HubClient, clean_cache

EXIT_VALIDATION_FAILED = 1
EXIT_PERMANENT = 2
RELOAD_CHECK_SECONDS = 2.0
DAEMON_PID = "MERGEBOT_DAEMON_PID"
PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 75
"""Tells a merge child which process it must not outlive (the daemon may itself be pid 1 in a container)."""


def local_digest(path: Path) -> str:
    """A cheap identity of a local model directory: names, sizes and mtimes of its files."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return "local:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def current_inputs(target: Target, hub: HubClient, resolved: dict[tuple[str, str | None], str]) -> dict[str, str]:
    """model → sha now; `resolved` is shared across targets so each (repo, revision) costs one call per check."""
    inputs = {}
    for spec in target.merge.models:
        path = Path(spec.model).expanduser()
        if path.is_dir():
            inputs[spec.model] = local_digest(path)
            continue
        key = (spec.model, spec.revision)
        if key not in resolved:
            resolved[key] = hub.resolve(spec.model, spec.revision)
        inputs[spec.model] = resolved[key]
    return inputs


def content_digest(hub: HubClient, repo: str, sha: str) -> str:
    """What a merge reads from a revision (weights, index, config, tokenizer), so a README-only commit is no change."""
    files = hub.list_files(repo, sha).files
    read = sorted(
        (name, file.sha256 or file.oid or "")
        for name, file in files.items()
        if name in METADATA_FILES or ("/" not in name and name.endswith(".safetensors"))
    )
    return hashlib.sha256(json.dumps(read).encode()).hexdigest()


def due_reason(target: Target, digests: dict[str, str], state: State) -> str | None:
    """Why the target needs a run, or None when its last successful run read exactly this content and config."""
    last = state.last_successful_run(target.name)
    if last is None:
        return "never merged"
    if last.config_hash != target.config_hash:
        return "its merge config changed"
    previous = (last.details or {}).get("digests", {})
    changed = sorted(model for model, digest in digests.items() if previous.get(model) != digest)
    if changed:
        return "new upstream content in " + ", ".join(changed)
    return None


def die_with_daemon() -> None:
    """Called in a merge child: it must not outlive its daemon (a SIGKILLed daemon's child would race the next
    daemon's run of the same target)."""
    daemon = os.environ.get(DAEMON_PID)
    if sys.platform == "linux" and daemon:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(daemon):
            sys.exit(EXIT_PARENT_GONE)


def clean_unused_revisions(config: DaemonConfig, state: State) -> tuple[int, int]:
    """Drop cached upstream revisions that no target reads now and no last published merge used.

    Returns (revisions removed, bytes freed); repos that no target reads are left alone."""
    hub = HubClient(endpoint=config.daemon.hub_endpoint)
    models = {(m.model, m.revision) for t in config.targets.values() for m in t.merge.models}
    repos = {model for model, _ in models if not Path(model).expanduser().is_dir()}
    keep = state.published_inputs() | {
        (model, sha)
        for model, revision in models
        if model in repos and (sha := state.latest_revision(model, revision or "main"))
    }
    return clean_cache(hub.cache_dir, repos, keep)


def notify(message: str) -> None:
    """systemd's notify protocol, when NOTIFY_SOCKET is set; a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class Daemon:
    """Owns the scheduler, the state and the merge children; configured from one TOML file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config_text = config_path.read_text(encoding="utf-8")
        self.config: DaemonConfig = load_daemon_config(config_path, self.config_text)
        self.config_mtime = config_path.stat().st_mtime_ns
        self.log = log.get("daemon")
        self.lock = acquire_lock(self.config.daemon.state_dir)
        self.state = State.open(self.config.daemon.state_dir)
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(self.config.daemon.max_concurrent_merges)
        self.target_locks: dict[str, threading.Lock] = {}
        self.failures: dict[str, int] = {}
        self.children: set[subprocess.Popen] = set()
        self.children_lock = threading.Lock()
        self.reload_requested = threading.Event()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=8)},
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
            timezone=datetime.now().astimezone().tzinfo,
        )
        self.webhook: ThreadingHTTPServer | None = None
        self.metrics: ThreadingHTTPServer | None = None
        self.known_digests: dict[tuple[str, str], str] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> int:
        for interrupted in self.state.mark_interrupted_runs():
            self.log.warning("interrupted run found", target=interrupted.target, run=interrupted.id)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        self._schedule_fixed_jobs()
        self.scheduler.start()
        self._start_webhook()
        self._start_metrics()
        self.log.info("daemon started", config=str(self.config_path), targets=sorted(self.config.targets))
        notify("READY=1\nSTATUS=watching " + ", ".join(sorted(self.config.targets)))
        watchdog_every = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
        last_ping = 0.0
        while not self.stopping.wait(0.2):
            if watchdog_every and time.monotonic() - last_ping >= watchdog_every:
                notify("WATCHDOG=1")
                last_ping = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
        self._shutdown()
        return 0

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.log.info("stopping", signal=signal.Signals(signum).name)
        notify("STOPPING=1")
        self.stopping.set()

    def _shutdown(self) -> None:
        self.scheduler.shutdown(wait=False)
        for server in (self.webhook, self.metrics):
            if server:
                server.shutdown()
        deadline = time.monotonic() + self.config.daemon.stop_grace
        with self.children_lock:
            children = list(self.children)
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            stop_process(child, max(0.0, deadline - time.monotonic()))
        self.state.mark_interrupted_runs("the daemon stopped during the run; it resumes from its finished shards")
        self.state.close()
        self.lock.close()
        self.log.info("stopped")

    def _schedule_fixed_jobs(self) -> None:
        settings = self.config.daemon
        now = datetime.now(self.scheduler.timezone)
        self.scheduler.add_job(self.poll, "interval", seconds=settings.poll_interval, id="poll", next_run_time=now)
        self.scheduler.add_job(
            self.nightly, CronTrigger.from_crontab(settings.schedule, timezone=self.scheduler.timezone), id="nightly"
        )
        self.scheduler.add_job(self._watch_config, "interval", seconds=RELOAD_CHECK_SECONDS, id="reload")

    # -- configuration -----------------------------------------------------------------------------------------
    def _watch_config(self) -> None:
        try:
            mtime = self.config_path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self.config_mtime:
            self.config_mtime = mtime
            self.reload_requested.set()

    def reload(self) -> None:
        """Adopt an edited config; an invalid edit is logged with its line and the running config stays."""
        text = self.config_path.read_text(encoding="utf-8")
        config, problems = check_daemon_config(self.config_path, text)
        if problems or config is None:
            for problem in problems:
                self.log.error("config rejected, keeping the running one", problem=str(problem))
            return
        removed = set(self.config.targets) - set(config.targets)
        for name in removed:
            if self.scheduler.get_job(f"run:{name}"):
                self.scheduler.remove_job(f"run:{name}")
        self.config, self.config_text = config, text
        self.log.info("config reloaded", targets=sorted(config.targets), removed=sorted(removed))
        self.scheduler.add_job(self.poll, id="poll-now", replace_existing=True)

    # -- watching ------------------------------------------------------------------------------------------------
    def poll(self, repos: Iterable[str] | None = None) -> None:
        """Check every target (or those reading `repos`) and schedule the ones that are due."""
        config = self.config
        hub = HubClient(endpoint=config.daemon.hub_endpoint)
        resolved: dict[tuple[str, str | None], str] = {}
        wanted = set(repos) if repos is not None else None
        next_check = time.time() + config.daemon.poll_interval
        for target in config.targets.values():
            if wanted is not None and not wanted & {m.model for m in target.merge.models}:
                continue
            try:
                inputs = current_inputs(target, hub, resolved)
                self._record_revisions(resolved)
                digests = self._digests(inputs, hub)
            except MergebotError as error:
                self.log.warning("check failed", target=target.name, error=str(error))
                self.state.set_target_status(target.name, f"cannot check inputs: {error}", next_check)
                continue
            self._consider(target, digests, next_check)
        notify(f"STATUS=last check {datetime.now(UTC).isoformat(timespec='seconds')}")

    def _digests(self, inputs: dict[str, str], hub: HubClient) -> dict[str, str]:
        """model → content digest; a local directory's identity already is one, a Hub sha costs one listing once."""
        digests = {}
        for model, sha in inputs.items():
            if sha.startswith("local:"):
                digests[model] = sha
                continue
            if (model, sha) not in self.known_digests:
                self.known_digests[(model, sha)] = content_digest(hub, model, sha)
            digests[model] = self.known_digests[(model, sha)]
        return digests

    def _record_revisions(self, resolved: dict[tuple[str, str | None], str]) -> None:
        for (repo, revision), sha in resolved.items():
            if self.state.record_revision(repo, revision or "main", sha):
                self.log.info("new upstream revision", repo=repo, ref=revision or "main", sha=sha)

    def _consider(self, target: Target, digests: dict[str, str], next_check: float) -> None:
        reason = due_reason(target, digests, self.state)
        last = self.state.last_run(target.name)
        if reason is None:
            self.state.set_target_status(target.name, None, next_check)
            return
        unchanged_failure = (
            last and last.outcome == "failed" and not last.transient and (last.details or {}).get("digests") == digests
        )
        if unchanged_failure and last.config_hash == target.config_hash:
            waiting = f"last run failed: {last.reason}; waits for new inputs or a config change"
            self.state.set_target_status(target.name, waiting, next_check)
            return
        if self._run_pending(target.name):
            return
        if target.when == "nightly" and not self._window_missed(target):
            fire = self.scheduler.get_job("nightly").next_run_time
            self.state.set_target_status(
                target.name, f"due ({reason}); waits for the nightly window {fire}", next_check
            )
            return
        self.log.info("target due", target=target.name, reason=reason)
        self.state.set_target_status(target.name, f"due ({reason}); run scheduled", next_check)
        self._schedule_run(target.name, delay=self.config.daemon.debounce if target.when == "on_change" else 0)

    def _window_missed(self, target: Target) -> bool:
        """A nightly window that passed since the target's last run (the daemon was down or busy) still counts."""
        last = self.state.last_run(target.name)
        since = datetime.fromtimestamp(last.started if last else 0, self.scheduler.timezone)
        trigger = CronTrigger.from_crontab(self.config.daemon.schedule, timezone=self.scheduler.timezone)
        fire = trigger.get_next_fire_time(None, since)
        return last is not None and fire is not None and fire <= datetime.now(self.scheduler.timezone)

    def nightly(self) -> None:
        for target in self.config.targets.values():
            status = self.state.target_status(target.name)
            if (
                target.when == "nightly"
                and status
                and status.waiting_reason
                and status.waiting_reason.startswith("due")
            ):
                self._schedule_run(target.name, delay=0)

    def _run_pending(self, name: str) -> bool:
        return self.scheduler.get_job(f"run:{name}") is not None or self._lock_for(name).locked()

    def _schedule_run(self, name: str, delay: float) -> None:
        when = datetime.now(self.scheduler.timezone) + timedelta(seconds=delay)
        self.scheduler.add_job(
            self.run_target, "date", run_date=when, args=[name], id=f"run:{name}", replace_existing=True
        )

    def _lock_for(self, name: str) -> threading.Lock:
        return self.target_locks.setdefault(name, threading.Lock())

    def run_once(self) -> int:
        """For cron users: run every due target now, one after another; 1 when any run failed."""
        hub = HubClient(endpoint=self.config.daemon.hub_endpoint)
        resolved: dict[tuple[str, str | None], str] = {}
        failed = False
        for target in self.config.targets.values():
            inputs = current_inputs(target, hub, resolved)
            self._record_revisions(resolved)
            reason = due_reason(target, self._digests(inputs, hub), self.state)
            if reason is None:
                self.log.info("up to date", target=target.name)
                continue
            self.log.info("target due", target=target.name, reason=reason)
            self.run_target(target.name)
            last = self.state.last_run(target.name)
            failed |= last is None or last.outcome == "failed"
        self.state.close()
        self.lock.close()
        return 1 if failed else 0

    # -- running -------------------------------------------------------------------------------------------------
    def run_target(self, name: str) -> None:
        """One run in a child process; the outcome goes to the state, transient failures are retried."""
        target = self.config.targets.get(name)
        if target is None or self.stopping.is_set():
            return
        with self._lock_for(name), self.slots:
            hub = HubClient(endpoint=self.config.daemon.hub_endpoint)
            try:
                inputs = current_inputs(target, hub, {})
                digests = self._digests(inputs, hub)
            except MergebotError as error:
                self._retry_later(target, f"cannot check inputs: {error}")
                return
            run_id = self.state.start_run(name, target.config_hash, inputs)
            self.log.info("run started", target=name, run=run_id)
            code, result = self._run_child(target)
            if self.stopping.is_set():
                return
            self._record(target, run_id, code, result | {"digests": digests})
        # Inputs may have moved while the child ran (a webhook or poll then found the run busy): look again.
        repos = [model.model for model in target.merge.models]
        self.scheduler.add_job(self.poll, args=[repos], id=f"recheck:{name}", replace_existing=True)

    def _run_child(self, target: Target) -> tuple[int, dict]:
        with tempfile.TemporaryDirectory(prefix="mergebot-run-") as temp:
            result_path = Path(temp) / "result.json"
            command = [
                sys.executable, "-m", "mergebot.cli", "run-target",
                "--config", str(self.config_path), "--target", target.name, "--result", str(result_path),
            ]  # fmt: skip
            child = subprocess.Popen(
                command, stdin=subprocess.PIPE, text=True, env=os.environ | {DAEMON_PID: str(os.getpid())}
            )
            with self.children_lock:
                self.children.add(child)
            child.stdin.write(self.config_text)
            child.stdin.close()
            try:
                code = child.wait(timeout=self.config.daemon.merge_timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
                return -9, {"reason": f"merge_timeout of {self.config.daemon.merge_timeout:.0f} s exceeded"}
            finally:
                with self.children_lock:
                    self.children.discard(child)
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            return code, result

    def _record(self, target: Target, run_id: int, code: int, result: dict) -> None:
        reason = result.get("reason")
        if code == 0:
            self.failures.pop(target.name, None)
            outcome = result.get("outcome", "published")
            self.state.finish_run(run_id, outcome, published_sha=result.get("published_sha"), details=result)
            for shard, fingerprint in result.get("fingerprints", {}).items():
                self.state.record_shard(target.name, shard, fingerprint)
            self.state.set_target_status(target.name, None, None)
            self.log.info("run finished", target=target.name, outcome=outcome, sha=result.get("published_sha"))
            self.clean_cache()
            return
        if code in (EXIT_VALIDATION_FAILED, EXIT_PERMANENT):
            self.state.finish_run(run_id, "failed", reason or f"exit code {code}", details=result)
            self.state.set_target_status(
                target.name, f"failed: {reason}; waits for new inputs or a config change", None
            )
            self.log.error("run failed", target=target.name, reason=reason)
            return
        why = reason or (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        self.state.finish_run(run_id, "failed", why, transient=True, details=result)
        self._retry_later(target, why)

    def clean_cache(self) -> None:
        removed, freed = clean_unused_revisions(self.config, self.state)
        if removed:
            self.log.info("cache cleaned", revisions=removed, freed_bytes=freed)

    def _retry_later(self, target: Target, why: str) -> None:
        attempt = self.failures.get(target.name, 0)
        if attempt >= self.config.daemon.max_retries:
            self.state.set_target_status(target.name, f"gave up after {attempt} retries: {why}", None)
            self.log.error("giving up until the next check", target=target.name, reason=why)
            self.failures.pop(target.name, None)
            return
        self.failures[target.name] = attempt + 1
        delay = self.config.daemon.retry_delay * 2**attempt
        self.state.set_target_status(target.name, f"retrying in {delay:.0f} s after: {why}", time.time() + delay)
        self.log.warning("run will be retried", target=target.name, reason=why, delay=delay)
        self._schedule_run(target.name, delay=delay)

    # -- endpoints -------------------------------------------------------------------------------------------------
    def _start_metrics(self) -> None:
        address = self.config.daemon.metrics_listen
        if address is None:
            return
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_response(404)
                    self.end_headers()
                    return
                body = metrics_text(daemon.config, daemon.state).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return

        self.metrics = ThreadingHTTPServer(address, Handler)
        threading.Thread(target=self.metrics.serve_forever, name="metrics", daemon=True).start()
        self.log.info("metrics listening", address=f"{address[0]}:{address[1]}")

    def _start_webhook(self) -> None:
        settings = self.config.daemon
        if settings.webhook_listen is None:
            return
        secret = os.environ.get(settings.webhook_secret_env, "")
        if not secret:
            self.log.error("webhook disabled: its secret variable is empty", variable=settings.webhook_secret_env)
            return
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                given = self.headers.get("X-Webhook-Secret", "")
                if not hmac.compare_digest(given.encode(), secret.encode()):
                    daemon.log.warning("webhook rejected: bad secret", client=self.client_address[0])
                    self.send_response(401)
                    self.end_headers()
                    return
                try:
                    repo = json.loads(body)["repo"]["name"]
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                    self.end_headers()
                    return
                daemon.log.info("webhook", repo=repo)
                daemon.scheduler.add_job(daemon.poll, args=[[repo]], id=f"poll:{repo}", replace_existing=True)
                self.send_response(202)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                return

        self.webhook = ThreadingHTTPServer(settings.webhook_listen, Handler)
        threading.Thread(target=self.webhook.serve_forever, name="webhook", daemon=True).start()
        self.log.info("webhook listening", address=f"{settings.webhook_listen[0]}:{settings.webhook_listen[1]}")
