"""The output's tokenizer files: the tokenizer source's, with tokenizer.json rewritten when the vocabulary changed,
and the chat template where transformers 5 reads and saves it, chat_template.jinja (it takes precedence over a
"chat_template" in tokenizer_config.json, which is dropped so the two cannot disagree)."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mergebot.config.chat_templates import CHAT_TEMPLATES
from mergebot.config.merge import MergeConfig
from mergebot.config.tokenizer import AUTO
from mergebot.errors import ModelError
from mergebot.files import TOKENIZER_FILES, drop_remote_code, read_json, read_small, write_atomic
from mergebot.merge.source import InputModel
from mergebot.merge.tokenizer import TOKENIZER_JSON, OutputTokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
VOCABULARY_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
"""Files that describe the source's own vocabulary: left out when the output's differs (transformers loads
tokenizer.json, as mergekit's output has it)."""
ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def write_tokenizer_files(
    config: MergeConfig, output: OutputTokenizer | None, models: dict[str, InputModel], work: Path
) -> list[str]:
    """Write them into `work`; returns the remote-code pointers left out of tokenizer_config.json."""
    source = models[config.tokenizer_source]
    where, dropped = f"model {source.label}", []
    rewritten = output.tokenizer_json if output else None
    template = chat_template(config, models)
    written: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        path = source.path / name
        if not path.exists() or (rewritten is not None and name in VOCABULARY_FILES):
            continue
        if name == TOKENIZER_JSON and rewritten is not None:
            written[name] = rewritten.encode()
        elif name == TOKENIZER_CONFIG:
            settings, dropped = drop_remote_code(read_json(path, source.label, required=True), TOKENIZER_CONFIG)
            changed = rewritten is not None or template is not None or dropped
            written[name] = _tokenizer_config(settings, rewritten, template) if changed else read_small(path, where)
        else:
            written[name] = read_small(path, where)
    if template is not None:
        written[CHAT_TEMPLATE_FILE] = template.encode()
    for name in TOKENIZER_FILES:
        if name in written:
            write_atomic(work / name, written[name])
        else:
            (work / name).unlink(missing_ok=True)
    return dropped


def chat_template(config: MergeConfig, models: dict[str, InputModel]) -> str | None:
    """The template text `chat_template` asks for; None to keep the source's (also when `auto` finds none)."""
    value = config.chat_template
    if value != AUTO:
        return CHAT_TEMPLATES.get(value, value) if value else None
    found = [t for t in (model_template(models[spec.model].path) for spec in config.models) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def model_template(model_dir: Path) -> str | None:
    """A model's chat template as transformers loads it (chat_template.jinja first), stripped as mergekit
    compares them; a list of named templates gives its "default"."""
    if (model_dir / CHAT_TEMPLATE_FILE).exists():
        try:
            return read_small(model_dir / CHAT_TEMPLATE_FILE, f"model {model_dir}").decode().strip() or None
        except UnicodeDecodeError as error:
            raise ModelError(f"model {model_dir}: {CHAT_TEMPLATE_FILE} is not UTF-8 text") from error
    template = read_json(model_dir / TOKENIZER_CONFIG, str(model_dir), required=False).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template.strip() or None) if isinstance(template, str) else None


def _tokenizer_config(config: dict[str, Any], rewritten: str | None, template: str | None) -> bytes:
    """The source's tokenizer_config.json with its added tokens those of the new tokenizer.json."""
    if rewritten is not None and "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(entry["id"]): {field: entry[field] for field in ADDED_TOKEN_FIELDS if field in entry}
            for entry in json.loads(rewritten).get("added_tokens") or []
        }
    if template is not None:
        config.pop("chat_template", None)
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
