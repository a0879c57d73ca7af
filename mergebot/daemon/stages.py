"""When a target that reads another target's merge (`target:NAME`, see `mergebot.config.chain`) may run.

A reader runs only on a merge that passed: not while the target it reads is due or running (its merged directory
is about to change; the reader is looked at again when that run ends), and not while that target's last run
failed or was held (its merged directory then holds a merge that was not published). A target does not start
while a reader of it is running, since its run would replace the files under that reader.
"""

from collections.abc import Callable

from mergebot.config.daemon import DaemonConfig, Target
from mergebot.config.models import TARGET_PREFIX
from mergebot.daemon.runs import RUNNING
from mergebot.daemon.state import State, TargetState
from mergebot.runrecord import SUCCESSFUL


def reference(target: str) -> str:
    """How a reader names the target: what a check of the target's readers is asked for."""
    return f"{TARGET_PREFIX}{target}"


def waits_for_upstream(target: Target, state: State, pending: Callable[[str], bool], next_check: float | None) -> bool:
    """Whether `target` must wait for a target it reads (its status then says which and why); `pending`: whether
    a run of a target is scheduled or under way."""
    waiting = _upstream_wait(target, state, pending)
    if waiting is not None:
        state.set_target_status(target.name, TargetState.WAITING_FOR_CHANGE, waiting, next_check)
    return waiting is not None


def _upstream_wait(target: Target, state: State, pending: Callable[[str], bool]) -> str | None:
    for name in target.reads:
        if pending(name):
            return f"waits for target {name}, which it reads: that runs first"
        last = state.last_run(name)
        if last is None:
            return f"waits for target {name}, which it reads, to make its first merge"
        if last.outcome not in SUCCESSFUL:
            return f"waits for target {name}, which it reads: its last run {last.outcome} ({last.reason})"
    return None


def running_reader(target: Target, config: DaemonConfig, state: State) -> str | None:
    """A target reading `target`'s merge that is running now, or None."""
    for reader in config.targets.values():
        last = state.last_run(reader.name) if target.name in reader.reads else None
        if last is not None and last.outcome == RUNNING:
            return reader.name
    return None
