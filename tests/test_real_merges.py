"""Every merge method on a real model (SmolLM2-135M-Instruct and two short real fine-tunes): the result loads with no
missing or unexpected keys, keeps the tied embeddings and the chat template, gives finite logits and still answers
the factual chat prompt as its parents do."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergebot.config.document import Located
from mergebot.config.merge import parse_merge
from mergebot.dev import realmodel
from mergebot.merge.engine import run_merge
from mergebot.merge.io import read_header
from mergebot.pipeline.inputs import resolve_inputs

pytest_plugins = ["tests.realmodel_fixtures"]

QUESTION = "What is the capital of France?"
# One config per method: the real base and the two fine-tunes, with the parameters each method requires.
TWO = {"weight": 0.5}
SPARSE = {"weight": 0.5, "density": 0.7}
METHODS: dict[str, tuple[str, dict, dict]] = {
    # method: (which models, global parameters, per-model parameters)
    "linear": ("all", {}, TWO),
    "slerp": ("base+code", {"t": 0.5}, {}),
    "nearswap": ("base+code", {"t": 0.5}, {}),
    "arcee_fusion": ("base+code", {}, {}),
    "passthrough": ("code", {}, {}),
    "task_arithmetic": ("base+both", {}, TWO),
    "ties": ("base+both", {}, SPARSE),
    "dare_ties": ("base+both", {}, SPARSE),
    "dare_linear": ("base+both", {}, SPARSE),
    "breadcrumbs": ("base+both", {}, {**SPARSE, "gamma": 0.01}),
    "breadcrumbs_ties": ("base+both", {}, {**SPARSE, "gamma": 0.01}),
    "della": ("base+both", {}, {**SPARSE, "epsilon": 0.1}),
    "della_linear": ("base+both", {}, {**SPARSE, "epsilon": 0.1}),
    "sce": ("base+both", {"select_topk": 0.5}, {}),
    "ram": ("base+both", {}, {}),
    "ramplus_tl": ("base+both", {}, {}),
    "model_stock": ("base+both", {}, {}),
    "nuslerp": ("base+both", {}, TWO),
    "multislerp": ("base+both", {}, TWO),
    "karcher": ("both", {}, {}),
}


def merge_config(method: str, base: Path, tunes: dict[str, Path]) -> dict:
    which, parameters, per_model = METHODS[method]
    code, licenses = str(tunes["code"]), str(tunes["licenses"])
    models = {
        "all": [str(base), code, licenses],
        "base+code": [code],
        "code": [code],
        "base+both": [code, licenses],
        "both": [code, licenses],
    }[which]
    raw = {"merge_method": method, "models": [{"model": m, "parameters": per_model} for m in models]}
    if which.startswith("base"):
        raw["base_model"] = str(base)
    if which == "code":
        raw = {"merge_method": method, "models": [{"model": code}]}
    if parameters:
        raw["parameters"] = parameters
    return raw


def test_every_method_has_a_real_model_case():
    from mergebot.merge.methods import BUILTIN_METHODS

    assert set(METHODS) == set(BUILTIN_METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_the_real_model(method, real_base, real_fine_tunes, tmp_path):
    config = parse_merge(merge_config(method, real_base, real_fine_tunes), Located(Path("<test>"), ""))
    out = tmp_path / "merged"
    run_merge(config, resolve_inputs(config), out)

    names = {name for file in out.glob("*.safetensors") for name in read_header(file)[0]}
    assert "lm_head.weight" not in names, "the inputs tie their embeddings, so the merge must too"
    assert (out / "chat_template.jinja").read_text() == (real_base / "chat_template.jinja").read_text()
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.tie_word_embeddings
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "Paris" in realmodel.answer(model, tokenizer, QUESTION, max_new_tokens=10), method
