"""The gate on vision-language merges (LLaVA, Qwen2-VL): built with their image-text class, their saved tensor names
taken through transformers' renamings, measured and probed on text alone."""

import json
import re
from pathlib import Path

import pytest
import torch

from mergebot.dev.broken import altered_copy
from mergebot.dev.synthetic import BOS_ID, EOS_ID, base_vocabulary, build_tokenizer
from mergebot.files import INDEX_FILE
from tests.helpers import run_cli
from tests.tiny_architectures import ARCHITECTURES, TEXT, build, fine_tune

VLMS = ["llava", "qwen2_vl"]
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"
)
"""Turns end with </s>, the token generation stops at: the chat probe runs."""
BROKEN_FACTOR = 30.0


def never_ending(found: dict[str, torch.Tensor]) -> None:
    """Every tensor noised once (fine-tunes of an all-zero bias would differ by 100% of it: the weight-distance
    check's suspects), and the </s> row of the output head zeroed: a logit of 0 among 96 random ones is never the
    greedy pick, so no model of the family ends its turn by chance and the probe's stop counts agree."""
    generator = torch.Generator().manual_seed(0)
    for name in sorted(found):
        found[name] = found[name] + 0.02 * torch.randn(found[name].shape, generator=generator)
        if name.endswith("lm_head.weight"):
            found[name][EOS_ID] = 0.0


def with_tokenizer(path: Path) -> Path:
    """The tiny checkpoint made usable for the gate: a word-level tokenizer over its vocabulary, with a chat
    template, and end-of-sequence ids (top level, text config, generation config) that are its own."""
    tokenizer = build_tokenizer(base_vocabulary(TEXT["vocab_size"]))
    (path / "tokenizer.json").write_text(tokenizer.to_str())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {**specials, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    (path / "generation_config.json").write_text(json.dumps(ids))
    model_config = json.loads((path / "config.json").read_text())
    model_config.update(ids)
    model_config["text_config"].update(ids)
    (path / "config.json").write_text(json.dumps(model_config))
    return path


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text the tiny vocabulary knows: its words, a few windows' worth."""
    words = [t for t in base_vocabulary(TEXT["vocab_size"]) if t.isalpha()]
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(" ".join(words * 8))
    return path


@pytest.fixture(scope="module", params=VLMS)
def vlm_merge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A linear merge of two fine-tunes of one tiny vision-language base."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    init = build(ARCHITECTURES[name], root / "init")
    base = altered_copy(init, root / "base", tensors=never_ending)
    with_tokenizer(base)
    a, b = fine_tune(base, root / "a", 1), fine_tune(base, root / "b", 2)
    out = root / "out"
    assert run_cli("merge", "--method", "linear", f"{a}:0.5", f"{b}:0.5", out) == 0
    return name, out


def test_a_merge_of_two_fine_tunes_passes_with_the_probe(vlm_merge, eval_text, capsys) -> None:
    _, out = vlm_merge
    capsys.readouterr()
    assert run_cli("validate", out, "--eval-text", eval_text) == 0
    table = capsys.readouterr().out
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    assert architecture in table
    assert "tensors match the config" in table
    assert re.search(r"^  merge +0/6 +\d", table, re.MULTILINE)  # probed: 6 prompts, none stopped, P(end of turn)


def test_a_scaled_output_head_is_refused(vlm_merge, eval_text, tmp_path, capsys) -> None:
    """The head 30x too sharp (a random tiny model's near-uniform predictions hardly notice a scaled layer)."""
    _, out = vlm_merge

    def scale(found: dict) -> None:
        (target,) = (name for name in found if name.endswith("lm_head.weight"))
        found[target] = found[target] * BROKEN_FACTOR

    broken = altered_copy(out, tmp_path / "broken", tensors=scale)
    capsys.readouterr()
    assert run_cli("validate", broken, "--eval-text", eval_text) == 1
    assert re.search(r"^  perplexity +FAIL ", capsys.readouterr().out, re.MULTILINE)


def test_a_missing_language_model_tensor_is_named(vlm_merge, eval_text, tmp_path, capsys) -> None:
    """Dropped from its shard and the index: the tensors check names it (as the loaded model does)."""
    name, out = vlm_merge
    target = f"{ARCHITECTURES[name].decoder}2.self_attn.q_proj.weight"

    def unlisted(found: dict[str, bytes]) -> None:
        index = json.loads(found[INDEX_FILE])
        del index["weight_map"][target]
        found[INDEX_FILE] = json.dumps(index).encode()

    broken = altered_copy(out, tmp_path / "broken", files=unlisted, tensors=lambda found: found.pop(target))
    capsys.readouterr()
    assert run_cli("validate", broken, "--eval-text", eval_text) == 1
    table = capsys.readouterr().out
    assert re.search(r"^  tensors +FAIL +missing: \S*layers\.2\.self_attn\.q_proj\.weight$", table, re.MULTILINE)
