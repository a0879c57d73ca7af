"""One target, once: fetch → merge → validate → publish. The daemon runs this in a child process.

The merged directory lives in the state dir and is kept between runs, so the next run reuses every shard whose
inputs did not change and resumes after a crash.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergebot import log
from mergebot.config.daemon import DaemonConfig, Target
from mergebot.daemon.state import State
from mergebot.errors import StateError
from mergebot.hub.client import HubClient
from mergebot.merge.engine import run_merge
from mergebot.merge.source import InputModel
from mergebot.pipeline.gate import PerplexityCache, ValidationReport, format_report, validate
from mergebot.pipeline.inputs import resolve_inputs
from mergebot.pipeline.publish import publish
from mergebot.progress import ShardProgress


@dataclass
class TargetRun:
    """What a run did, written as JSON for the daemon to record."""

    target: str
    inputs: dict[str, str] = field(default_factory=dict)
    outcome: str = "failed"
    reason: str | None = None
    published_sha: str | None = None
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    merge_ppl: float | None = None
    parent_ppl: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def merged_dir(config: DaemonConfig, target: Target) -> Path:
    return config.daemon.state_dir / "targets" / target.name / "merged"


def input_revisions(models: dict[str, InputModel]) -> dict[str, str]:
    """model → the commit sha merged (Hub), or a digest of the weight files (local directory)."""
    return {name: model.revision or ":".join(sorted(model.file_sha256.values()))[:64] for name, model in models.items()}


@dataclass(frozen=True)
class StatePerplexityCache:
    """validate's PerplexityCache in the state database's parent_perplexity table. The cache is an optimisation,
    so a database error is logged and counts as a miss (get) or is dropped (put), never failing the run."""

    state: State

    def get(self, name: str, revision: str, measure: str) -> float | None:
        try:
            return self.state.parent_perplexity(name, revision, measure)
        except StateError as error:
            log.get("pipeline").warning("parent perplexity cache unreadable", error=str(error))
            return None

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None:
        try:
            self.state.record_parent_perplexity(name, revision, measure, ppl)
        except StateError as error:
            log.get("pipeline").warning("parent perplexity not cached", error=str(error))


def check_merge(
    out_dir: Path,
    models: dict[str, InputModel],
    eval_text: Path,
    max_ppl_ratio: float,
    cache: PerplexityCache | None,
) -> ValidationReport:
    """The gate, with every input model as a parent to compare against."""
    return validate(
        out_dir,
        eval_text_path=eval_text,
        parents={name: model.path for name, model in models.items()},
        parent_revisions={name: model.revision for name, model in models.items() if model.revision},
        max_ppl_ratio=max_ppl_ratio,
        cache=cache,
    )


def run_target(config: DaemonConfig, target: Target) -> TargetRun:
    """Run the whole pipeline for one target; a validation failure raises ValidationFailed after recording why."""
    started = time.monotonic()
    logger = log.get("pipeline").bind(target=target.name)
    hub = HubClient(endpoint=config.daemon.hub_endpoint)
    run = TargetRun(target.name)
    models = resolve_inputs(target.merge, hub)
    run.inputs = input_revisions(models)
    logger.info("inputs resolved", inputs=run.inputs)
    out_dir = merged_dir(config, target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    merge = run_merge(target.merge, models, out_dir, ShardProgress())
    run.computed, run.reused, run.fingerprints = merge.computed, merge.reused, merge.fingerprints
    logger.info("merged", computed=len(merge.computed), reused=len(merge.reused))
    # Beside the running daemon: WAL lets it read meanwhile, and the busy timeout waits out its short writes.
    with State.open(config.daemon.state_dir) as state:
        report = check_merge(
            out_dir,
            models,
            target.validate.eval_text,
            target.validate.max_ppl_ratio,
            StatePerplexityCache(state),
        )
    run.merge_ppl = report.merge_ppl
    run.parent_ppl = {parent.name: parent.ppl for parent in report.parents}
    if not report.passed:
        logger.warning("validation failed", report=format_report(report))
    report.raise_if_failed()
    result = publish(out_dir, target.repo, hub, report, private=target.private)
    run.published_sha = result.commit
    run.uploaded = result.uploaded
    run.outcome = "published" if result.uploaded or result.deleted else "unchanged"
    run.seconds = round(time.monotonic() - started, 3)
    logger.info("published", repo=target.repo, sha=result.commit, uploaded=len(result.uploaded))
    return run
