"""The `hidden` router of a mixture of experts (mergebot.pipeline.moe_hidden), against mergekit-moe 0.1.5 and against
the whole base model run by transformers."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergebot.dev.synthetic import make_model
from mergebot.errors import ModelError
from mergebot.pipeline.moe_hidden import GatePrompts, hidden_gate_vectors
from mergebot.merge.source import open_model
from tests.helpers import load_tensors
from tests.mergekit_reference import mergekit_python

DRIVER = Path(__file__).resolve().parent / "mergekit_hidden_driver.py"
LAYERS = 3
ROWS = (
    GatePrompts(("the garden grows green plants", "sow the seeds in spring"), ("cold winter snow",)),
    GatePrompts(("rain falls from dark clouds over the hedge",)),
    GatePrompts(("the old gardener picks ripe tomatoes", "birds"), ("rain", "the storm and thunder at night")),
)
BF16_TOLERANCE = 2.0**-6
"""mergekit-moe as users run it computes the router in bfloat16 (8 significant bits, 2^-8 at 1.0): on unit vectors
through three layers its rounding stays within 4 such steps."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-hidden")
    base = make_model(
        root / "base", hidden=16, layers=LAYERS, heads=2, kv_heads=1, intermediate=24, dtype=torch.float32
    )
    experts = {f"m{number}": make_model(root / f"m{number}", base=base, seed=number) for number in (1, 2, 3)}
    return {"base": base, **experts}


def test_the_same_router_as_the_whole_model_in_transformers(models):
    """Layer by layer here; there, the whole float32 model on the left-padded batch of each expert's prompts, as
    mergekit-moe runs it: the hidden state entering each layer at the last token, averaged, less the negatives'."""
    ours = hidden_gate_vectors(open_model("base", models["base"]), ROWS)
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    tokenizer.padding_side, tokenizer.pad_token_id = "left", tokenizer.bos_token_id

    def last_states(prompts: tuple[str, ...]) -> torch.Tensor:
        batch = tokenizer(
            [tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states[:-1]
        return torch.stack(states)[:, :, -1, :].mean(dim=1)

    for index, row in enumerate(ROWS):
        expected = last_states(row.positive) - (last_states(row.negative) if row.negative else 0)
        expected = expected / expected.norm(dim=-1, keepdim=True)
        np.testing.assert_allclose(ours[:, index, :], expected.numpy(), rtol=0, atol=1e-6)
    assert ours.shape == (LAYERS, len(ROWS), 16) and ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)


def test_the_same_router_as_mergekit_moe(models, tmp_path):
    """mergekit-moe's router to float32 rounding when its base loads in float32, and within bfloat16 rounding as
    users run it (it loads the base in bfloat16)."""
    python = mergekit_python()
    experts = "".join(
        f"  - source_model: {models[f'm{number}']}\n    positive_prompts: {list(row.positive)}\n"
        + (f"    negative_prompts: {list(row.negative)}\n" if row.negative else "")
        for number, row in enumerate(ROWS, 1)
    )
    config = tmp_path / "moe.yml"
    config.write_text(f"base_model: {models['base']}\ngate_mode: hidden\ndtype: float32\nexperts:\n{experts}")
    as_is, float32 = tmp_path / "as-is", tmp_path / "float32"
    driver = subprocess.run(
        [python, DRIVER, config, as_is, float32],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr[-4000:]
    for out in (as_is, float32):
        assert not Path(f"{out}.error").exists(), Path(f"{out}.error").read_text()[-4000:]
    ours = hidden_gate_vectors(open_model("base", models["base"]), ROWS)

    def routers(out: Path) -> np.ndarray:
        tensors = load_tensors(out)
        return np.stack([tensors[f"model.layers.{i}.mlp.gate.weight"].numpy() for i in range(LAYERS)])

    np.testing.assert_allclose(ours, routers(float32), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, routers(as_is), rtol=0, atol=BF16_TOLERANCE)


def test_negative_prompts_change_the_row_and_equal_prompts_are_computed_once(models):
    base = open_model("base", models["base"])
    alone = hidden_gate_vectors(base, [GatePrompts(ROWS[0].positive), ROWS[0]])
    assert not np.allclose(alone[:, 0], alone[:, 1], atol=1e-3)
    again = hidden_gate_vectors(base, [GatePrompts(ROWS[0].positive), GatePrompts(ROWS[0].positive)])
    assert np.array_equal(again[:, 0], again[:, 1])
    assert np.array_equal(again[:, 0], alone[:, 0])


def test_a_base_it_cannot_run_is_refused_with_its_line(models, tmp_path):
    base = open_model("base", models["base"])
    base.config["model_type"] = "gemma"
    with pytest.raises(ModelError, match=r"^model base: gate_mode hidden .* model_type 'gemma'"):
        hidden_gate_vectors(base, ROWS)
    base = open_model("base", models["base"])
    del base.tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        ModelError, match=r"^model base: no tensor model\.layers\.1\.mlp\.up_proj\.weight for the hidden"
    ):
        hidden_gate_vectors(base, ROWS)
