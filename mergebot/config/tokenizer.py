"""The `tokenizer` block, the legacy `tokenizer_source` and `chat_template` of a merge, as mergekit 0.1.5 reads
them: typed and checked here, every error naming the key and line; the vocabulary itself is built by the merge."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mergebot.config.chat_templates import CHAT_TEMPLATES
from mergebot.config.document import Located

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
UNION, BASE, AUTO = "union", "base", "auto"
ModelName = Callable[[Any, str], str]
"""Checks that a value names one of the merge's models (the key path for errors) and returns that model."""
KeyCheck = Callable[[Mapping[str, Any], set[str], str], Any]
"""Checks a table's keys against the known ones (key path prefix for errors): refused, or ignored as mergekit does."""


@dataclass(frozen=True)
class TokenSource:
    """A configured token's embedding: `model`'s row of the same token, its row `token_id` or that of `token`;
    `model` None is mergekit's `{kind: zero}`."""

    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    def as_dict(self) -> str | dict[str, Any]:
        if self.model is None:
            return {"kind": "zero"}
        if self.token_id is None and self.token is None:
            return self.model
        named = {"token_id": self.token_id} if self.token_id is not None else {"token": self.token}
        return {"kind": "model_token", "model": self.model, **named}


@dataclass(frozen=True)
class TokenSetting:
    """One entry of `tokenizer.tokens`: the token is in the output; `force` gives every model the source's row."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """Where the output vocabulary comes from: `union`, `base` or a model, as written."""

    source: str
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    block: bool = True
    """Written as the `tokenizer` block (False: as the legacy `tokenizer_source` key)."""

    def as_dict(self) -> dict[str, Any]:
        """The mergekit field as it was written."""
        if not self.block:
            return {"tokenizer_source": self.source}
        block: dict[str, Any] = {"source": self.source}
        if self.tokens:
            block["tokens"] = {
                token: ({"source": s.source.as_dict()} if s.source else {}) | ({"force": True} if s.force else {})
                for token, s in self.tokens.items()
            }
        if self.pad_to_multiple_of:
            block["pad_to_multiple_of"] = self.pad_to_multiple_of
        return {"tokenizer": block}


def parse_tokenizer(
    raw: Mapping[str, Any], located: Located, prefix: str, model_name: ModelName, check_keys: KeyCheck | None = None
) -> TokenizerSettings | None:
    """`tokenizer` or `tokenizer_source` (not both, as in mergekit); None when neither is given."""
    legacy, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if legacy is not None and block is not None:
        raise located.error(f"{prefix}tokenizer", "give tokenizer or tokenizer_source, not both")
    if block is None:
        if legacy is None:
            return None
        return TokenizerSettings(_source(legacy, f"{prefix}tokenizer_source", model_name), block=False)
    where = f"{prefix}tokenizer"
    if not isinstance(block, dict):
        raise located.error(where, "must be a table with source, tokens, pad_to_multiple_of")
    check_keys = check_keys or located.check_keys
    check_keys(block, TOKENIZER_KEYS, f"{where}.")
    source = _source(block.get("source", UNION), f"{where}.source", model_name)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise located.error(f"{where}.pad_to_multiple_of", "must be a whole number of 1 or more")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise located.error(f"{where}.tokens", "must be a table of token = {source, force}")
    settings = {
        str(token): _token(value, located, f"{where}.tokens.{token}", model_name, check_keys)
        for token, value in tokens.items()
    }
    return TokenizerSettings(source, settings, pad)


def parse_chat_template(value: Any, located: Located, where: str) -> str | None:
    """'auto', a template name mergekit knows, or a Jinja template (kept as written)."""
    if value is None:
        return None
    if isinstance(value, str) and (value == AUTO or value in CHAT_TEMPLATES or "{{" in value or "{%" in value):
        return value
    names = ", ".join(sorted(CHAT_TEMPLATES))
    raise located.error(where, f"{value!r} is not 'auto', one of {names}, or a Jinja template")


def _source(value: Any, where: str, model_name: ModelName) -> str:
    return value if value in (UNION, BASE) else model_name(value, where)


def _token(value: Any, located: Located, where: str, model_name: ModelName, check_keys: KeyCheck) -> TokenSetting:
    if value is None:
        return TokenSetting()
    if not isinstance(value, dict):
        raise located.error(where, "must be a table {source = ..., force = ...}")
    check_keys(value, TOKEN_KEYS, f"{where}.")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise located.error(f"{where}.force", "must be true or false")
    source = value.get("source")
    if source is None:
        if force:
            raise located.error(f"{where}.force", "needs a source to force")
        return TokenSetting()
    if not isinstance(source, dict):
        return TokenSetting(TokenSource(model_name(source, f"{where}.source")), force)
    kind = source.get("kind")
    if kind == "zero":
        check_keys(source, {"kind"}, f"{where}.source.")
        return TokenSetting(TokenSource(), force)
    if kind != "model_token":
        raise located.error(f"{where}.source.kind", f"{kind!r} is not 'zero' or 'model_token'")
    check_keys(source, {"kind", "model", "token_id", "token"}, f"{where}.source.")
    model = model_name(source.get("model"), f"{where}.source.model")
    token_id, token = source.get("token_id"), source.get("token")
    if (token_id is None) == (token is None):
        raise located.error(f"{where}.source", "give exactly one of token_id and token")
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise located.error(f"{where}.source.token_id", "must be a token id (0 or more)")
    if token is not None and not isinstance(token, str):
        raise located.error(f"{where}.source.token", "must be a token string")
    return TokenSetting(TokenSource(model, token_id, token), force)
