"""Broken uploads of a working checkpoint, one realistic defect each, for tests and demos of the gate: the kinds that
load fine, read text as well as before, and still give a merge a user would call broken at once.

Each writes `dst` (which must not exist) as a copy of `src` in a temp dir beside it, renamed into place when done.
"""

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergebot.config.chat_templates import LLAMA3
from mergebot.files import INDEX_FILE, SINGLE_FILE
from mergebot.merge.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG

MILD_FACTOR = 2.4
"""One middle-layer down_proj scaled by this costs SmolLM2-135M-Instruct about 10% perplexity on raw text: far
inside any perplexity limit, far outside what a fine-tune does to one tensor."""
SEED = 0

Files = dict[str, bytes]
Tensors = dict[str, torch.Tensor]


def foreign_template(src: Path, dst: Path) -> Path:
    """Another model family's chat template (Llama 3's), weights untouched: its markers are not tokens of this
    vocabulary and its turns end with a token generation does not stop at."""

    def files(found: Files) -> None:
        found[CHAT_TEMPLATE_FILE] = LLAMA3.strip().encode()
        config = json.loads(found[TOKENIZER_CONFIG])
        config.pop("chat_template", None)
        found[TOKENIZER_CONFIG] = json.dumps(config, indent=2).encode()

    return altered_copy(src, dst, files=files)


def wrong_eos(src: Path, dst: Path, eos_id: int = 0) -> Path:
    """eos_token_id in config.json and generation_config.json pointing at another special token."""

    def files(found: Files) -> None:
        for name in ("config.json", "generation_config.json"):
            if name in found:
                config = json.loads(found[name])
                config["eos_token_id"] = eos_id
                found[name] = json.dumps(config, indent=2).encode()

    return altered_copy(src, dst, files=files)


def reinitialised_rows(src: Path, dst: Path, token_ids: tuple[int, ...] = (1, 2)) -> Path:
    """The embedding rows (and output rows, when untied) of the chat special tokens drawn afresh, as a careless
    `resize_token_embeddings` leaves them: every other weight is the same."""

    def tensors(found: Tensors) -> None:
        generator = torch.Generator().manual_seed(SEED)
        for name in [n for n in found if n.endswith(("embed_tokens.weight", "lm_head.weight"))]:
            table = found[name]
            fresh = torch.randn(len(token_ids), table.shape[1], generator=generator) * 0.02
            table[list(token_ids)] = fresh.to(table.dtype)

    return altered_copy(src, dst, tensors=tensors)


def scaled_tensor(src: Path, dst: Path, factor: float) -> Path:
    """The middle layer's mlp.down_proj.weight multiplied by `factor`: the kind of damage a bad conversion
    uploads, which loads fine (30x: perplexity hundreds of times worse; MILD_FACTOR: about 10% worse)."""
    config = json.loads((Path(src) / "config.json").read_text())
    target = f"model.layers.{config['num_hidden_layers'] // 2}.mlp.down_proj.weight"

    def tensors(found: Tensors) -> None:
        found[target] = (found[target].float() * factor).to(found[target].dtype)

    return altered_copy(src, dst, tensors=tensors, only=target)


def altered_copy(
    src: Path,
    dst: Path,
    *,
    files: Callable[[Files], None] | None = None,
    tensors: Callable[[Tensors], None] | None = None,
    only: str | None = None,
) -> Path:
    """Copy checkpoint `src` to `dst`, letting `files` change the small JSON/Jinja files (by name) and `tensors`
    change the weights of every shard (of the shard holding tensor `only`, when given)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists")
    index = src / INDEX_FILE
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    if only is not None:
        shards = [weight_map[only] if weight_map else SINGLE_FILE]
    small = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file() and f.suffix in (".json", ".jinja")}
    if files is not None:
        files(small)
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        temp.chmod(0o755)
        for file in sorted(src.iterdir()):
            if file.is_file() and file.name not in small and (tensors is None or file.name not in shards):
                shutil.copyfile(file, temp / file.name)
        for name, data in small.items():
            (temp / name).write_bytes(data)
        for shard in shards if tensors is not None else []:
            with safe_open(src / shard, framework="pt") as reader:
                metadata = reader.metadata()
                found = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118 (not a dict)
            tensors(found)
            save_file(found, temp / shard, metadata=metadata)
        temp.rename(dst)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return dst
