"""The runs a dead daemon left "running". A run whose commit reached the Hub before the daemon (or its child) was
killed, its record lost, is mergebot's own publish: its commit names the run (`runrecord.RUN_TRAILER`), so it is
recorded as published and announced, rather than found "unchanged" by the next run and never announced.
"""

from collections.abc import Callable
from dataclasses import replace

from mergebot import log
from mergebot.config.daemon import DaemonConfig
from mergebot.daemon.runs import Run
from mergebot.daemon.state import State
from mergebot.errors import MergebotError
from mergebot.hub.client import HubClient
from mergebot.runrecord import RUN_TRAILER, Outcome

CLOCK_SLACK_S = 3600.0
"""A commit older than its run's start (by the Hub's clock against ours) is not that run's, whatever it names: a
state directory started afresh numbers its runs from 1 again."""


def recover_runs(config: DaemonConfig, state: State, hub: HubClient, announce: Callable[[Run], None]) -> None:
    """Record each run left "running" whose commit is its target repo's head as published, and `announce` it; mark
    the others interrupted (they run again). Call it on start-up, holding the daemon lock. A Hub that cannot be
    asked leaves the run to be marked interrupted, as before."""
    logger = log.get("daemon")
    for run in state.running_runs():
        target = config.targets.get(run.target)
        if target is None:
            continue
        try:
            sha, description, committed = hub.head_commit(target.repo)
        except MergebotError as error:
            logger.warning("cannot look for a lost publish", target=run.target, run=run.id, error=str(error))
            continue
        if f"{RUN_TRAILER}: {run.id}" not in description.splitlines() or committed < run.started - CLOCK_SLACK_S:
            continue
        reason = f"recorded on restart: the head of {target.repo} is this run's commit"
        state.finish_run(run.id, replace(run.record, outcome=Outcome.PUBLISHED, published_sha=sha, reason=reason))
        logger.info("lost publish recovered", target=run.target, run=run.id, sha=sha)
        announce(run)
    for interrupted in state.mark_interrupted_runs():
        logger.warning("interrupted run found", target=interrupted.target, run=interrupted.id)
