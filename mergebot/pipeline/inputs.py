"""Turn a config's model references into input models on disk: a local directory as it is, a Hub repo through
the standard cache (only the files a merge reads), a LoRA adapter the same way, applied to its base; and what each
input is known by in run records and caches."""

from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.config.merge import MergeConfig
from mergebot.config.models import Checkpoint, ModelSpec
from mergebot.errors import HubRepoNotFoundError
from mergebot.files import FileHashes, default_cache_dir, local_identity
from mergebot.merge.source import AdapterSource, InputModel, open_model

if TYPE_CHECKING:
    from mergebot.hub.client import HubClient


def resolve_inputs(config: MergeConfig, hub: "HubClient | None" = None) -> dict[str, InputModel]:
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
    try:
        sha = hub.resolve(checkpoint.name, checkpoint.revision)
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
