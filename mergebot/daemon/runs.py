"""A pipeline run as the state database records it: its outcome, its inputs and the record its child wrote.

Apart from `state.py` so that the database's machinery and the meaning of one row each fit in a module.
"""

from dataclasses import asdict, dataclass
from typing import Any, Literal

from mergebot.runrecord import Outcome, RunRecord, from_json, to_json

OUTCOMES: tuple[str, ...] = tuple(Outcome)
# What a run is before it finishes; a run still in this state on daemon start-up belongs to a dead process.
RUNNING = "running"

RUN_COLUMNS = "id, target, config_hash, started, finished, outcome, reason, transient, published_sha, details"


@dataclass(frozen=True)
class Run:
    """One pipeline run of a target. `outcome` is "running" until `finish_run` (or `mark_interrupted_runs`);
    `record` is what the daemon knew when it started the run until then, and the child's record after."""

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
    record: RunRecord


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
        outcome=outcome if outcome == RUNNING else Outcome(outcome),
        reason=reason,
        transient=bool(transient),
        published_sha=published_sha,
        record=RunRecord() if details is None else from_json(details),
    )


def run_as_dict(run: Run) -> dict[str, Any]:
    """A run as JSON can carry it (to a merge child on a Ray worker, which cannot read the daemon's state)."""
    return asdict(run) | {"record": to_json(run.record)}


def run_from_dict(data: dict[str, Any]) -> Run:
    return Run(**(data | {"record": from_json(data["record"])}))
