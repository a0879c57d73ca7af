"""The daemon's second opinion: a run is compared with the last published merge of its target. An input whose
perplexity jumped since that publish, or a merge clearly worse than the published one, holds the target at its
published revision, even when the merge would pass the gate on its own (a broken parent shifts what "its parents"
means; the last publish does not move)."""

import math
from dataclasses import dataclass, field

from mergebot.config.daemon import ValidateSettings
from mergebot.files import short_identity
from mergebot.pipeline.report import ValidationReport
from mergebot.runrecord import RunRecord


@dataclass(frozen=True)
class Baseline:
    """The last published merge of a target, as its run recorded it."""

    published_sha: str
    merge_ppl: float | None
    """None when the merge itself changed since (its config): a deliberate change is not a regression."""
    inputs: dict[str, tuple[str, float]]
    """model -> (its identity at that publish, its perplexity then)."""
    stop_rate: float | None = None
    """The share of probe prompts the published merge ended its turn on (None: not probed, or config changed)."""
    facts: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    """model -> (its identity at that publish, its template, special tokens and numerics then)."""


@dataclass(frozen=True)
class Hold:
    reason: str
    culprit: str | None


def baseline_from_record(
    published_sha: str | None, inputs: dict[str, str], record: RunRecord, *, same_merge: bool = True
) -> Baseline | None:
    """The baseline from a successful run's record (its input identities and the record it wrote); None when the
    record lacks the figures (a run from before they were recorded). With `same_merge` false (the target's merge
    config changed since), only the inputs are compared."""
    merge_ppl, parent_ppl = record.figures.get("merge_ppl"), record.figures.get("parent_ppl") or {}
    if not published_sha or merge_ppl is None:
        return None
    known = {model: (identity, parent_ppl[model]) for model, identity in inputs.items() if parent_ppl.get(model)}
    merged = float(merge_ppl) if same_merge else None
    stop_rate = record.figures.get("stop_rate") if same_merge else None
    stop_rate = float(stop_rate) if isinstance(stop_rate, int | float) else None
    recorded = record.figures.get("input_facts") or {}
    facts = {
        model: (identity, {str(k): str(v) for k, v in recorded[model].items()})
        for model, identity in inputs.items()
        if isinstance(recorded.get(model), dict)
    }
    return Baseline(published_sha, merged, {model: (i, float(p)) for model, (i, p) in known.items()}, stop_rate, facts)


def held_reason(
    baseline: Baseline, report: ValidationReport, identities: dict[str, str], settings: ValidateSettings
) -> Hold | None:
    """Why this run must not replace the published merge, or None."""
    holding = f"holding at revision {baseline.published_sha[:12]}"
    for parent in report.parents:
        before = baseline.inputs.get(parent.name)
        if before is None or before[0] == identities.get(parent.name):
            continue
        old_identity, old_ppl = before
        if not math.isfinite(parent.ppl) or parent.ppl > settings.max_input_jump * old_ppl:
            new = identities.get(parent.name, parent.revision)
            reason = (
                f"{parent.name}@{short_identity(new)}: perplexity {old_ppl:,.1f} → {parent.ppl:,.1f} "
                f"since the last publish ({short_identity(old_identity)}); {holding}"
            )
            return Hold(reason, parent.name)
    changed = _changed_facts(baseline, report, identities)
    if changed is not None:
        return Hold(f"{changed[1]}; {holding}", changed[0])
    probe, stop_before = report.probe, baseline.stop_rate
    if probe is not None and stop_before and probe.stop_rate < settings.min_stop_ratio * stop_before:
        reason = (
            f"the merge ends its turn on {probe.stop_rate:.0%} of the probe prompts, the last published merge on "
            f"{stop_before:.0%} (limit {settings.min_stop_ratio}x); {holding}"
        )
        return Hold(reason, None)
    merge_ppl, before = report.merge_ppl, baseline.merge_ppl
    if merge_ppl is not None and before is not None and merge_ppl > settings.max_regression * before:
        reason = (
            f"the merge's perplexity {merge_ppl:,.1f} is {merge_ppl / before:.2f}x the last published "
            f"merge's {before:,.1f} (limit {settings.max_regression}x); {holding}"
        )
        return Hold(reason, None)
    return None


def _changed_facts(baseline: Baseline, report: ValidationReport, identities: dict[str, str]) -> tuple[str, str] | None:
    """(input, why) for the first input at a new identity whose chat template, end-of-turn ids or numerics config
    changed since the last publish: a deliberate change upstream still deserves a human's look before it ships."""
    accepted = set(report.settings.accept_config_fields)
    for name, now in report.facts.items():
        before = baseline.facts.get(name)
        if before is None or before[0] == identities.get(name):
            continue
        for key in sorted(set(before[1]) | set(now)):
            old, new = before[1].get(key, "unset"), now.get(key, "unset")
            if old != new and key not in accepted and key.rsplit(".", 1)[-1] not in accepted:
                identity = identities.get(name, "")
                return name, (
                    f"{name}@{short_identity(identity)}: {key} {old} → {new} since the last publish "
                    f"({short_identity(before[0])})"
                )
    return None
