"""Names of the files a Hugging Face checkpoint is made of, and reading its small JSON files (no torch here:
the daemon imports this)."""

import json
from pathlib import Path

from mergebot.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
METADATA_FILES = ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES)


def read_json(path: Path, label: str, *, required: bool) -> dict:
    if not path.exists():
        if required:
            raise ModelError(f"model {label}: {path.name} is missing")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"model {label}: {path} is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelError(f"model {label}: {path} is not a JSON object")
    return value
