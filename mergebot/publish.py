"""Publishing a merged directory as one atomic Hub commit with a model card that tells its lineage.

Only shards whose sha256 differs from the repo's current revision are uploaded; files the new layout no longer
has are deleted in the same commit. The commit names its parent commit, so a concurrent change fails it rather
than being overwritten, and a failed or killed upload leaves the previous revision as it was.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard, ModelCardData

from mergebot.errors import HubNotFoundError, PublishError
from mergebot.hub.client import HubClient
from mergebot.merge.checkpoint import FileHashes, default_cache_dir
from mergebot.merge.engine import MERGE_CONFIG_FILE
from mergebot.merge.source import INDEX_FILE, METADATA_FILES
from mergebot.validate import ValidationReport


@dataclass(frozen=True)
class PublishResult:
    repo: str
    commit: str
    uploaded: list[str]
    unchanged: list[str]
    deleted: list[str]


def model_card(out_dir: Path, report: ValidationReport) -> ModelCard:
    """YAML lineage (base_model, tags, library) and a body with method, parents at their shas, validation, config."""
    merge = yaml.safe_load((out_dir / MERGE_CONFIG_FILE).read_text())
    parents = _parents(merge)
    data = ModelCardData(
        base_model=[model for model, _ in parents],
        tags=["merge", "mergebot"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    lines = [
        "# Merged model",
        "",
        f"Made by [mergebot](https://pypi.org/project/mergebot/) with the **{merge['merge_method']}** method.",
        "",
        "## Parents",
        "",
        "| model | revision |",
        "| --- | --- |",
        *(f"| {model} | `{revision or 'local'}` |" for model, revision in parents),
        "",
        "## Validation",
        "",
        "| model | perplexity |",
        "| --- | --- |",
        f"| this merge | {_number(report.merge_ppl)} |",
        *(f"| {parent.name} | {_number(parent.ppl)} |" for parent in report.parents),
        "",
        f"Gate: perplexity at most {report.max_ppl_ratio} x the worst parent's; "
        + ", ".join(f"{check.name} {'passed' if check.passed else 'FAILED'}" for check in report.checks)
        + ".",
        "",
        "## Merge configuration",
        "",
        "```yaml",
        yaml.safe_dump(merge, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _parents(merge: dict) -> list[tuple[str, str | None]]:
    """(model, revision) of every model the merge read, in config order."""
    seen: dict[str, str | None] = {}
    entries = merge.get("models") or [source for s in merge.get("slices", []) for source in s["sources"]]
    if merge.get("base_model"):
        entries = [{"model": merge["base_model"]}, *entries]
    for entry in entries:
        model, _, at = str(entry["model"]).partition("@")
        revision = entry.get("revision") or at or None
        seen[model] = revision or seen.get(model)
    return list(seen.items())


def _number(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def commit_message(out_dir: Path) -> str:
    merge = yaml.safe_load((out_dir / MERGE_CONFIG_FILE).read_text())
    parents = ", ".join(f"{model}@{(revision or 'local')[:12]}" for model, revision in _parents(merge))
    return f"mergebot: {merge['merge_method']} merge of {parents}"


def publish(
    out_dir: Path, repo: str, client: HubClient, report: ValidationReport, *, private: bool = False, force: bool = False
) -> PublishResult:
    """One commit with changed shards, index, config, tokenizer and card; refused when validation failed."""
    if not report.passed and not force:
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in report.failed_checks)
        raise PublishError(f"refusing to publish {out_dir} to {repo}: validation failed ({reasons}); --force overrides")
    if not (out_dir / INDEX_FILE).exists():
        raise PublishError(f"{out_dir}: no {INDEX_FILE}; not a finished merge")
    client.call(repo, None, lambda: client.api.create_repo(repo, private=private, exist_ok=True), "create_repo")
    try:
        head = client.resolve(repo, "main")
        remote = client.list_files(repo, head).files
    except HubNotFoundError:
        head, remote = None, {}
    hashes = FileHashes(default_cache_dir())
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    uploaded, unchanged, operations = [], [], []
    for name in shards:
        if remote.get(name) and remote[name].sha256 == hashes.sha256(out_dir / name):
            unchanged.append(name)
            continue
        uploaded.append(name)
        operations.append(CommitOperationAdd(name, out_dir / name))
    extras = [name for name in (*METADATA_FILES, MERGE_CONFIG_FILE) if (out_dir / name).exists()]
    operations += [CommitOperationAdd(name, out_dir / name) for name in extras]
    card = str(model_card(out_dir, report)).encode()
    operations.append(CommitOperationAdd("README.md", card))
    deleted = sorted(name for name in remote if name.endswith(".safetensors") and name not in shards)
    operations += [CommitOperationDelete(name) for name in deleted]
    info = client.call(
        repo,
        "main",
        lambda: client.api.create_commit(repo, operations, commit_message=commit_message(out_dir), parent_commit=head),
        "commit",
    )
    return PublishResult(repo, info.oid, uploaded, unchanged, deleted)
