"""Publishing a merged directory as one atomic Hub commit with a model card that tells its lineage.

Only shards whose sha256 differs from the repo's current revision are uploaded; files the new layout no longer
has are deleted in the same commit. The commit names its parent commit, so a concurrent change fails it rather
than being overwritten, and a failed or killed upload leaves the previous revision as it was.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mergebot.config.gguf import published_names
from mergebot.config.merge import MergeConfig
from mergebot.config.moe import MoeConfig
from mergebot.errors import HubNotFoundError, PublishError
from mergebot.files import (
    DROPPED_KEY,
    INDEX_FILE,
    METADATA_FILES,
    FileHashes,
    default_cache_dir,
    git_blob_id,
    read_json,
)
from mergebot.hub.client import HubClient, RemoteFile
from mergebot.merge.engine import MERGE_CONFIG_FILE
from mergebot.pipeline.card import commit_message, gguf_card, model_card
from mergebot.pipeline.gate import ValidationReport
from mergebot.runrecord import GgufResult


@dataclass(frozen=True)
class PublishResult:
    repo: str
    commit: str
    """The repo's head after publishing (unchanged when nothing differed)."""
    uploaded: list[str]
    unchanged: list[str]
    deleted: list[str]


def publish(
    out_dir: Path,
    repo: str,
    client: HubClient,
    report: ValidationReport,
    merged: MergeConfig | MoeConfig,
    *,
    private: bool = False,
    force: bool = False,
    description: str = "",
    gguf: Mapping[str, GgufResult] | None = None,
    gguf_files: Mapping[str, Path] | None = None,
) -> PublishResult:
    """One commit with changed shards, index, config, tokenizer and card; refused when validation failed.
    `merged` is the merge config pinned to the revisions merged, for the card; `description`: the commit's (the
    daemon's run id, by which a publish whose record was lost is recognised); `gguf`: the run's GGUF results, for
    the card, and `gguf_files` the checked files that go in the same commit (a GGUF file mergebot named that is not
    among them is deleted: a revision never holds a GGUF file of another merge)."""
    if not report.passed and not force:
        raise PublishError(
            f"refusing to publish {out_dir} to {repo}: validation failed ({report.failure_summary}); --force overrides"
        )
    if not (out_dir / INDEX_FILE).exists():
        raise PublishError(f"{out_dir}: no {INDEX_FILE}; not a finished merge")
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    small = [name for name in (*METADATA_FILES, MERGE_CONFIG_FILE) if (out_dir / name).exists()]
    contents: dict[str, Path | bytes] = {name: out_dir / name for name in (*shards, *small)}
    contents |= dict(gguf_files or {})
    index = read_json(out_dir / INDEX_FILE, str(out_dir), required=True)
    dropped = [str(item) for item in (index.get("metadata") or {}).get(DROPPED_KEY) or []]
    contents["README.md"] = model_card(merged, report, dropped, gguf or {}).encode()
    return _commit(client, repo, contents, commit_message(merged), private, description, stale_shards=True)


def publish_gguf_repo(
    repo: str,
    client: HubClient,
    files: Mapping[str, Path],
    gguf: Mapping[str, GgufResult],
    merged: MergeConfig,
    merge_repo: str,
    merge_sha: str,
    *,
    private: bool = False,
    description: str = "",
) -> PublishResult:
    """The GGUF files of the merge published at `merge_repo`@`merge_sha`, as one commit to their own repo (created
    like the merge's), with a card saying which revision they are made from."""
    contents: dict[str, Path | bytes] = dict(files)
    contents["README.md"] = gguf_card(merged, gguf, merge_repo, merge_sha).encode()
    message = f"mergebot: GGUF files of {merge_repo}@{merge_sha[:12]}"
    return _commit(client, repo, contents, message, private, description, stale_shards=False)


def _commit(
    client: HubClient,
    repo: str,
    contents: dict[str, Path | bytes],
    message: str,
    private: bool,
    description: str,
    *,
    stale_shards: bool,
) -> PublishResult:
    """The files of `contents` the repo does not hold yet, and the deletion of what mergebot put there before and
    the new revision no longer has (shards, with `stale_shards`; GGUF files it named), in one commit."""
    client.create_repo(repo, private=private)
    try:
        head = client.resolve(repo, "main")
        remote = client.list_files(repo, head).files
    except HubNotFoundError:
        head, remote = None, {}
    hashes = FileHashes(default_cache_dir())
    unchanged = [name for name, content in contents.items() if _same(remote.get(name), content, hashes)]
    upload = {name: content for name, content in contents.items() if name not in unchanged}
    stale = published_names(repo) & set(remote)
    stale |= {name for name in remote if name.endswith(".safetensors")} if stale_shards else set()
    deleted = sorted(stale - set(contents))
    if not upload and not deleted:
        return PublishResult(repo, head or "", [], unchanged, deleted)
    commit = client.commit(repo, upload, deleted, message, parent=head, description=description)
    return PublishResult(repo, commit, list(upload), unchanged, deleted)


def _same(known: RemoteFile | None, content: Path | bytes, hashes: FileHashes) -> bool:
    """Whether the repo already holds exactly this content: by LFS sha256 for a large file, else by git blob id."""
    if known is None:
        return False
    if isinstance(content, Path) and known.sha256:
        return known.sha256 == hashes.sha256(content)
    return known.oid == git_blob_id(content.read_bytes() if isinstance(content, Path) else content)
