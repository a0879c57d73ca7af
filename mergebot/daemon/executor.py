"""Where the daemon's runs happen, behind one contract so the scheduler need not know: a `mergebot run-target` child
beside the daemon (`children.Children`), or the same child on a Ray worker (`ray_executor.RayExecutor`)."""

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from mergebot.config.daemon import DaemonSettings
from mergebot.daemon.children import Children
from mergebot.daemon.state import State
from mergebot.runrecord import RunRecord


class Executor(Protocol):
    def run(
        self, config_path: Path, config_text: str, target: str, timeout: float, pinned: Mapping[str, str], run_id: int
    ) -> tuple[int, RunRecord] | None:
        """One run of `target` merging the `pinned` revisions (model -> sha): the child's exit code and the record
        it wrote, (-SIGKILL, reason) past `timeout`; None when stopping began and nothing was started."""
        ...

    def stop_all(self, grace: float) -> None:
        """SIGTERM every running child, SIGKILL what is left after `grace`; nothing new starts after this."""
        ...


def start_executor(settings: DaemonSettings, state: State) -> Executor:
    """The executor the config names; Ray is imported (and the cluster connected to) only for executor = "ray"."""
    if settings.ray is None:
        return Children()
    from mergebot.daemon.ray_executor import RayExecutor

    return RayExecutor(settings.ray, settings.state_dir, state)
