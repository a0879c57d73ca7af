"""Runs on an existing Ray cluster (`executor = "ray"`): each run is a Ray actor that starts, on its worker, the
same `mergebot run-target` child the local executor starts beside the daemon (so torch loads only there), and hands
back the same (exit code, result) for the daemon to record. The schedule and the state stay with the daemon; the
child gets from it the one record it would have read from the state (the target's last successful run).

The child's state_dir on the worker is a work directory of this daemon's own, where the merge is made and kept
between runs (`work_dir/KEY/targets/NAME/merged`), so a run on a worker that ran the target before reuses its
finished shards; each run of a target asks (softly) for the node its record says it ran on last.

One actor per run rather than a plain task, for stopping: the child must get SIGTERM and `stop_grace` to finish its
shard. A cancelled task's result resolves at once, so the daemon could not tell when the child is gone, and a
daemon that exits then takes its workers down with it mid-shard; the actor's `stop` returns when the child is gone.
The child dies with its actor (the actor is its "daemon" for `die_with_daemon`), and the actor with the daemon.
"""

import hashlib
import logging
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mergebot.config.executor import RaySettings
from mergebot.daemon.children import Children
from mergebot.daemon.runs import run_as_dict
from mergebot.daemon.state import State
from mergebot.errors import ClusterError, ExitCode
from mergebot.files import write_json_atomic
from mergebot.runrecord import RunRecord

STATE_DIR_ENV = "MERGEBOT_STATE_DIR"
"""Overrides the config's state_dir (config/daemon.py): on a worker, the child's state_dir is its work directory."""
CONNECT_TIMEOUT_S = 10.0
STOP_MARGIN_S = 5.0
"""Past `stop_grace`, how long the actors' own SIGKILL of their children may take before the actors are killed."""


class RayExecutor:
    """The daemon's side: places each run on the cluster, waits for it within merge_timeout, stops them all."""

    def __init__(self, settings: RaySettings, state_dir: Path, state: State) -> None:
        _check_reachable(settings.address)
        try:
            ray.init(address=settings.address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as error:  # ray raises ConnectionError, RuntimeError or ValueError here
            raise ClusterError(
                f"daemon.ray.address {settings.address!r}: cannot connect: {_first_line(error)}"
            ) from error
        self._settings = settings
        self._state = state
        # Apart from any other daemon's merges on the same workers (and their targets of the same names).
        self._key = hashlib.sha256(f"{socket.gethostname()}:{state_dir}".encode()).hexdigest()[:12]
        self._running: set[ActorHandle] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def run(
        self, config_path: Path, config_text: str, target: str, timeout: float, pinned: Mapping[str, str], run_id: int
    ) -> tuple[int, RunRecord] | None:
        with self._lock:
            if self._stopped:
                return None
            actor = _Worker.options(**self._placement(target)).remote()
            self._running.add(actor)
        try:
            job = (str(config_path), config_text, target, timeout, dict(pinned), run_id, self._last_run(target))
            ref = actor.run.remote(*job, self._key, self._settings.work_dir, self._settings.disk)
            ready, _ = ray.wait([ref], timeout=timeout)  # from submission: time waiting for a worker counts
            if not ready:
                return -signal.SIGKILL, RunRecord(reason=f"merge_timeout of {timeout:.0f} s exceeded")
            code, result, node = ray.get(ref)
        except RayError as error:
            return ExitCode.RETRY_LATER, RunRecord(reason=f"the Ray task failed: {_first_line(error)}")
        finally:
            with self._lock:
                self._running.discard(actor)
            ray.kill(actor)
        return code, replace(result, node=node)

    def stop_all(self, grace: float) -> None:
        with self._lock:
            self._stopped = True
            actors = list(self._running)
        stops = [actor.stop.remote(grace) for actor in actors]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=grace + STOP_MARGIN_S)
        for actor in actors:
            ray.kill(actor)

    def _placement(self, target: str) -> dict:
        settings = self._settings
        node = self._last_node(target)
        placement = NodeAffinitySchedulingStrategy(node, soft=True) if node else "DEFAULT"
        memory = {"memory": settings.memory} if settings.memory else {}
        return {"num_cpus": settings.num_cpus, "scheduling_strategy": placement, **memory}

    def _last_node(self, target: str) -> str | None:
        """The node that made the target's merge last, where its finished shards are: as its last run recorded
        it (None: any node will do), or, for a run that recorded nothing (interrupted), its last successful one."""
        for run in (self._state.last_run(target), self._state.last_successful_run(target)):
            if run is not None and run.record.node is not None:
                return run.record.node
        return None

    def _last_run(self, target: str) -> dict | None:
        """What the child reads from the state beside a local daemon: the last successful run, unless a
        `mergebot release` waives the comparison with it."""
        if target in self._state.releases():
            return None
        last = self._state.last_successful_run(target)
        return run_as_dict(last) if last else None


def _check_reachable(address: str) -> None:
    """`ray.init` waits minutes for a cluster that is not there; a TCP connection says so in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # such as 'auto': Ray finds a cluster on this machine
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(f"daemon.ray.address {address!r}: cannot connect: {error.strerror or error}") from error


def _first_line(error: BaseException) -> str:
    """An error's gist in one line; for a RayTaskError, that of the exception raised on the worker."""
    error = getattr(error, "cause", None) or error
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@ray.remote(max_concurrency=2, max_restarts=0, max_task_retries=0)
class _Worker:
    """The worker's side of one run; two threads, so that `stop` is heard while `run` waits for the child."""

    def __init__(self) -> None:
        self._children = Children()

    def run(
        self,
        config_path: str,
        config_text: str,
        target: str,
        timeout: float,
        pinned: dict[str, str],
        run_id: int,
        last_run: dict | None,
        key: str,
        work_dir: str | None,
        disk: int | None,
    ) -> tuple[int, RunRecord, str | None]:
        """(exit code, result, the node to prefer for the target's next run, None for any)."""
        node = ray.get_runtime_context().get_node_id()
        state_dir = Path(work_dir or Path(tempfile.gettempdir()) / "mergebot-ray") / key
        state_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(state_dir).free
        if disk is not None and free < disk:
            where = f"{socket.gethostname()}:{state_dir}"
            reason = f"{where} has {free:,} bytes free, less than daemon.ray.disk ({disk:,} bytes)"
            return ExitCode.RETRY_LATER, RunRecord(reason=reason), None
        with tempfile.TemporaryDirectory(prefix="mergebot-run-") as temp:
            record = Path(temp) / "last-run.json"
            write_json_atomic(record, last_run)
            finished = self._children.run(
                Path(config_path),
                config_text,
                target,
                timeout,
                pinned,
                run_id,
                args=["--last-run", str(record)],
                env={STATE_DIR_ENV: str(state_dir)},
            )
        if finished is None:
            return ExitCode.INTERRUPTED, RunRecord(reason="stopped before the run began"), node
        code, result = finished
        return code, result, node

    def stop(self, grace: float) -> None:
        self._children.stop_all(grace)
