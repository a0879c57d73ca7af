"""The model card and commit message of a published merge: its lineage, told from the merge config as merged
(each model pinned to the revision that was read)."""

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mergebot.config.merge import MergeConfig, ModelSpec
from mergebot.pipeline.probe import ProbeResult
from mergebot.pipeline.report import ValidationReport


def model_card(merged: MergeConfig, report: ValidationReport, dropped: list[str]) -> str:
    """YAML lineage (base_model, tags, library) and a body with method, parents at their shas, validation, config,
    and the remote-code pointers (`dropped`, "file: key") the merge left out."""
    parents = _parents(merged)
    checkpoints = [checkpoint.name for spec in parents for checkpoint in spec.checkpoints]
    data = ModelCardData(
        base_model=list(dict.fromkeys(checkpoints)),  # a LoRA input: its base and its adapter
        tags=["merge", "mergebot"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    lines = [
        "# Merged model",
        "",
        f"Made by [mergebot](https://pypi.org/project/mergebot/) with the **{merged.merge_method}** method.",
        "",
        "## Parents",
        "",
        "| model | revision |",
        "| --- | --- |",
        *(f"| {spec.model} | `{'+'.join(c.revision or 'local' for c in spec.checkpoints)}` |" for spec in parents),
        "",
        "## Validation",
        "",
        "| model | perplexity | KL from it (nats/token) | ends its turn | P(end of turn) |",
        "| --- | --- | --- | --- | --- |",
        f"| this merge | {_number(report.merge_ppl)} | | {_probe(report.probe)} |",
        *(
            f"| {parent.name} | {_number(parent.ppl)} | {_number(report.kl.get(parent.name), '.4f')} | "
            f"{_probe(parent.probe)} |"
            for parent in report.parents
        ),
        "",
        f"Gate: perplexity at most {report.settings.max_ppl_ratio} x the worst healthy parent's, KL from the nearest "
        f"parent at most {report.settings.max_kl}; "
        + ", ".join(f"{check.name} {'passed' if check.passed else 'FAILED'}" for check in report.checks)
        + ".",
        "",
        *_remote_code(dropped),
        "## Merge configuration",
        "",
        "```yaml",
        yaml.safe_dump(merged.as_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def commit_message(merged: MergeConfig) -> str:
    parents = ", ".join(
        "+".join(f"{c.name}@{(c.revision or 'local')[:12]}" for c in spec.checkpoints) for spec in _parents(merged)
    )
    return f"mergebot: {merged.merge_method} merge of {parents}"


def _parents(merged: MergeConfig) -> list[ModelSpec]:
    """Every model the merge read, the base first."""
    base = [merged.spec(merged.base_model)] if merged.base_model else []
    return base + [spec for spec in merged.models if spec.model != merged.base_model]


def _remote_code(dropped: list[str]) -> list[str]:
    if not dropped:
        return []
    keys = ", ".join(f"`{item}`" for item in dropped)
    return [
        "## Remote code",
        "",
        f"An upstream model named remote Python code ({keys}); mergebot dropped it from this merge, which loads "
        "with the library's own classes only.",
        "",
    ]


def _probe(probe: ProbeResult | None) -> str:
    """The behaviour probe as two table cells: prompts ended on, and the mean end-of-turn probability."""
    if probe is None:
        return "not probed | "
    return f"{sum(probe.stopped)}/{len(probe.stopped)} prompts | {probe.mean_eot_prob:.3f}"


def _number(value: float | None, spec: str = ".3f") -> str:
    return format(value, spec) if value is not None else "n/a"
