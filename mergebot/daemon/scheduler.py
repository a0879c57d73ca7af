"""The long-running daemon: decides *when* a target runs and runs it in a child process. It never imports torch.

Polling resolves each distinct upstream (repo, revision) once per interval with one cheap call; a webhook only
moves that check forward. What a target needs is `decide`'s; `on_change` targets run after a short debounce,
`nightly` ones in the cron window. One run per target at a time; at most `max_concurrent_merges` at once. A held
target's `mergebot release` is turned into a run at once by the 2 s watch job.

Stopping (SIGTERM, SIGINT): no new job or child starts, the children are stopped within `stop_grace`, the jobs
still running see `stopping` and end, and only then is the state closed.
"""

import signal
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from mergebot import log
from mergebot.config.daemon import DaemonConfig, Target
from mergebot.daemon.cleanup import clean_unused_revisions
from mergebot.daemon.decide import Act, Facts, decide, window_passed
from mergebot.daemon.endpoints import start_metrics, start_webhook
from mergebot.daemon.executor import start_executor
from mergebot.daemon.lock import acquire_lock
from mergebot.daemon.notify import Notifier
from mergebot.daemon.page import page_data
from mergebot.daemon.recover import recover_runs
from mergebot.daemon.reload import read_config, reread
from mergebot.daemon.runs import Run
from mergebot.daemon.stages import reference, running_reader, waits_for_upstream
from mergebot.daemon.state import State, TargetState
from mergebot.daemon.status import metrics_text
from mergebot.daemon.systemd import notify, watchdog_interval
from mergebot.daemon.watch import RetryUntilStopped, Upstream
from mergebot.errors import ExitCode, MergebotError
from mergebot.hub.client import HubClient
from mergebot.hub.endpoints import publisher, reader
from mergebot.runrecord import SUCCESSFUL, Outcome, RunRecord

WATCH_SECONDS = 2.0
"""How often the config file's mtime and the releases in the state are looked at."""
IN_WINDOW = (TargetState.DUE, TargetState.WAITING_FOR_WINDOW)
"""What the nightly window runs."""


class Daemon:
    """Owns the scheduler, the state and the merge children; configured from one TOML file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: DaemonConfig
        self.config, self.config_text = read_config(config_path)
        self.config_mtime = config_path.stat().st_mtime_ns
        self.log = log.get("daemon")
        for warning in self.config.warnings:
            self.log.warning("config", warning=warning)
        self.lock = acquire_lock(self.config.daemon.state_dir)
        self.state = State.open(self.config.daemon.state_dir)
        self.upstream = Upstream(self.state)
        self.executor = start_executor(self.config.daemon, self.state)
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(self.config.daemon.max_concurrent_merges)
        self.target_locks: dict[str, threading.Lock] = {}
        self.failures: dict[str, int] = {}
        self.notifier = Notifier()
        self.reload_requested = threading.Event()
        self.jobs = ThreadPoolExecutor(max_workers=8)
        self.scheduler = BackgroundScheduler(
            executors={"default": self.jobs},
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
            timezone=datetime.now().astimezone().tzinfo,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> int:
        self._recover()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        self._schedule_fixed_jobs()
        self.scheduler.start()
        servers = [
            start_webhook(self.config.daemon, self._poll_soon),
            start_metrics(
                self.config.daemon.metrics_listen,
                lambda: metrics_text(self.config, self.state),
                (lambda: page_data(self.config)) if self.config.daemon.status_page else None,
            ),
        ]
        self.log.info("daemon started", config=str(self.config_path), targets=sorted(self.config.targets))
        notify("READY=1\nSTATUS=watching " + ", ".join(sorted(self.config.targets)))
        watchdog_every = watchdog_interval()
        last_ping = 0.0
        while not self.stopping.wait(0.2):
            if watchdog_every and time.monotonic() - last_ping >= watchdog_every:
                notify("WATCHDOG=1")
                last_ping = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
        self._shutdown([server for server in servers if server])
        return ExitCode.OK

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.log.info("stopping", signal=signal.Signals(signum).name)
        notify("STOPPING=1")
        self.stopping.set()

    def _shutdown(self, servers: list[ThreadingHTTPServer]) -> None:
        """In this order, so that nothing touches the state once it is closed: no new job, request or child
        starts; the children stop within stop_grace; the jobs still running (they see `stopping`) end."""
        self.scheduler.pause()
        for server in servers:
            server.shutdown()
        self.executor.stop_all(self.config.daemon.stop_grace)
        # Not scheduler.shutdown(wait=True): it waits holding the job store lock, which a job still running
        # needs for get_job or add_job, and the two would wait for each other for ever.
        self.jobs.shutdown(wait=True)
        self.scheduler.shutdown(wait=False)
        self.notifier.close()
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
        self.scheduler.add_job(self._watch_config, "interval", seconds=WATCH_SECONDS, id="reload")
        self.scheduler.add_job(self._watch_releases, "interval", seconds=WATCH_SECONDS, id="releases")

    def _recover(self) -> None:
        """The runs a killed daemon left: a publish whose record was lost is recorded and announced."""
        hub = publisher(self.config.daemon, retry=RetryUntilStopped(stopping=self.stopping))
        recover_runs(self.config, self.state, hub, self._announce)

    def _announce(self, run: Run) -> None:
        self.notifier.after_run(self.config, self.config.targets[run.target], self.state, run.id)

    def _hub(self) -> HubClient:
        """The client the checks read upstream repos with (the read endpoint)."""
        return reader(self.config.daemon, retry=RetryUntilStopped(stopping=self.stopping))

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
        """Adopt an edited config; one that cannot be adopted is logged and the running config stays (reload.py)."""
        accepted = reread(self.config_path, self.config)
        if accepted is None:
            return
        config, text = accepted
        removed = set(self.config.targets) - set(config.targets)
        for name in removed:
            if self.scheduler.get_job(f"run:{name}"):
                self.scheduler.remove_job(f"run:{name}")
        self.config_text, self.config = text, config
        for warning in config.warnings:
            self.log.warning("config", warning=warning)
        self.log.info("config reloaded", targets=sorted(config.targets), removed=sorted(removed))
        self.scheduler.add_job(self.poll, id="poll-now", replace_existing=True)

    # -- watching ------------------------------------------------------------------------------------------------
    def _poll_soon(self, repo: str) -> None:
        self.scheduler.add_job(self.poll, args=[[repo]], id=f"poll:{repo}", replace_existing=True)

    def poll(self, repos: list[str] | None = None) -> None:
        """Check every target (or those reading `repos`) and schedule the ones that are due."""
        config = self.config
        hub = self._hub()
        resolved: dict[tuple[str, str | None], str] = {}
        wanted = set(repos) if repos is not None else None
        next_check = time.time() + config.daemon.poll_interval
        for target in config.targets.values():
            if self.stopping.is_set():
                return
            unasked = wanted is not None and not wanted & target.merge.sources
            if unasked or waits_for_upstream(target, self.state, self._run_pending, next_check):
                continue
            try:
                inputs = self.upstream.check(target, hub, resolved)
            except MergebotError as error:
                self._check_failed(target, error, next_check)
                continue
            self._consider(target, inputs.digests, next_check)
        notify(f"STATUS=last check {datetime.now(UTC).isoformat(timespec='seconds')}")

    def _check_failed(self, target: Target, error: MergebotError, next_check: float | None) -> None:
        if self.stopping.is_set():
            return
        self.log.warning("check failed", target=target.name, error=str(error))
        self.state.set_target_status(target.name, TargetState.CHECK_FAILED, f"cannot check inputs: {error}", next_check)

    def _facts(self, target: Target) -> Facts:
        last = self.state.last_run(target.name)
        passed = window_passed(last, self.config.daemon.schedule, self.scheduler.timezone)
        return Facts(last, self.state.last_successful_run(target.name), target.name in self.state.releases(), passed)

    def _consider(self, target: Target, digests: dict[str, str], next_check: float) -> None:
        """Carry out what `decide` says; a released target is `_watch_releases`' to run."""
        action = decide(target, digests, self._facts(target))
        name, act, why = target.name, action.act, action.why
        if act in (Act.UP_TO_DATE, Act.WAIT_FOR_CHANGE, Act.HOLD):
            state = {Act.UP_TO_DATE: TargetState.UP_TO_DATE, Act.HOLD: TargetState.HELD}
            self.state.set_target_status(name, state.get(act, TargetState.WAITING_FOR_CHANGE), why, next_check)
        elif act == Act.WAIT_FOR_WINDOW and not self._run_pending(name):
            waiting = f"due ({why}); waits for the nightly window {self.scheduler.get_job('nightly').next_run_time}"
            self.state.set_target_status(name, TargetState.WAITING_FOR_WINDOW, waiting, next_check)
        elif act == Act.RUN and not self._run_pending(name):
            self.log.info("target due", target=name, reason=why)
            self.state.set_target_status(name, TargetState.DUE, f"due ({why}); run scheduled", next_check)
            self._schedule_run(name, delay=self.config.daemon.debounce if target.when == "on_change" else 0)

    def _watch_releases(self) -> None:
        """Run each held target a person released (`mergebot release`) now, not at the next poll, whatever its
        `when`: the person asked for this run."""
        for name in sorted(self.state.releases() & set(self.config.targets)):
            last = self.state.last_run(name)
            if self.stopping.is_set() or last is None or last.outcome != Outcome.HELD or self._run_pending(name):
                continue
            self.log.info("hold released", target=name, run=last.id)
            self.state.set_target_status(name, TargetState.DUE, "due (its hold was released); run scheduled", None)
            self._schedule_run(name, delay=0)

    def nightly(self) -> None:
        for target in self.config.targets.values():
            status = self.state.target_status(target.name)
            if target.when == "nightly" and status and status.state in IN_WINDOW:
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
        """For cron users: run every due target now, one after another. A target whose inputs cannot be checked is
        recorded as such and the others still run; one refused before on the same content is not run again.
        ExitCode.VALIDATION_FAILED (1) when any target failed or is held."""
        self._recover()
        hub = self._hub()
        resolved: dict[tuple[str, str | None], str] = {}
        failed = False
        for target in self.config.targets.values():
            if waits_for_upstream(target, self.state, self._run_pending, None):
                continue
            try:
                inputs = self.upstream.check(target, hub, resolved)
            except MergebotError as error:
                self._check_failed(target, error, None)
                failed = True
                continue
            action = decide(target, inputs.digests, self._facts(target), now=True)
            if action.act == Act.UP_TO_DATE:
                self.log.info("up to date", target=target.name)
                self.state.set_target_status(target.name, TargetState.UP_TO_DATE, None, None)
                continue
            if action.act in (Act.WAIT_FOR_CHANGE, Act.HOLD):
                self.log.info("still refused: nothing changed since", target=target.name)
                failed = True
                continue
            self.log.info("target due", target=target.name, reason=action.why)
            self.run_target(target.name)
            last = self.state.last_run(target.name)
            failed |= last is None or last.outcome not in SUCCESSFUL
        self.notifier.close()
        self.state.close()
        self.lock.close()
        return ExitCode.VALIDATION_FAILED if failed else ExitCode.OK

    # -- running -------------------------------------------------------------------------------------------------
    def run_target(self, name: str) -> None:
        """One run in a child process; the outcome goes to the state, transient failures are retried."""
        text = self.config_text  # the text of the config `target` comes from: the child pins its models' inputs
        target = self.config.targets.get(name)
        if target is None:
            return
        with self._lock_for(name), self.slots:
            if self.stopping.is_set() or waits_for_upstream(target, self.state, self._run_pending, None):
                return
            if (reader := running_reader(target, self.config, self.state)) is not None:
                self.log.info("run waits for a reader of the target", target=name, reader=reader)
                self._schedule_run(name, delay=WATCH_SECONDS)
                return
            try:
                inputs = self.upstream.check(target, self._hub(), {})
            except MergebotError as error:
                if not self.stopping.is_set():
                    self._retry_later(target, f"cannot check inputs: {error}")
                return
            run_id = self.state.start_run(name, target.config_hash, inputs.shas, inputs.digests)
            self.log.info("run started", target=name, run=run_id)
            timeout = self.config.daemon.merge_timeout
            finished = self.executor.run(self.config_path, text, name, timeout, inputs.shas, run_id)
            if finished is None or self.stopping.is_set():
                return  # still "running" in the state: marked interrupted as the daemon stops
            code, record = finished
            self._record(target, run_id, code, replace(record, digests=inputs.digests))
        # Inputs may have moved while the child ran (a webhook or poll then found the run busy): look again, and
        # at the targets that read this one's merge.
        repos = [*target.merge.sources, reference(name)]
        self.scheduler.add_job(self.poll, args=[repos], id=f"recheck:{name}", replace_existing=True)

    def _record(self, target: Target, run_id: int, code: int, record: RunRecord) -> None:
        """The run's outcome by the child's exit code. A run that ends for good (anything but a transient failure)
        uses up a release of its target: its child read it, and the next inputs are compared with the last
        publish again."""
        reason = record.reason
        if code == ExitCode.OK:
            self._succeeded(target, run_id, record)
            return
        if code == ExitCode.HELD:
            why = reason or "worse than the last publish"
            held = replace(record, outcome=Outcome.HELD, reason=why)
            self._finish_for_good(target, run_id, held, TargetState.HELD, why)
            self.log.warning("run held", target=target.name, culprit=record.culprit, reason=why)
            return
        if code in (ExitCode.VALIDATION_FAILED, ExitCode.PERMANENT):
            waiting = f"failed: {reason}; waits for new inputs or a config change"
            failed = replace(record, outcome=Outcome.FAILED, reason=reason or f"exit code {code}")
            self._finish_for_good(target, run_id, failed, TargetState.WAITING_FOR_CHANGE, waiting)
            self.log.error("run failed", target=target.name, reason=reason)
            return
        # RETRY_LATER, an internal error, a crash, a signal, a timeout: the same run may succeed later.
        outcome = Outcome.INTERNAL_ERROR if code == ExitCode.INTERNAL_ERROR else Outcome.FAILED
        why = reason or (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        retried = replace(record, outcome=outcome, reason=why, gave_up=self._out_of_retries(target.name))
        self.state.finish_run(run_id, retried, transient=True)
        self._retry_later(target, why, run_id)

    def _succeeded(self, target: Target, run_id: int, record: RunRecord) -> None:
        """A run that published or found nothing to change: its shards are the target's now."""
        self.failures.pop(target.name, None)
        with self.state.transaction():
            self.state.finish_run(run_id, record)
            for shard, fingerprint in record.fingerprints.items():
                self.state.record_shard(target.name, shard, fingerprint)
            self.state.set_target_status(target.name, TargetState.UP_TO_DATE, None, None)
            self.state.clear_release(target.name)
        self.log.info("run finished", target=target.name, outcome=record.outcome, sha=record.published_sha)
        self.notifier.after_run(self.config, target, self.state, run_id)
        removed, freed = clean_unused_revisions(self.config, self.state)
        if removed:
            self.log.info("cache cleaned", revisions=removed, freed_bytes=freed)

    def _finish_for_good(
        self, target: Target, run_id: int, record: RunRecord, state: TargetState, waiting: str
    ) -> None:
        """A run that nothing but new inputs, a config change (or, held, a release) would change: it waits."""
        with self.state.transaction():
            self.state.finish_run(run_id, record)
            self.state.set_target_status(target.name, state, waiting, None)
            self.state.clear_release(target.name)
        self.notifier.after_run(self.config, target, self.state, run_id)

    def _out_of_retries(self, name: str) -> bool:
        return self.failures.get(name, 0) >= self.config.daemon.max_retries

    def _retry_later(self, target: Target, why: str, run_id: int | None = None) -> None:
        """Retry with backoff, or give up (and tell the receivers) until the next check finds the target due."""
        attempt = self.failures.get(target.name, 0)
        if self._out_of_retries(target.name):
            waiting = f"gave up after {attempt} retries: {why}"
            self.state.set_target_status(target.name, TargetState.GAVE_UP, waiting, None)
            self.log.error("giving up until the next check", target=target.name, reason=why)
            self.failures.pop(target.name, None)
            self.notifier.after_run(self.config, target, self.state, run_id, gave_up=waiting)
            return
        self.failures[target.name] = attempt + 1
        delay = self.config.daemon.retry_delay * 2**attempt
        waiting = f"retrying in {delay:.0f} s after: {why}"
        self.state.set_target_status(target.name, TargetState.RETRYING, waiting, time.time() + delay)
        self.log.warning("run will be retried", target=target.name, reason=why, delay=delay)
        self._schedule_run(target.name, delay=delay)
