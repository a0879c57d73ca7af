"""One target, once: fetch → merge → validate → publish. The daemon runs this in a child process.

The merged directory lives in the state dir and is kept between runs, so the next run reuses every shard whose
inputs did not change and resumes after a crash.
"""

import time
from collections.abc import Mapping
from pathlib import Path

from mergebot import log
from mergebot.config import chain
from mergebot.config.daemon import DaemonConfig, Target, ValidateSettings
from mergebot.config.merge import MergeConfig
from mergebot.config.moe import MoeConfig
from mergebot.hub.endpoints import publisher, reader
from mergebot.merge.engine import MergeResult, run_merge
from mergebot.merge.moe import run_moe
from mergebot.merge.source import InputModel
from mergebot.pause import pause_point
from mergebot.pipeline.gate import validate
from mergebot.pipeline.gguf_step import GgufFiles, make_gguf, mark_published, publish_elsewhere
from mergebot.pipeline.inputs import identities, pin_inputs, resolve_inputs
from mergebot.pipeline.moe_hidden import ALL_ROUTERS
from mergebot.pipeline.parents import Parent, SignatureCache
from mergebot.pipeline.publish import publish
from mergebot.pipeline.regression import Baseline, held_reason
from mergebot.pipeline.report import ValidationReport, format_report
from mergebot.progress import ShardProgress
from mergebot.runrecord import RUN_TRAILER, Figures, Outcome, RunRecord


def merged_dir(config: DaemonConfig, target: Target) -> Path:
    return chain.merged_dir(config.daemon.state_dir, target.name)


def gguf_dir(config: DaemonConfig, target: Target) -> Path:
    """Where a target's GGUF files are made, checked and kept between runs (never the published tree)."""
    return merged_dir(config, target).with_name("gguf")


def check_merge(
    out_dir: Path, models: dict[str, InputModel], settings: ValidateSettings, cache: SignatureCache | None
) -> ValidationReport:
    """The gate, with every input model as a parent to compare against, known by its identity."""
    revisions = identities(models)
    parents = {name: Parent(model.path, revisions[name], model) for name, model in models.items()}
    return validate(out_dir, settings=settings, parents=parents, cache=cache)


def _merge(config: MergeConfig | MoeConfig, models: dict[str, InputModel], out_dir: Path) -> MergeResult:
    if isinstance(config, MoeConfig):
        return run_moe(config, models, out_dir, ShardProgress(), ALL_ROUTERS)
    return run_merge(config, models, out_dir, ShardProgress())


def run_pipeline(
    config: DaemonConfig,
    target: Target,
    cache: SignatureCache | None,
    baseline: Baseline | None,
    pinned: Mapping[str, str] | None = None,
    run_id: int | None = None,
) -> RunRecord:
    """Run the whole pipeline for one target. A merge the gate refuses, or one the regression check against
    `baseline` (the last publish) holds, is not published: the run says why, and which input is to blame.
    `pinned`: the revisions the daemon resolved, merged as they are; `run_id`: named in the commit."""
    started = time.monotonic()
    logger = log.get("pipeline").bind(target=target.name)
    upstream = reader(config.daemon)
    run = RunRecord()
    merge_config = target.merge if pinned is None else pin_inputs(target.merge, pinned)
    models = resolve_inputs(merge_config, upstream)
    run.inputs = identities(models)
    run.downloaded_bytes = upstream.downloaded_bytes
    logger.info("inputs resolved", inputs=run.inputs)
    out_dir = merged_dir(config, target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    merge = _merge(merge_config, models, out_dir)
    run.computed, run.reused, run.fingerprints = merge.computed, merge.reused, merge.fingerprints
    logger.info("merged", computed=len(merge.computed), reused=len(merge.reused))
    report = check_merge(out_dir, models, target.validate, cache)
    parent_ppl = {parent.name: parent.ppl for parent in report.parents}
    run.figures = Figures(merge_ppl=report.merge_ppl, parent_ppl=parent_ppl, kl=report.kl)
    if report.probe is not None:
        run.figures["stop_rate"], run.figures["eot_prob"] = report.probe.stop_rate, report.probe.mean_eot_prob
    run.figures["parent_stop_rate"] = {p.name: p.probe.stop_rate if p.probe else None for p in report.parents}
    run.figures["input_facts"] = report.facts
    run.seconds = round(time.monotonic() - started, 3)
    hold = held_reason(baseline, report, run.inputs, target.validate) if baseline else None
    if hold is not None:
        run.outcome, run.reason, run.culprit = Outcome.HELD, hold.reason, hold.culprit
        logger.warning("held", reason=hold.reason, report=format_report(report))
        return run
    if not report.passed:
        run.reason = f"validation of {out_dir} failed: {report.failure_summary}"
        run.culprit = next(iter(report.suspects), None)
        logger.warning("validation failed", report=format_report(report))
        return run
    gguf = GgufFiles({}, {})
    if target.gguf is not None:
        gguf = make_gguf(out_dir, gguf_dir(config, target), target.gguf, run.fingerprints, target.validate, report)
        run.gguf = gguf.results
    beside = target.gguf is not None and target.gguf.repo == target.repo
    merged = target.merge.pinned({name: model.pins for name, model in models.items()})
    hub = publisher(config.daemon)
    trailer = f"{RUN_TRAILER}: {run_id}" if run_id is not None else ""
    result = publish(
        out_dir, target.repo, hub, report, merged, private=target.private, description=trailer, gguf=run.gguf,
        gguf_files=gguf.passed if beside else None,
    )  # fmt: skip
    pause_point("published")
    results = [result]
    if beside:
        mark_published(gguf)
    elif target.gguf is not None:
        sibling = publish_elsewhere(gguf, target.gguf, hub, merged, result, private=target.private, description=trailer)
        results += [sibling] if sibling is not None else []
    run.published_sha = result.commit
    run.uploaded = [name for done in results for name in done.uploaded]
    run.uploaded_bytes = hub.uploaded_bytes
    changed = any(done.uploaded or done.deleted for done in results)
    run.outcome = Outcome.PUBLISHED if changed else Outcome.UNCHANGED
    run.seconds = round(time.monotonic() - started, 3)
    logger.info("published", repo=target.repo, sha=result.commit, uploaded=len(result.uploaded))
    return run
