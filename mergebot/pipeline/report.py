"""The validation report: every check the gate made and the figures it saw, and the plain-text table the CLI
prints and the daemon logs."""

from dataclasses import dataclass, field
from pathlib import Path

from mergebot.config.daemon import ValidateSettings
from mergebot.pipeline.parents import ParentResult
from mergebot.pipeline.probe import ProbeResult


@dataclass(frozen=True)
class Check:
    """One line of the report: a failed check blocks publishing; `detail` says what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ValidationReport:
    """Everything the gate saw, for the CLI table, the model card and the run record."""

    out_dir: Path
    checks: list[Check]
    settings: ValidateSettings = field(default_factory=ValidateSettings)
    merge_ppl: float | None = None
    parents: list[ParentResult] = field(default_factory=list)
    kl: dict[str, float] = field(default_factory=dict)
    """Mean KL divergence (nats per token) of the merge's predictions from each parent's that shares its tokens."""
    suspects: dict[str, str] = field(default_factory=dict)
    """Parents far worse than the others, and why: the gate refuses a merge of them."""
    worst_parent_ppl: float | None = None
    """The worst healthy parent's perplexity, which the merge's is judged against."""
    ratio: float | None = None
    limit: float | None = None  # perplexity limit: max_ppl_ratio × worst_parent_ppl
    eval_tokens: int = 0
    windows: int = 0
    peak_rss_mb: float = 0.0
    probe: ProbeResult | None = None
    """The merge's behaviour probe (None without a chat template); each parent's is in its ParentResult."""
    facts: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per parent, what the consistency checks read from its files (`mergebot.pipeline.consistency`)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def failure_summary(self) -> str:
        """One line naming every failed check and why."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failed_checks)

    @property
    def nearest_parent(self) -> str | None:
        return min(self.kl, key=self.kl.__getitem__) if self.kl else None


def format_report(report: ValidationReport) -> str:
    """Every check, then the perplexities, then peak memory."""
    lines = [f"validate {report.out_dir}: {'PASSED' if report.passed else 'FAILED'}"]
    width = max([len(c.name) for c in report.checks] + [5])
    lines.append(f"  {'check':<{width}}  result  detail")
    lines += [f"  {c.name:<{width}}  {'ok' if c.passed else 'FAIL':<6}  {c.detail}" for c in report.checks]
    if report.merge_ppl is not None:
        rows = [("merge", report.merge_ppl, "")]
        rows += [
            (
                p.name,
                p.ppl,
                p.revision + (" (cached)" if p.cached else "") + (" SUSPECT" if p.name in report.suspects else ""),
            )
            for p in report.parents
        ]
        name_w = max(len(r[0]) for r in rows)
        lines.append("")
        lines.append(f"  {'model':<{name_w}}  {'perplexity':>12}  revision")
        lines += [f"  {name:<{name_w}}  {ppl:>12.3f}  {rev}".rstrip() for name, ppl, rev in rows]
        if report.limit is not None:
            lines.append(
                f"  ratio to worst healthy parent {report.ratio:.3f}, limit {report.settings.max_ppl_ratio} "
                f"(perplexity {report.limit:.3f})"
            )
        lines += [f"  KL from {name} {value:.4f} nats/token" for name, value in report.kl.items()]
    probes = [("merge", report.probe)] + [(p.name, p.probe) for p in report.parents]
    probes = [(name, probe) for name, probe in probes if probe is not None]
    if probes:
        name_w = max(len(name) for name, _ in probes)
        lines.append("")
        lines.append(f"  {'model':<{name_w}}  {'stops':>7}  {'P(end of turn)':>14}")
        lines += [
            f"  {name:<{name_w}}  {sum(p.stopped):>3}/{len(p.stopped):<3}  {p.mean_eot_prob:>14.3f}"
            for name, p in probes
        ]
    lines.append(f"  peak RSS {report.peak_rss_mb:.0f} MB")
    return "\n".join(lines)
