"""The model card and commit message of a published merge: its lineage, told from the merge config as merged
(each model pinned to the revision that was read)."""

import html
from collections.abc import Mapping

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mergebot.config.merge import MergeConfig, ModelSpec
from mergebot.config.moe import MoeConfig
from mergebot.pipeline.probe import ProbeResult
from mergebot.pipeline.report import ValidationReport
from mergebot.runrecord import GgufResult


def model_card(
    merged: MergeConfig | MoeConfig,
    report: ValidationReport,
    dropped: list[str],
    gguf: Mapping[str, GgufResult] | None = None,
) -> str:
    """YAML lineage (base_model, tags, library) and a body with method, parents at their shas, validation, config,
    the GGUF files made of it (`gguf`, by type) and the remote-code pointers (`dropped`, "file: key") the merge left
    out."""
    parents = _parents(merged)
    checkpoints = [checkpoint.name for spec in parents for checkpoint in spec.checkpoints]
    data = ModelCardData(
        base_model=list(dict.fromkeys(checkpoints)),  # a LoRA input: its base and its adapter
        tags=["merge", "mergebot"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    lines = [
        *(_moe_lineage(merged) if isinstance(merged, MoeConfig) else _lineage(merged, parents)),
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
        *_gguf_section(gguf or {}, report.merge_ppl),
        *_remote_code(dropped),
        "## Merge configuration",
        "",
        "```yaml",
        yaml.safe_dump(merged.as_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def gguf_card(merged: MergeConfig | MoeConfig, gguf: Mapping[str, GgufResult], merge_repo: str, merge_sha: str) -> str:
    """The card of a sibling repo of GGUF files: which published revision they are made from, and the table."""
    data = ModelCardData(base_model=[merge_repo], tags=["gguf", "merge", "mergebot"], pipeline_tag="text-generation")
    lines = [
        "# GGUF files of a merged model",
        "",
        f"Made by [mergebot](https://pypi.org/project/mergebot/) from [{merge_repo}](https://huggingface.co/"
        f"{merge_repo}) at revision `{merge_sha}`, a **{_kind(merged)}**, each time it publishes.",
        "",
        *_gguf_section(gguf, None),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def commit_message(merged: MergeConfig | MoeConfig) -> str:
    parents = ", ".join(
        "+".join(f"{c.name}@{(c.revision or 'local')[:12]}" for c in spec.checkpoints) for spec in _parents(merged)
    )
    if isinstance(merged, MoeConfig):
        return f"mergebot: mixture of {len(merged.experts)} experts ({merged.gate_mode} router) of {parents}"
    return f"mergebot: {merged.merge_method} merge of {parents}"


def _kind(merged: MergeConfig | MoeConfig) -> str:
    return "mixture of experts" if isinstance(merged, MoeConfig) else f"{merged.merge_method} merge"


def _lineage(merged: MergeConfig, parents: list[ModelSpec]) -> list[str]:
    return [
        "# Merged model",
        "",
        f"Made by [mergebot](https://pypi.org/project/mergebot/) with the **{merged.merge_method}** method.",
        "",
        "## Parents",
        "",
        "| model | revision |",
        "| --- | --- |",
        *(f"| {spec.model} | `{_revision(spec)}` |" for spec in parents),
        "",
    ]


def _moe_lineage(merged: MoeConfig) -> list[str]:
    """The base and every expert at the revision merged, with the prompts its router row was computed from."""
    experts = [(str(n), e) for n, e in enumerate(merged.experts)]
    experts += [(f"shared {n}", e) for n, e in enumerate(merged.shared_experts)]
    return [
        "# Mixture of experts",
        "",
        f"Made by [mergebot](https://pypi.org/project/mergebot/) from a mergekit-moe config: {len(merged.experts)} "
        f"experts, {merged.experts_per_token} per token, the **{merged.gate_mode}** router; attention, embeddings "
        f"and norms from the base model, {merged.base_model} at `{_revision(merged.spec(merged.base_model))}`.",
        "",
        "## Experts",
        "",
        "| expert | model | revision | positive prompts | negative prompts |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {label} | {e.model} | `{_revision(merged.spec(e.model))}` | {_prompts(e.positive_prompts)} | "
            f"{_prompts(e.negative_prompts)} |"
            for label, e in experts
        ),
        "",
    ]


def _revision(spec: ModelSpec) -> str:
    return "+".join(c.revision or "local" for c in spec.checkpoints)


def _prompts(prompts: tuple[str, ...]) -> str:
    """Prompts as one table cell: quoted, `<br>` between them, nothing that ends the cell or opens a tag."""
    escaped = (html.escape(" ".join(p.split())).replace("|", "\\|") for p in prompts)
    return "<br>".join(f"&quot;{p}&quot;" for p in escaped)


def _parents(merged: MergeConfig | MoeConfig) -> list[ModelSpec]:
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


def _gguf_section(gguf: Mapping[str, GgufResult], merge_ppl: float | None) -> list[str]:
    """The GGUF files by type: size, where they are, what llama.cpp measured, and why one was held back."""
    if not gguf:
        return []
    repos = sorted({result.get("repo", "") for result in gguf.values()})
    beside = f"(merge: {_number(merge_ppl)})" if merge_ppl is not None else ""
    return [
        "## GGUF files",
        "",
        f"For llama.cpp and the tools built on it, in `{', '.join(repos)}`. Each file is checked before upload: "
        "transformers' GGUF loader must give back the merge's tensors (exact for F16/BF16, within the type's error "
        "for quantized types), and where llama.cpp is installed it must load the file, tokenize as the merge does, "
        "keep the eval text's perplexity close to the merge's and end its turn on the chat probe as the merge does. "
        "A file that fails is not published.",
        "",
        f"| file | type | size | perplexity {beside} | ends its turn | passed its checks |".replace("  |", " |"),
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| `{result.get('file', '')}` | {file_type} | {_size(result.get('size'))} | "
            f"{_number(result.get('perplexity'))} | {_share(result.get('stop_rate'))} | "
            + ("yes" if result.get("passed") else f"no: {result.get('reason') or 'failed'}".replace("|", "/"))
            + " |"
            for file_type, result in gguf.items()
        ),
        "",
        *(f"- `{result.get('file', '')}`: {result['checked']}" for result in gguf.values() if result.get("checked")),
        "",
    ]


def _size(size: object) -> str:
    return f"{size / 1e6:,.1f} MB" if isinstance(size, int) and size > 0 else "n/a"


def _share(value: float | None) -> str:
    return f"{value:.0%} of the probe prompts" if value is not None else "n/a"


def _probe(probe: ProbeResult | None) -> str:
    """The behaviour probe as two table cells: prompts ended on, and the mean end-of-turn probability."""
    if probe is None:
        return "not probed | "
    return f"{sum(probe.stopped)}/{len(probe.stopped)} prompts | {probe.mean_eot_prob:.3f}"


def _number(value: float | None, spec: str = ".3f") -> str:
    return format(value, spec) if value is not None else "n/a"
