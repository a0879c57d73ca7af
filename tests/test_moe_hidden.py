"""The `hidden` routers of a mixture of experts (mergebot.pipeline.moe_hidden), against mergekit-moe 0.1.5 and
against the whole base model run by transformers."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergebot.config.moe import Expert, load_moe_config
from mergebot.dev.synthetic import make_model
from mergebot.errors import ModelError
from mergebot.merge.moe import run_moe
from mergebot.merge.moe_router import RouterInputs, router_weights
from mergebot.merge.source import open_model
from mergebot.pipeline.inputs import resolve_inputs
from mergebot.pipeline.moe_hidden import ALL_ROUTERS
from tests.helpers import load_tensors
from tests.mergekit_reference import mergekit_python

DRIVER = Path(__file__).resolve().parent / "mergekit_hidden_driver.py"
LAYERS, HIDDEN = 3, 16
PROMPTS = (
    (("the garden grows green plants", "sow the seeds in spring"), ("cold winter snow",)),
    (("rain falls from dark clouds over the hedge",), ()),
    (("the old gardener picks ripe tomatoes", "birds"), ("rain", "the storm and thunder at night")),
)
EQUAL_LENGTHS = (
    (("the garden grows green plants", "rain falls from dark clouds"), ("cold winter snow",)),
    (("the old gardener picks tomatoes", "birds sing in the morning"), ()),
)
"""For hidden_avg, which mergekit-moe averages over its padding too: each list's prompts are equally long."""
BF16_TOLERANCE = 2.0**-6
"""mergekit-moe as users run it computes the router in bfloat16 (8 significant bits, 2^-8 at 1.0): on unit vectors
through three layers its rounding stays within 4 such steps."""


def experts(prompts, models: dict[str, Path] | None = None) -> tuple[Expert, ...]:
    return tuple(
        Expert(str(models[f"m{n}"]) if models else f"m{n}", positive, negative)
        for n, (positive, negative) in enumerate(prompts, 1)
    )


def routers(base: Path, mode: str, prompts=PROMPTS) -> np.ndarray:
    """(layers, experts, hidden)."""
    inputs = RouterInputs(open_model("base", base), experts(prompts), LAYERS, HIDDEN)
    weights = router_weights(mode, inputs, ALL_ROUTERS)
    return np.stack([weights[layer] for layer in range(LAYERS)])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-hidden")
    base = make_model(
        root / "base", hidden=HIDDEN, layers=LAYERS, heads=2, kv_heads=1, intermediate=24, dtype=torch.float32
    )
    fine_tunes = {f"m{n}": make_model(root / f"m{n}", base=base, seed=n) for n in (1, 2, 3)}
    return {"base": base, **fine_tunes}


def moe_yaml(models: dict[str, Path], mode: str, prompts) -> str:
    listed = "".join(
        f"  - source_model: {expert.model}\n    positive_prompts: {list(expert.positive_prompts)}\n"
        + (f"    negative_prompts: {list(expert.negative_prompts)}\n" if expert.negative_prompts else "")
        for expert in experts(prompts, models)
    )
    return f"base_model: {models['base']}\ngate_mode: {mode}\ndtype: float32\nexperts:\n{listed}"


@pytest.fixture(scope="module")
def kit(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mergekit-moe's outputs, as-is and with the base loaded in float32 (tests/mergekit_hidden_driver.py), of
    `hidden` and `hidden_avg` (Mixtral) and `hidden` for a Qwen MoE whose shared expert has prompts, under
    root/<case>/."""
    python = mergekit_python()
    root = tmp_path_factory.mktemp("mergekit-moe-hidden")
    arguments = []
    shared = f"architecture: qwen\nshared_experts:\n  - source_model: {models['m1']}\n    positive_prompts: [gate]\n"
    cases = {
        "hidden": moe_yaml(models, "hidden", PROMPTS),
        "hidden_avg": moe_yaml(models, "hidden_avg", EQUAL_LENGTHS),
        "qwen_hidden": moe_yaml(models, "hidden", PROMPTS) + shared,
    }
    for case, text in cases.items():
        (root / case).mkdir()
        (root / case / "moe.yml").write_text(text)
        arguments += [root / case / "moe.yml", root / case]
    driver = subprocess.run(
        [python, DRIVER, *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr[-4000:]
    for error in root.glob("*/*.error"):
        pytest.fail(f"mergekit-moe failed ({error}):\n{error.read_text()[-4000:]}")
    return root


def kit_routers(out: Path) -> np.ndarray:
    tensors = load_tensors(out)
    return np.stack([tensors[f"model.layers.{i}.mlp.gate.weight"].numpy() for i in range(LAYERS)])


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_the_same_routers_as_mergekit_moe(mode, models, kit):
    """To float32 rounding when mergekit-moe's base loads in float32; within bfloat16 rounding as users run it."""
    ours = routers(models["base"], mode, PROMPTS if mode == "hidden" else EQUAL_LENGTHS)
    np.testing.assert_allclose(ours, kit_routers(kit / mode / "float32"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, kit_routers(kit / mode / "as-is"), rtol=0, atol=BF16_TOLERANCE)


@pytest.mark.parametrize("case", ["hidden", "qwen_hidden"])
def test_mergebot_merge_of_a_hidden_moe_is_mergekits(case, models, kit, tmp_path):
    """The whole output of `mergebot merge` on the same file, every tensor (a Qwen MoE's shared expert gate too),
    against mergekit-moe's float32 run."""
    config = load_moe_config(kit / case / "moe.yml")
    run_moe(config, resolve_inputs(config), tmp_path / "out", routers=ALL_ROUTERS)
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(kit / case / "float32")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_same_routers_as_the_whole_model_in_transformers(models):
    """Layer by layer here; there, the whole float32 model on the left-padded batch of each expert's prompts, as
    mergekit-moe runs it: the hidden state entering each layer at the last token, averaged, less the negatives'."""
    ours = routers(models["base"], "hidden")
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    tokenizer.padding_side, tokenizer.pad_token_id = "left", tokenizer.bos_token_id

    def last_states(prompts: tuple[str, ...]) -> torch.Tensor:
        texts = [tokenizer.bos_token + p for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states[:-1]
        return torch.stack(states)[:, :, -1, :].mean(dim=1)

    for index, (positive, negative) in enumerate(PROMPTS):
        expected = last_states(positive) - (last_states(negative) if negative else 0)
        expected = expected / expected.norm(dim=-1, keepdim=True)
        np.testing.assert_allclose(ours[:, index, :], expected.numpy(), rtol=0, atol=1e-6)
    assert ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    assert np.array_equal(ours, routers(models["base"], "hidden_last"))


def test_negative_prompts_change_the_row_and_equal_prompts_give_equal_rows(models):
    positive = PROMPTS[0][0]
    ours = routers(models["base"], "hidden", ((positive, ()), PROMPTS[0], (positive, ())))
    assert not np.allclose(ours[:, 0], ours[:, 1], atol=1e-3)
    assert np.array_equal(ours[:, 0], ours[:, 2])


def test_what_it_cannot_reproduce_is_refused_with_its_line(models):
    with pytest.raises(ModelError, match=r"^expert 3 \(m3\): gate_mode hidden_avg with positive prompts of 2 to 7 "):
        routers(models["base"], "hidden_avg")
    base = open_model("base", models["base"])
    base.config["model_type"] = "gemma"
    with pytest.raises(ModelError, match=r"^model base: gate_mode hidden .* model_type 'gemma'"):
        router_weights("hidden", RouterInputs(base, experts(PROMPTS), LAYERS, HIDDEN), ALL_ROUTERS)
    base = open_model("base", models["base"])
    del base.tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        ModelError, match=r"^model base: no tensor model\.layers\.1\.mlp\.up_proj\.weight for the hidden"
    ):
        router_weights("hidden", RouterInputs(base, experts(PROMPTS), LAYERS, HIDDEN), ALL_ROUTERS)
