"""Judging the merge's probe against its parents': a merge that ends its turn far less often than its best healthy
parent, or gives its end-of-turn token far less probability after an answer, is what a user calls "never stops".
The best parent sets the bar, so a damaged parent that stops rarely cannot lower it."""

from mergebot.config.daemon import ValidateSettings
from mergebot.pipeline.parents import ParentResult
from mergebot.pipeline.probe import ProbeResult
from mergebot.pipeline.report import Check


def behaviour_checks(
    merge: ProbeResult | None, parents: list[ParentResult], suspects: set[str], settings: ValidateSettings
) -> list[Check]:
    """The stop-rate and end-of-turn checks; none when neither the merge nor any parent could be probed."""
    probed = [p for p in parents if p.probe is not None]
    if merge is None:
        if not probed:
            return []
        names = ", ".join(p.name for p in probed)
        detail = f"the merge has no usable chat template or end-of-turn token to probe; {names} do"
        return [Check("stops", False, detail)]
    healthy = [p for p in probed if p.name not in suspects]
    if not healthy:
        return [Check("stops", True, f"{_rate(merge)} (no healthy parent probed to compare with)")]
    best = max(healthy, key=lambda p: p.probe.stop_rate)
    limit = settings.min_stop_ratio * best.probe.stop_rate
    ok = merge.stop_rate >= limit
    detail = (
        f"ends its turn on {_rate(merge)} {'>=' if ok else '<'} limit {limit:.0%} "
        f"({settings.min_stop_ratio} x best healthy parent {best.name}'s {_rate(best.probe)})"
    )
    checks = [Check("stops", ok, detail)]
    best = max(healthy, key=lambda p: p.probe.mean_eot_prob)
    limit = settings.min_eot_ratio * best.probe.mean_eot_prob
    ok = merge.mean_eot_prob >= limit
    detail = (
        f"P(end of turn after an answer) {merge.mean_eot_prob:.3f} {'>=' if ok else '<'} limit {limit:.3f} "
        f"({settings.min_eot_ratio} x best healthy parent {best.name}'s {best.probe.mean_eot_prob:.3f})"
    )
    checks.append(Check("end-of-turn probability", ok, detail))
    return checks


def _rate(probe: ProbeResult) -> str:
    return f"{sum(probe.stopped)}/{len(probe.stopped)} prompts ({probe.stop_rate:.0%})"
