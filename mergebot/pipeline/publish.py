"""Publishing a merged directory as one atomic Hub commit with a model card that tells its lineage.

Only shards whose sha256 differs from the repo's current revision are uploaded; files the new layout no longer
has are deleted in the same commit. The commit names its parent commit, so a concurrent change fails it rather
than being overwritten, and a failed or killed upload leaves the previous revision as it was.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard, ModelCardData

from mergebot.errors import HubNotFoundError, PublishError
from mergebot.files import INDEX_FILE, METADATA_FILES, FileHashes, default_cache_dir
from mergebot.hub.client import HubClient
from mergebot.merge.engine import MERGE_CONFIG_FILE
from mergebot.pipeline.gate import ValidationReport


@dataclass(frozen=True)
class PublishResult:
    repo: str
    commit: str
    """The repo's head after publishing (unchanged when nothing differed)."""
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


def _git_blob_id(content: Path | bytes) -> str:
    data = content.read_bytes() if isinstance(content, Path) else content
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


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
        raise PublishError(
            f"refusing to publish {out_dir} to {repo}: validation failed ({report.failure_summary}); --force overrides"
        )
    if not (out_dir / INDEX_FILE).exists():
        raise PublishError(f"{out_dir}: no {INDEX_FILE}; not a finished merge")
    client.call(repo, None, lambda: client.api.create_repo(repo, private=private, exist_ok=True), "create_repo")
    try:
        head = client.resolve(repo, "main")
        remote = client.list_files(repo, head).files
    except HubNotFoundError:
        head, remote = None, {}
    hashes = FileHashes(default_cache_dir())
    card = str(model_card(out_dir, report)).encode()
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    small = [name for name in (*METADATA_FILES, MERGE_CONFIG_FILE) if (out_dir / name).exists()]
    contents: dict[str, Path | bytes] = {name: out_dir / name for name in (*shards, *small)} | {"README.md": card}
    uploaded, unchanged, operations = [], [], []
    for name, content in contents.items():
        known = remote.get(name)
        if known and (
            known.sha256 == hashes.sha256(content)
            if isinstance(content, Path) and known.sha256
            else known.oid == _git_blob_id(content)
        ):
            unchanged.append(name)
            continue
        uploaded.append(name)
        operations.append(CommitOperationAdd(name, content))
    deleted = sorted(name for name in remote if name.endswith(".safetensors") and name not in shards)
    operations += [CommitOperationDelete(name) for name in deleted]
    if not uploaded and not deleted:
        return PublishResult(repo, head or "", uploaded, unchanged, deleted)
    info = client.call(
        repo,
        "main",
        lambda: client.api.create_commit(repo, operations, commit_message=commit_message(out_dir), parent_commit=head),
        "commit",
    )
    return PublishResult(repo, info.oid, uploaded, unchanged, deleted)
