"""Vocabulary alignment: which row of each model's embedding feeds each output row.

A token is matched by its string through each model's tokenizer.json, not by row index alone, so models whose
vocabularies differ in size or order still line up (the output vocabulary itself: vocab_plan.py, tokenizer.py).
"""

from pathlib import Path

import numpy as np

from mergebot.errors import ModelError
from mergebot.files import parse_json, read_small

VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSOR_SUFFIXES)


def read_vocab(model_dir: Path, label: str) -> dict[str, int] | None:
    """token → id from tokenizer.json (model vocab plus added tokens); None when the model ships no tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tokenizer = parse_json(read_small(path, f"model {label}"), f"model {label}", str(path))
        vocab = tokenizer["model"].get("vocab") or {}
        if isinstance(vocab, list):
            vocab = {entry[0]: index for index, entry in enumerate(vocab)}
        tokens = {str(token): int(index) for token, index in vocab.items()}
        for added in tokenizer.get("added_tokens") or []:
            tokens[str(added["content"])] = int(added["id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(f"model {label}: cannot read the vocabulary in {path} ({error})") from error
    return tokens


def row_map(
    source_vocab: dict[str, int] | None, output_rows: int, model_vocab: dict[str, int] | None, model_rows: int
) -> np.ndarray | None:
    """For each output row, the model's row holding the same token, or -1; None when it is the identity."""
    if model_rows == output_rows and (source_vocab is None or model_vocab is None or source_vocab == model_vocab):
        return None
    by_index = np.arange(output_rows, dtype=np.int64)
    mapping = np.where(by_index < model_rows, by_index, -1)
    if source_vocab is not None and model_vocab is not None:
        for token, output_id in source_vocab.items():
            if output_id < output_rows:
                model_id = model_vocab.get(token, -1)
                mapping[output_id] = model_id if model_id < model_rows else -1
    return mapping
