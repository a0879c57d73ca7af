"""A merge's output vocabulary, decided once before any tensor is read: how many rows the vocabulary tensors get,
which row of each model feeds each of them, and the rows `tokenizer.tokens` configures."""

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from mergebot.config.merge import MergeConfig
from mergebot.errors import ConfigError
from mergebot.merge.source import InputModel
from mergebot.merge.tokenizer import OutputTokenizer, build_output_tokenizer
from mergebot.merge.vocab import read_vocab, row_map


@dataclass(frozen=True)
class TokenRow:
    """A configured token's row: row `row` of `model`'s tensor (the mean row when `model` is None), for every
    model when `force`, else for the models that lack the token."""

    token: str
    model: str | None
    row: int
    force: bool


class VocabPlan:
    """Without a tokenizer setting the rows follow the tokenizer source's embedding; with one, its vocabulary
    (padded to `pad_to_multiple_of`). Models are matched by token, never by row alone."""

    def __init__(self, config: MergeConfig, models: dict[str, InputModel]):
        self.config = config
        self.models = models
        self.row_maps: dict[tuple[str, int], np.ndarray | None] = {}
        self._vocabs: dict[str, dict[str, int] | None] = {}

    @cached_property
    def output(self) -> OutputTokenizer | None:
        """The built tokenizer; None without a tokenizer setting."""
        if self.config.tokenizer is None:
            return None
        source = self.config.tokenizer_source
        others = [m.model for m in self.config.models if m.model != source]
        return build_output_tokenizer(self.config.tokenizer, source, others, self.models)

    @property
    def token_rows(self) -> int | None:
        """Rows that hold tokens (those above are padding); None: every row."""
        return self.output.token_rows if self.output else None

    def rows(self, source_rows: int) -> int:
        """Output rows of a vocabulary tensor whose tokenizer-source input has `source_rows` rows."""
        return self.output.rows if self.output else source_rows

    def add_row_map(self, model: str, model_rows: int, output_rows: int) -> None:
        if (model, model_rows) not in self.row_maps:
            output_vocab = self.output.vocab if self.output else self._vocab(self.config.tokenizer_source)
            self.row_maps[(model, model_rows)] = row_map(output_vocab, output_rows, self._vocab(model), model_rows)

    @cached_property
    def overrides(self) -> dict[int, TokenRow]:
        """Output row → the configured source of its token."""
        if self.output is None or self.config.tokenizer is None:
            return {}
        rows = {}
        for token, setting in self.config.tokenizer.tokens.items():
            source = setting.source
            if source is None:
                continue
            row = -1
            if source.model is not None and source.token_id is not None:
                row = source.token_id
            elif source.model is not None:
                row = self._token_id(token, source.token, source.model)
            rows[self.output.vocab[token]] = TokenRow(token, source.model, row, setting.force)
        return rows

    def check_inputs(self, tensor: str, inputs: list[tuple[str, int]]) -> None:
        """Every configured source row exists among the inputs of this vocabulary tensor."""
        for token_row in self.overrides.values():
            if token_row.model is None:
                continue
            where = f"{self.config.source}: tokenizer.tokens.{token_row.token}.source"
            rows = next((rows for model, rows in inputs if model == token_row.model), None)
            if rows is None:
                raise ConfigError(f"{where}: tensor {tensor} takes no input from model {token_row.model}")
            if token_row.row >= rows:
                raise ConfigError(f"{where}: row {token_row.row} is beyond {tensor} of {token_row.model} ({rows} rows)")

    def fingerprint(self) -> dict[str, Any] | None:
        """What, besides the row maps and shapes, decides a vocabulary tensor's values; None for nothing."""
        overrides = self.overrides
        if not overrides and (self.output is None or self.output.token_rows == self.output.rows):
            return None
        return {
            "token_rows": self.token_rows,
            "tokens": [[row, t.model, t.row, t.force] for row, t in sorted(overrides.items())],
        }

    def _token_id(self, token: str, named: str | None, model: str) -> int:
        wanted = token if named is None else named
        vocab = self._vocab(model) or {}
        if wanted not in vocab:
            raise ConfigError(f"{self.config.source}: tokenizer.tokens.{token}.source: model {model} has no {wanted!r}")
        return vocab[wanted]

    def _vocab(self, model: str) -> dict[str, int] | None:
        """A model without tokenizer.json is taken to share the base's (or first model's) vocabulary, as mergekit
        assumes."""
        if model not in self._vocabs:
            vocab = read_vocab(self.models[model].path, model)
            base = self.config.base_model or self.config.models[0].model
            self._vocabs[model] = vocab if vocab is not None or model == base else self._vocab(base)
        return self._vocabs[model]
