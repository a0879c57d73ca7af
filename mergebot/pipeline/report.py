"""The validation report as the plain-text table the CLI prints and the daemon logs."""

from mergebot.pipeline.gate import ValidationReport


def format_report(report: ValidationReport) -> str:
    """Every check, then the perplexities, then peak memory."""
    lines = [f"validate {report.out_dir}: {'PASSED' if report.passed else 'FAILED'}"]
    width = max([len(c.name) for c in report.checks] + [5])
    lines.append(f"  {'check':<{width}}  result  detail")
    lines += [f"  {c.name:<{width}}  {'ok' if c.passed else 'FAIL':<6}  {c.detail}" for c in report.checks]
    if report.merge_ppl is not None:
        rows = [("merge", report.merge_ppl, "")]
        rows += [(p.name, p.ppl, p.revision + (" (cached)" if p.cached else "")) for p in report.parents]
        name_w = max(len(r[0]) for r in rows)
        lines.append("")
        lines.append(f"  {'model':<{name_w}}  {'perplexity':>12}  revision")
        lines += [f"  {name:<{name_w}}  {ppl:>12.3f}  {rev}".rstrip() for name, ppl, rev in rows]
        if report.limit is not None:
            lines.append(
                f"  ratio to worst parent {report.ratio:.3f}, limit {report.max_ppl_ratio} "
                f"(perplexity {report.limit:.3f})"
            )
    lines.append(f"  peak RSS {report.peak_rss_mb:.0f} MB")
    return "\n".join(lines)
