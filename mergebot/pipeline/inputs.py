"""Turn a config's model references into input models on disk: a local directory as it is, a Hub repo through
the standard cache (only the files a merge reads); and what each input is known by in run records and caches."""

from pathlib import Path

from mergebot.config.merge import MergeConfig, ModelSpec
from mergebot.files import FileHashes, default_cache_dir, local_identity
from mergebot.hub.client import HubClient
from mergebot.merge.source import InputModel, open_model


def resolve_inputs(config: MergeConfig, hub: HubClient | None = None) -> dict[str, InputModel]:
    """Open every model the config names, with the sha256 of each weight file."""
    hashes = FileHashes(default_cache_dir())
    models = {}
    for spec in config.models:
        if spec.is_local:
            model = open_model(spec.model, Path(spec.model).expanduser())
        else:
            hub = hub or HubClient()
            model = open_hub_model(hub, spec)
        for file in model.weight_files():
            if file.name not in model.file_sha256:
                model.file_sha256[file.name] = hashes.sha256(file)
        models[spec.model] = model
    return models


def open_hub_model(hub: HubClient, spec: ModelSpec) -> InputModel:
    """Resolve the revision to a sha, fetch what changed into the cache, open the snapshot."""
    sha = hub.resolve(spec.model, spec.revision)
    remote = hub.list_files(spec.model, sha)
    snapshot = hub.fetch(remote)
    model = open_model(spec.model, snapshot, revision=sha)
    model.file_sha256 = {name: f.sha256 for name, f in remote.files.items() if f.sha256}
    return model


def identities(models: dict[str, InputModel]) -> dict[str, str]:
    """model → the commit sha merged (Hub), or `local_identity` of the directory (local): the same identity the
    daemon watches, so a run record, a parent perplexity cached under it and the next check agree."""
    return {name: model.revision or local_identity(model.path) for name, model in models.items()}
