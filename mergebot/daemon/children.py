"""The daemon's merge children, and the contract between the two: a child runs one target's pipeline with the
config text the daemon accepted (on stdin) and the input revisions the daemon resolved (pinned: the child merges
exactly these, never resolving a branch again), and must not outlive its daemon.

The merge child imports this module only to call `die_with_daemon` as early as it can, so it imports nothing
beyond the standard library and mergebot's lowest layers (no apscheduler, no HTTP server).
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergebot.errors import ExitCode, StateError
from mergebot.runrecord import RunRecord, from_json

DAEMON_PID = "MERGEBOT_DAEMON_PID"
"""Tells a merge child which process it must not outlive (the daemon may itself be pid 1 in a container)."""
PR_SET_PDEATHSIG = 1


def die_with_daemon() -> None:
    """Called in a merge child: it must not outlive its daemon (a SIGKILLed daemon's child would race the next
    daemon's run of the same target)."""
    daemon = os.environ.get(DAEMON_PID)
    if sys.platform == "linux" and daemon:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(daemon):
            sys.exit(ExitCode.PARENT_GONE)


def stop_process(process: subprocess.Popen | None, grace: float) -> None:
    """Ask the process to stop, wait up to `grace` seconds, then kill it; a finished process is left alone."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Children:
    """The running merge children of one daemon; once `stop_all` began, no new one starts."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def run(
        self,
        config_path: Path,
        config_text: str,
        target: str,
        timeout: float,
        pinned: Mapping[str, str],
        run_id: int,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, RunRecord] | None:
        """One run of `target` in a child: its exit code and the record it wrote; None when the daemon is
        stopping and no child was started. `pinned`: model -> the revision the daemon resolved, which the child
        merges; `run_id` goes into the commit it publishes. `args` and `env`: more for the child (on a Ray worker:
        where its state is)."""
        with tempfile.TemporaryDirectory(prefix="mergebot-run-") as temp:
            result_path = Path(temp) / "result.json"
            inputs_path = Path(temp) / "inputs.json"
            inputs_path.write_text(json.dumps(dict(pinned)))
            command = [
                sys.executable, "-m", "mergebot.cli", "run-target",
                "--config", str(config_path), "--target", target, "--result", str(result_path),
                "--inputs", str(inputs_path), "--run-id", str(run_id), *args,
            ]  # fmt: skip
            with self._lock:
                if self._stopped:
                    return None
                child = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    text=True,
                    env=os.environ | {DAEMON_PID: str(os.getpid())} | dict(env or {}),
                )
                self._running.add(child)
            try:
                child.communicate(config_text, timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return -signal.SIGKILL, RunRecord(reason=f"merge_timeout of {timeout:.0f} s exceeded")
            finally:
                with self._lock:
                    self._running.discard(child)
            return child.returncode, _read_record(result_path)

    def stop_all(self, grace: float) -> None:
        """SIGTERM every child at once (each stops at a shard boundary), then SIGKILL what is left after `grace`."""
        with self._lock:
            self._stopped = True
            children = list(self._running)
        deadline = time.monotonic() + grace
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            stop_process(child, max(0.0, deadline - time.monotonic()))


def _read_record(path: Path) -> RunRecord:
    """The record the child wrote; none (a child killed before it wrote one) or an unreadable one says so."""
    if not path.exists():
        return RunRecord()
    try:
        return from_json(path.read_bytes())
    except StateError as error:
        return RunRecord(reason=f"the merge child's record: {error}")
