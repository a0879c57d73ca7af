"""What a target needs now, decided from facts alone: the target, what its inputs hold now (their digests) and
what the state says of its runs. A pure function, so that the daemon's polls, `mergebot once` and tests (in
milliseconds) all decide alike; the scheduler only carries the action out.
"""

from dataclasses import dataclass
from datetime import datetime, tzinfo
from enum import StrEnum

from apscheduler.triggers.cron import CronTrigger

from mergebot.config.daemon import Target
from mergebot.daemon.runs import Run
from mergebot.runrecord import REFUSED, Outcome


class Act(StrEnum):
    UP_TO_DATE = "up_to_date"
    """The last successful run read exactly this content and config."""
    RUN = "run"
    WAIT_FOR_WINDOW = "wait_for_window"
    """Due, and nightly: it runs in the next cron window."""
    WAIT_FOR_CHANGE = "wait_for_change"
    """The last run failed for good on exactly this content and config: running it again would fail again."""
    HOLD = "hold"
    """The last run was held on exactly this content and config, and no person released it."""
    RELEASED = "released"
    """Held, and a person released it: the daemon's release watch runs it at once, `once` runs it now."""


@dataclass(frozen=True)
class Facts:
    """What the state says of a target's runs."""

    last: Run | None
    success: Run | None
    """The last run that published or found nothing to change."""
    released: bool
    window_passed: bool
    """A nightly window passed since the last run (the daemon was down or busy): it still counts."""


@dataclass(frozen=True)
class Action:
    act: Act
    why: str | None
    """Why it is due (RUN, WAIT_FOR_WINDOW), or why it waits (WAIT_FOR_CHANGE, HOLD)."""


def decide(target: Target, digests: dict[str, str], facts: Facts, *, now: bool = False) -> Action:
    """The action for `target` whose inputs' content is `digests`; `now`: run a due nightly target without
    waiting for its window (`mergebot once`)."""
    due = due_reason(target, digests, facts.success)
    if due is None:
        return Action(Act.UP_TO_DATE, None)
    last = facts.last
    if last is not None and refused_with(last, target, digests):
        if facts.released:
            return Action(Act.RELEASED, "its hold was released")
        if last.outcome == Outcome.FAILED:
            return Action(
                Act.WAIT_FOR_CHANGE, f"last run failed: {last.reason}; waits for new inputs or a config change"
            )
        return Action(Act.HOLD, last.reason)
    if target.when == "nightly" and not now and not facts.window_passed:
        return Action(Act.WAIT_FOR_WINDOW, due)
    return Action(Act.RUN, due)


def due_reason(target: Target, digests: dict[str, str], success: Run | None) -> str | None:
    """Why the target needs a run, or None when its last successful run read exactly this content and config."""
    if success is None:
        return "never merged"
    if success.config_hash != target.config_hash:
        return "its config changed (merge, validation or GGUF settings)"
    previous = success.record.digests
    changed = sorted(model for model, digest in digests.items() if previous.get(model) != digest)
    if changed:
        return "new upstream content in " + ", ".join(changed)
    return unpublished_gguf(target, success)


def unpublished_gguf(target: Target, success: Run) -> str | None:
    """GGUF files that passed their checks but whose commit to their own repo failed, or that the run did not
    record (a publish recovered after a kill): the next run makes or reuses them and retries the commit."""
    if target.gguf is None:
        return None
    results = success.record.gguf
    missing = [
        t
        for t in target.gguf.types
        if t not in results or (results[t].get("passed") and not results[t].get("published"))
    ]
    return f"its GGUF files {', '.join(missing)} are not in {target.gguf.repo} yet" if missing else None


def refused_with(last: Run, target: Target, digests: dict[str, str]) -> bool:
    """The last run was refused (failed for good, or held) on exactly this content and config."""
    return (
        last.outcome in REFUSED
        and not last.transient
        and last.record.digests == digests
        and last.config_hash == target.config_hash
    )


def window_passed(last: Run | None, schedule: str, timezone: tzinfo) -> bool:
    """Whether a nightly window fired since the last run started (none: no run yet, nothing was missed)."""
    if last is None:
        return False
    since = datetime.fromtimestamp(last.started, timezone)
    fire = CronTrigger.from_crontab(schedule, timezone=timezone).get_next_fire_time(None, since)
    return fire is not None and fire <= datetime.now(timezone)
