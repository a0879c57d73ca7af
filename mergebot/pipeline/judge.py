"""Judging a measured merge against its parents: a parent far worse than the others is suspect (and the merge of
it refused), the merge's perplexity is held to the worst healthy parent's, and its next-token distribution to its
nearest parent's."""

import math
from dataclasses import replace

from mergebot.files import short_identity
from mergebot.pipeline.behaviour import behaviour_checks
from mergebot.pipeline.parents import ParentResult
from mergebot.pipeline.report import Check, ValidationReport


def judge(
    report: ValidationReport, parents: list[ParentResult], kl: dict[str, float], damaged: dict[str, str]
) -> ValidationReport:
    """The checks against the parents: none of them suspect (by perplexity, or by `damaged`: weights far from
    every other model's), the merge's perplexity within the limit of the worst healthy parent's, its predictions
    close to its nearest parent's, and it ends its turn about as often as its best healthy parent (the last three
    only for a merge that could be measured)."""
    if not parents:
        if report.merge_ppl is None:
            return report
        check = Check("perplexity", True, f"{report.merge_ppl:.3f} (no parents to compare with)")
        behaviour = behaviour_checks(report.probe, [], set(), report.settings)
        return replace(report, checks=[*report.checks, check, *behaviour])
    suspects = _suspects(parents, report.settings.max_parent_ratio)
    suspects |= {name: why for name, why in damaged.items() if name not in suspects}
    healthy = [p for p in parents if p.name not in suspects]
    checks = [*report.checks, _parents_check(parents, suspects)]
    report = replace(report, parents=parents, suspects=suspects, kl={k: v for k, v in kl.items() if k not in suspects})
    if report.merge_ppl is None:  # the merge could not be measured: its own failed check says why
        return replace(report, checks=checks)
    if not healthy:
        checks.append(Check("perplexity", False, "no healthy parent to compare with"))
        return replace(report, checks=checks)
    worst = max(p.ppl for p in healthy)
    limit = report.settings.max_ppl_ratio * worst
    ratio = report.merge_ppl / worst
    ok = report.merge_ppl <= limit
    detail = (
        f"{report.merge_ppl:.3f} {'<=' if ok else '>'} limit {limit:.3f} "
        f"({report.settings.max_ppl_ratio} x worst healthy parent {worst:.3f}; ratio {ratio:.3f})"
    )
    checks.append(Check("perplexity", ok, detail))
    if report.kl:
        checks.append(_kl_check(report))
    checks += behaviour_checks(report.probe, parents, set(suspects), report.settings)
    return replace(report, checks=checks, worst_parent_ppl=worst, ratio=ratio, limit=limit)


def _suspects(parents: list[ParentResult], max_ratio: float) -> dict[str, str]:
    """Parents whose perplexity is not finite, or far above the best parent's: a broken upload, not a merge input."""
    finite = [p for p in parents if math.isfinite(p.ppl)]
    best = min(finite, key=lambda p: p.ppl) if finite else None
    suspects = {}
    for parent in parents:
        label = f"{parent.name}@{short_identity(parent.revision)}"
        if not math.isfinite(parent.ppl):
            suspects[parent.name] = f"{label}: perplexity is not finite (NaN or inf in its weights?)"
        elif best is not None and parent.ppl > max_ratio * best.ppl:
            suspects[parent.name] = (
                f"{label}: perplexity {parent.ppl:,.1f} is {parent.ppl / best.ppl:,.0f}x {best.name}'s "
                f"{best.ppl:,.1f}; a broken upload?"
            )
    return suspects


def _parents_check(parents: list[ParentResult], suspects: dict[str, str]) -> Check:
    if suspects:
        return Check("parents", False, "; ".join(suspects.values()))
    ppls = sorted(p.ppl for p in parents)
    return Check("parents", True, f"{len(parents)} healthy, perplexity {ppls[0]:,.3f} to {ppls[-1]:,.3f}")


def _kl_check(report: ValidationReport) -> Check:
    nearest = report.nearest_parent
    assert nearest is not None
    value, limit = report.kl[nearest], report.settings.max_kl
    ok = value <= limit
    detail = f"{value:.4f} nats/token from the nearest parent {nearest} {'<=' if ok else '>'} limit {limit}"
    return Check("kl divergence", ok, detail)
