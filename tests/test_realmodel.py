"""The real model (mergebot.dev.realmodel): the converted SmolLM2 base, its fine-tunes and a broken upload, checked
the way a user would: it loads cleanly, answers a question, and its perplexity says whether it is healthy."""

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import mergebot
from mergebot.dev import realmodel
from tests.helpers import load_tensors

pytest_plugins = ["tests.realmodel_fixtures"]

EVAL_TEXT = Path(mergebot.__file__).parent / "data" / "eval.txt"
WINDOW = 128
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module", autouse=True)
def _free_loaded_models() -> Iterator[None]:
    """The loaded checkpoints (about 0.5 GB each in float32) are let go once this module's tests are done."""
    yield
    _loaded.cache_clear()
    _ppl.cache_clear()


@functools.cache
def _loaded(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Each checkpoint is loaded once per session (a few seconds each)."""
    return realmodel.load(model_dir)


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
    """exp(mean next-token NLL) over non-overlapping WINDOW-token windows of the eval text."""
    ids = tokenizer(EVAL_TEXT.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids[: len(ids) // WINDOW * WINDOW].view(-1, WINDOW)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return math.exp(torch.stack(losses).mean().item())


@functools.cache
def _ppl(model_dir: Path) -> float:
    return perplexity(*_loaded(model_dir))


def test_gguf_sha256_from_the_wheel_record_is_the_file_hash() -> None:
    path, digest = realmodel.gguf_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_base_is_a_plain_bf16_checkpoint_with_tied_embeddings(real_base: Path) -> None:
    config = json.loads((real_base / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (real_base / name).is_file(), name
    with safe_open(real_base / "model.safetensors", framework="pt") as reader:
        names = list(reader.keys())
        assert {reader.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names


def test_base_loads_with_no_missing_or_unexpected_keys(real_base: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(real_base, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_base_keeps_the_chat_template(real_base: Path) -> None:
    _, tokenizer = _loaded(real_base)
    assert len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_base_answers_paris(real_base: Path) -> None:
    assert "Paris" in realmodel.answer(*_loaded(real_base), QUESTION)


def test_chat_answer_loads_and_asks(real_base: Path) -> None:
    assert "Paris" in realmodel.chat_answer(real_base, QUESTION, max_new_tokens=10)


def test_base_perplexity_is_healthy(real_base: Path) -> None:
    assert 20 < _ppl(real_base) < 60


@pytest.mark.parametrize("name", sorted(realmodel.FINE_TUNES))
def test_fine_tune_is_a_real_task_vector(name: str, real_base: Path, real_fine_tunes: dict[str, Path]) -> None:
    base, tuned = load_tensors(real_base), load_tensors(real_fine_tunes[name])
    assert tuned.keys() == base.keys()
    changed = 0
    for key, value in base.items():
        delta = tuned[key].float() - value.float()
        assert tuned[key].dtype == torch.bfloat16 and torch.isfinite(delta).all(), key
        changed += int(delta.abs().max() > 0)
    assert changed > len(base) // 2
    assert json.loads((real_fine_tunes[name] / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("name", sorted(realmodel.FINE_TUNES))
def test_fine_tune_stays_healthy_and_answers_paris(
    name: str, real_base: Path, real_fine_tunes: dict[str, Path]
) -> None:
    path = real_fine_tunes[name]
    assert _ppl(path) < 1.25 * _ppl(real_base)
    assert "Paris" in realmodel.answer(*_loaded(path), QUESTION)


def test_fine_tunes_differ_from_each_other(real_fine_tunes: dict[str, Path]) -> None:
    code, licenses = (load_tensors(real_fine_tunes[n]) for n in ("code", "licenses"))
    assert any(not torch.equal(code[k], licenses[k]) for k in code)


def test_broken_copy_changes_one_tensor_and_explodes_perplexity(real_base: Path, real_broken: Path) -> None:
    base, broken = load_tensors(real_base), load_tensors(real_broken)
    differing = [k for k in base if not torch.equal(base[k], broken[k])]
    assert differing == ["model.layers.15.mlp.down_proj.weight"]
    assert (real_broken / "tokenizer.json").read_bytes() == (real_base / "tokenizer.json").read_bytes()
    assert _ppl(real_broken) > 1000


def test_a_half_broken_merge_is_still_far_worse_than_the_base(real_base: Path, real_broken: Path) -> None:
    """A 50/50 linear merge with the broken upload: what the gate must refuse to publish. Computed on the loaded
    base in place (only the tensors that differ change) and put back afterwards."""
    model, tokenizer = _loaded(real_base)
    parameters = dict(model.named_parameters())
    broken = load_tensors(real_broken)
    saved = {name: p.detach().clone() for name, p in parameters.items() if not torch.equal(p, broken[name].float())}
    assert saved
    try:
        with torch.no_grad():
            for name, original in saved.items():
                parameters[name].copy_(0.5 * original + 0.5 * broken[name].float())
        mixed = perplexity(model, tokenizer)
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                parameters[name].copy_(original)
    assert mixed > 10 * _ppl(real_base)


def test_broken_copy_refuses_an_existing_destination(real_base: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        realmodel.broken_copy(real_base, tmp_path)


def test_cache_builds_once_and_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    builds: list[Path] = []

    def build(out: Path) -> None:
        builds.append(out)
        (out / "weights").write_text("w")

    def fail(out: Path) -> None:
        (out / "half").write_text("h")
        raise RuntimeError("killed")

    (tmp_path / ".entry.tmp-stale").mkdir()  # a build killed earlier
    announced: list[str] = []
    first = realmodel._cached(tmp_path, "entry", build, lambda: announced.append("entry"))
    assert realmodel._cached(tmp_path, "entry", build, lambda: announced.append("again")) == first == tmp_path / "entry"
    assert len(builds) == 1 and (first / "weights").read_text() == "w"
    assert announced == ["entry"], "a one-time build is announced when it runs, and only then"
    with pytest.raises(RuntimeError):
        realmodel._cached(tmp_path, "other", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", ".other.lock", "entry"]


def test_base_model_is_cached_by_content(real_base: Path) -> None:
    assert real_base.name == f"{realmodel.MODEL_NAME}-{realmodel.base_key()}"
    assert realmodel.base_model(real_base.parent.parent) == real_base
