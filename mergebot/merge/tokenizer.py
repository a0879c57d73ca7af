"""The output vocabulary of a merge that sets `tokenizer` (or `tokenizer_source`), built as mergekit 0.1.5 builds it:
the source's tokenizer with the tokens beyond its embedding dropped, for a union every other model's new tokens
appended (plain tokens first, then added tokens with their settings), then the configured tokens not yet in it.

mergekit appends a union's new tokens in an order that changes from run to run; here it is the config's model order,
each model's tokens by id.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from mergebot.config.tokenizer import UNION, TokenizerSettings
from mergebot.errors import ModelError
from mergebot.files import parse_json, read_small
from mergebot.merge.source import InputModel
from mergebot.merge.vocab import is_vocab_tensor

TOKENIZER_JSON = "tokenizer.json"


@dataclass(frozen=True)
class OutputTokenizer:
    vocab: dict[str, int]
    """token → output row."""
    token_rows: int
    """Rows that hold a token; the rows above, up to `rows`, are padding."""
    rows: int
    tokenizer_json: str | None
    """The tokenizer.json to write; None when the source's tokenizer files are copied as they are."""


def build_output_tokenizer(
    settings: TokenizerSettings, source: str, others: list[str], models: dict[str, InputModel]
) -> OutputTokenizer:
    """The output tokenizer: `source`'s, or for a union `source`'s followed by what `others` add."""
    document = read_document(models[source])
    if document is None:
        raise ModelError(f"model {source}: has no {TOKENIZER_JSON}, which the merge's tokenizer setting needs")
    changed = _strip(document, embedding_rows(models[source]))
    tokenizer = _tokenizer(document, models[source])
    if settings.source == UNION:
        changed |= _add_union(tokenizer, [models[name] for name in others])
    known = tokenizer.get_vocab(with_added_tokens=True)
    changed |= tokenizer.add_tokens([AddedToken(token) for token in settings.tokens if token not in known]) > 0
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    token_rows = max(vocab.values()) + 1
    multiple = settings.pad_to_multiple_of or 1
    rows = -(-token_rows // multiple) * multiple
    return OutputTokenizer(vocab, token_rows, rows, tokenizer.to_str(pretty=True) if changed else None)


def read_document(model: InputModel) -> dict[str, Any] | None:
    """A model's tokenizer.json as JSON; None when it ships none."""
    path: Path = model.path / TOKENIZER_JSON
    if not path.exists():
        return None
    try:
        document = parse_json(read_small(path, f"model {model.label}"), f"model {model.label}", str(path))
        model_type = document["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"model {model.label}: cannot read {path} ({error})") from error
    if not isinstance(model_type, str):
        raise ModelError(f"model {model.label}: {path} has no tokenizer model type")
    return document


def _tokenizer(document: dict[str, Any], model: InputModel) -> Tokenizer:
    try:
        return Tokenizer.from_str(json.dumps(document))
    except Exception as error:  # the tokenizers library raises its own exception type for a malformed file
        raise ModelError(f"model {model.label}: cannot load {model.path / TOKENIZER_JSON} ({error})") from error


def embedding_rows(model: InputModel) -> int | None:
    """Rows of the model's input embedding, or of another vocabulary tensor when it names it differently."""
    names = sorted((n for n in model.tensors if is_vocab_tensor(n)), key=lambda n: "embed" not in n)
    return model.tensors[names[0]].rows if names else None


def _strip(document: dict[str, Any], rows: int | None) -> bool:
    """Drop the tokens whose id has no embedding row (and the BPE merges that make them); True when any were."""
    if rows is None:
        return False
    model = document["model"]
    vocab = model.get("vocab")
    dropped: set[str] = set()
    if isinstance(vocab, dict):
        dropped = {token for token, index in vocab.items() if index >= rows}
        model["vocab"] = {token: index for token, index in vocab.items() if index < rows}
    elif isinstance(vocab, list) and len(vocab) > rows:
        dropped = {entry[0] for entry in vocab[rows:]}
        model["vocab"] = vocab[:rows]
    added = document.get("added_tokens") or []
    dropped |= {entry["content"] for entry in added if entry["id"] >= rows}
    document["added_tokens"] = [entry for entry in added if entry["id"] < rows]
    if dropped and isinstance(model.get("merges"), list):
        model["merges"] = [m for m in model["merges"] if not dropped & set(m.split(" ") if isinstance(m, str) else m)]
    return bool(dropped)


def _add_union(tokenizer: Tokenizer, others: list[InputModel]) -> bool:
    """Append the tokens of `others` the tokenizer lacks: plain tokens, then added tokens (the first model's
    settings win); a model without tokenizer.json is taken to have the base's vocabulary, as mergekit does."""
    known = set(tokenizer.get_vocab(with_added_tokens=True))
    plain: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    for model in others:
        document = read_document(model)
        if document is None:
            continue
        rows = embedding_rows(model)
        other = _tokenizer(document, model)
        for index, token in sorted(other.get_added_tokens_decoder().items()):
            if (rows is None or index < rows) and token.content not in known:
                added.setdefault(token.content, token)
        for token, index in sorted(other.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1]):
            if (rows is None or index < rows) and token not in known:
                plain[token] = None
    new_plain = [AddedToken(token) for token in plain if token not in added]
    count = tokenizer.add_tokens(new_plain) + tokenizer.add_tokens(list(added.values()))
    return count > 0
