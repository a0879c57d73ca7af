"""One target, once: fetch → merge → validate → publish. The daemon runs this in a child process.

The merged directory lives in the state dir and is kept between runs, so the next run reuses every shard whose
inputs did not change and resumes after a crash.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergebot import log
from mergebot.config import chain
from mergebot.config.daemon import DaemonConfig, Target, ValidateSettings
from mergebot.hub.endpoints import publisher, reader
from mergebot.merge.engine import run_merge
from mergebot.merge.source import InputModel
from mergebot.pipeline.gate import validate
from mergebot.pipeline.inputs import identities, resolve_inputs
from mergebot.pipeline.parents import Parent, SignatureCache
from mergebot.pipeline.publish import publish
from mergebot.pipeline.regression import Baseline, held_reason
from mergebot.pipeline.report import ValidationReport, format_report
from mergebot.progress import ShardProgress


@dataclass
class TargetRun:
    """What a run did, written as JSON for the daemon to record."""

    target: str
    inputs: dict[str, str] = field(default_factory=dict)
    outcome: str = "failed"
    """published, unchanged, failed (the gate refused the merge) or held (worse than the last publish)."""
    reason: str | None = None
    culprit: str | None = None
    """The input blamed for a failed or held run, when one is."""
    published_sha: str | None = None
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    """Fetched from the Hub by this run (files the cache did not hold yet)."""
    uploaded_bytes: int = 0
    merge_ppl: float | None = None
    parent_ppl: dict[str, float | None] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    stop_rate: float | None = None
    """The share of the behaviour probe's prompts the merge ended its turn on (None: not probed)."""
    eot_prob: float | None = None
    """The merge's mean end-of-turn probability after the probe's reference answers."""
    parent_stop_rate: dict[str, float | None] = field(default_factory=dict)
    input_facts: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per input: its chat template digest, end-of-turn ids and numerics config (`mergebot.pipeline.facts`)."""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def merged_dir(config: DaemonConfig, target: Target) -> Path:
    return chain.merged_dir(config.daemon.state_dir, target.name)


def check_merge(
    out_dir: Path, models: dict[str, InputModel], settings: ValidateSettings, cache: SignatureCache | None
) -> ValidationReport:
    """The gate, with every input model as a parent to compare against, known by its identity."""
    revisions = identities(models)
    parents = {name: Parent(model.path, revisions[name], model) for name, model in models.items()}
    return validate(out_dir, settings=settings, parents=parents, cache=cache)


def run_pipeline(
    config: DaemonConfig, target: Target, cache: SignatureCache | None, baseline: Baseline | None
) -> TargetRun:
    """Run the whole pipeline for one target. A merge the gate refuses, or one the regression check against
    `baseline` (the last publish) holds, is not published: the run says why, and which input is to blame."""
    started = time.monotonic()
    logger = log.get("pipeline").bind(target=target.name)
    upstream = reader(config.daemon)
    run = TargetRun(target.name)
    models = resolve_inputs(target.merge, upstream)
    run.inputs = identities(models)
    run.downloaded_bytes = upstream.downloaded_bytes
    logger.info("inputs resolved", inputs=run.inputs)
    out_dir = merged_dir(config, target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    merge = run_merge(target.merge, models, out_dir, ShardProgress())
    run.computed, run.reused, run.fingerprints = merge.computed, merge.reused, merge.fingerprints
    logger.info("merged", computed=len(merge.computed), reused=len(merge.reused))
    report = check_merge(out_dir, models, target.validate, cache)
    run.merge_ppl, run.kl = report.merge_ppl, report.kl
    run.parent_ppl = {parent.name: parent.ppl for parent in report.parents}
    if report.probe is not None:
        run.stop_rate, run.eot_prob = report.probe.stop_rate, report.probe.mean_eot_prob
    run.parent_stop_rate = {p.name: p.probe.stop_rate if p.probe else None for p in report.parents}
    run.input_facts = report.facts
    run.seconds = round(time.monotonic() - started, 3)
    hold = held_reason(baseline, report, run.inputs, target.validate) if baseline else None
    if hold is not None:
        run.outcome, run.reason, run.culprit = "held", hold.reason, hold.culprit
        logger.warning("held", reason=hold.reason, report=format_report(report))
        return run
    if not report.passed:
        run.reason = f"validation of {out_dir} failed: {report.failure_summary}"
        run.culprit = next(iter(report.suspects), None)
        logger.warning("validation failed", report=format_report(report))
        return run
    merged = target.merge.pinned({name: model.pins for name, model in models.items()})
    hub = publisher(config.daemon)
    result = publish(out_dir, target.repo, hub, report, merged, private=target.private)
    run.published_sha = result.commit
    run.uploaded = result.uploaded
    run.uploaded_bytes = hub.uploaded_bytes
    run.outcome = "published" if result.uploaded or result.deleted else "unchanged"
    run.seconds = round(time.monotonic() - started, 3)
    logger.info("published", repo=target.repo, sha=result.commit, uploaded=len(result.uploaded))
    return run
