"""One target, once: fetch → merge → validate → publish. The daemon runs this in a child process.

The merged directory lives in the state dir and is kept between runs, so the next run reuses every shard whose
inputs did not change and resumes after a crash.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergebot import log
from mergebot.config.daemon import DaemonConfig, Target
from mergebot.hub.client import HubClient
from mergebot.merge.engine import run_merge
from mergebot.merge.source import InputModel
from mergebot.pipeline.gate import ValidationReport, validate
from mergebot.pipeline.inputs import identities, resolve_inputs
from mergebot.pipeline.perplexity import Parent, PerplexityCache
from mergebot.pipeline.publish import publish
from mergebot.pipeline.report import format_report
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


def check_merge(
    out_dir: Path,
    models: dict[str, InputModel],
    eval_text: Path,
    max_ppl_ratio: float,
    cache: PerplexityCache | None,
) -> ValidationReport:
    """The gate, with every input model as a parent to compare against, known by its identity."""
    revisions = identities(models)
    return validate(
        out_dir,
        eval_text_path=eval_text,
        parents={name: Parent(model.path, revisions[name]) for name, model in models.items()},
        max_ppl_ratio=max_ppl_ratio,
        cache=cache,
    )


def run_pipeline(config: DaemonConfig, target: Target, cache: PerplexityCache | None) -> TargetRun:
    """Run the whole pipeline for one target; a validation failure raises ValidationFailed after recording why.

    `cache` keeps parent perplexities between runs (the daemon's state database, for the daemon's child)."""
    started = time.monotonic()
    logger = log.get("pipeline").bind(target=target.name)
    hub = HubClient(endpoint=config.daemon.hub_endpoint)
    run = TargetRun(target.name)
    models = resolve_inputs(target.merge, hub)
    run.inputs = identities(models)
    logger.info("inputs resolved", inputs=run.inputs)
    out_dir = merged_dir(config, target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    merge = run_merge(target.merge, models, out_dir, ShardProgress())
    run.computed, run.reused, run.fingerprints = merge.computed, merge.reused, merge.fingerprints
    logger.info("merged", computed=len(merge.computed), reused=len(merge.reused))
    report = check_merge(out_dir, models, target.validate.eval_text, target.validate.max_ppl_ratio, cache)
    run.merge_ppl = report.merge_ppl
    run.parent_ppl = {parent.name: parent.ppl for parent in report.parents}
    if not report.passed:
        logger.warning("validation failed", report=format_report(report))
    report.raise_if_failed()
    merged = target.merge.pinned({name: model.revision for name, model in models.items()})
    result = publish(out_dir, target.repo, hub, report, merged, private=target.private)
    run.published_sha = result.commit
    run.uploaded = result.uploaded
    run.outcome = "published" if result.uploaded or result.deleted else "unchanged"
    run.seconds = round(time.monotonic() - started, 3)
    logger.info("published", repo=target.repo, sha=result.commit, uploaded=len(result.uploaded))
    return run
