"""A pipeline run as the state database records it: its outcome, its inputs and the record its child wrote.

Apart from `state.py` so that the database's machinery and the meaning of one row each fit in a module.
"""

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

Outcome = Literal["published", "failed", "unchanged", "interrupted", "held"]
"""`held`: the regression check against the last publish refused the merge; nothing was uploaded."""
OUTCOMES: tuple[str, ...] = get_args(Outcome)
# What a run is before it finishes; a run still in this state on daemon start-up belongs to a dead process.
RUNNING = "running"

RUN_COLUMNS = "id, target, config_hash, started, finished, outcome, reason, transient, published_sha, details"


@dataclass(frozen=True)
class Run:
    """One pipeline run of a target. `outcome` is "running" until `finish_run` (or `mark_interrupted_runs`)."""

    id: int
    target: str
    config_hash: str
    inputs: dict[str, str]  # repo id or local path -> sha
    started: float
    finished: float | None
    outcome: Outcome | Literal["running"]
    reason: str | None
    transient: bool
    published_sha: str | None
    details: dict[str, Any] | None


def run_from_row(row: tuple[Any, ...], inputs: dict[str, str]) -> Run:
    """A Run from a row of RUN_COLUMNS and its inputs."""
    run_id, target, config_hash, started, finished, outcome, reason, transient, published_sha, details = row
    return Run(
        id=run_id,
        target=target,
        config_hash=config_hash,
        inputs=inputs,
        started=started,
        finished=finished,
        outcome=outcome,
        reason=reason,
        transient=bool(transient),
        published_sha=published_sha,
        details=None if details is None else json.loads(details),
    )
