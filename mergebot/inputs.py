"""Turn a config's model references into input models on disk: local directories now, Hub repos via hub/."""

from pathlib import Path

from mergebot.config import MergeConfig
from mergebot.errors import ModelError
from mergebot.merge.checkpoint import FileHashes, default_cache_dir
from mergebot.merge.source import InputModel, open_model


def resolve_inputs(config: MergeConfig) -> dict[str, InputModel]:
    """Open every model the config names, with the sha256 of each weight file."""
    hashes = FileHashes(default_cache_dir())
    models = {}
    for spec in config.models:
        path = Path(spec.model).expanduser()
        if not path.is_dir():
            raise ModelError(f"model {spec.model}: not a local directory")
        model = open_model(spec.model, path)
        model.file_sha256 = {file.name: hashes.sha256(file) for file in model.weight_files()}
        models[spec.model] = model
    return models
