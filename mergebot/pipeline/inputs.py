"""Turn a config's model references into input models on disk: a local directory as it is, a Hub repo through
the standard cache (only the files a merge reads), a LoRA adapter the same way, applied to its base; and what each
input is known by in run records and caches."""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.config.merge import MergeConfig
from mergebot.config.models import Checkpoint, ModelSpec
from mergebot.config.moe import MoeConfig
from mergebot.errors import ConfigError, HubRepoNotFoundError
from mergebot.files import FileHashes, default_cache_dir, local_identity
from mergebot.merge.source import AdapterSource, InputModel, open_model

if TYPE_CHECKING:
    from mergebot.hub.client import HubClient

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A full commit sha names one commit for good: a checkpoint pinned to one is read without resolving it again."""


def read_pinned(path: Path) -> dict[str, str]:
    """The revisions the daemon resolved for a run (model -> identity, as `identities` gives), from its file."""
    try:
        pinned = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the pinned inputs: {error}") from error
    if not isinstance(pinned, dict) or not all(isinstance(v, str) and isinstance(k, str) for k, v in pinned.items()):
        raise ConfigError(f"{path}: the pinned inputs must map each model to a revision")
    return pinned


def pin_inputs(config: MergeConfig | MoeConfig, pinned: Mapping[str, str]) -> MergeConfig | MoeConfig:
    """The merge with each Hub checkpoint fixed at the commit the daemon resolved, so the child merges exactly
    what the daemon recorded even if a branch moved since; a local checkpoint is read as it is (its identity is
    its content)."""
    revisions = {}
    for spec in config.models:
        parts = pinned.get(spec.model, "").split("+")
        if len(parts) != len(spec.checkpoints) or not all(parts):
            raise ConfigError(f"model {spec.model}: no pinned revision for it among the run's inputs")
        hub = [None if checkpoint.is_local else part for checkpoint, part in zip(spec.checkpoints, parts, strict=True)]
        revisions[spec.model] = (hub[0], hub[1] if len(hub) > 1 else None)
    return config.pinned(revisions)


def resolve_inputs(config: MergeConfig | MoeConfig, hub: "HubClient | None" = None) -> dict[str, InputModel]:
    """Open every model the config names, with the sha256 of each weight file (its adapter's included)."""
    hashes = FileHashes(default_cache_dir())
    models = {}
    for spec in config.models:
        if not all(checkpoint.is_local for checkpoint in spec.checkpoints) and hub is None:
            from mergebot.hub.client import HubClient  # huggingface_hub's import: only for a merge that reads a Hub

            hub = HubClient()
        model = open_model(spec.model, spec.base.local_path) if spec.is_local else open_hub_model(hub, spec)
        if spec.lora is not None:
            from mergebot.merge.lora import apply_lora  # torch's: only a merge with an adapter imports it

            path, revision, shas = _checkpoint_files(spec.lora, hub)
            model = apply_lora(model, AdapterSource(spec.lora.name, path, revision))
            model.file_sha256.update(shas)
        for file in model.weight_files():
            if file.name not in model.file_sha256:
                model.file_sha256[file.name] = hashes.sha256(file)
        models[spec.model] = model
    return models


def open_hub_model(hub: "HubClient | None", spec: ModelSpec) -> InputModel:
    """Resolve the revision to a sha, fetch what changed into the cache, open the snapshot."""
    snapshot, sha, shas = _checkpoint_files(spec.base, hub)
    model = open_model(spec.model, snapshot, revision=sha)
    model.file_sha256 = shas
    return model


def _checkpoint_files(checkpoint: Checkpoint, hub: "HubClient | None") -> tuple[Path, str | None, dict[str, str]]:
    """A checkpoint's directory, the commit sha read (None when local) and the LFS sha256 of its files by name."""
    if checkpoint.is_local:
        return checkpoint.local_path, None, {}
    assert hub is not None, "a Hub checkpoint needs a Hub client"
    revision = checkpoint.revision
    try:
        sha = revision if revision and COMMIT_SHA.fullmatch(revision) else hub.resolve(checkpoint.name, revision)
    except HubRepoNotFoundError as error:
        raise HubRepoNotFoundError(
            f"no directory {checkpoint.name} here, and no repo {checkpoint.name} on {hub.endpoint} (or not visible "
            "with this token: check the path, the repo id, HF_ENDPOINT and HF_TOKEN)"
        ) from error
    remote = hub.list_files(checkpoint.name, sha)
    snapshot = hub.fetch(remote)
    return snapshot, sha, {name: f.sha256 for name, f in remote.files.items() if f.sha256}


def identities(models: dict[str, InputModel]) -> dict[str, str]:
    """model → the commit sha merged (Hub), or `local_identity` of the directory (local), joined by `+` with its
    adapter's: the same identity the daemon watches, so a run record, a parent perplexity cached under it and the
    next check agree."""
    return {name: identity(model) for name, model in models.items()}


def identity(model: InputModel) -> str:
    base = model.revision or local_identity(model.path)
    if model.adapter is None:
        return base
    return f"{base}+{model.adapter.revision or local_identity(model.adapter.path)}"
